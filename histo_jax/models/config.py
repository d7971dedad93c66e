"""Model configuration (ml_collections) with the reference defaults of the PyTorch project."""
from __future__ import annotations

import ml_collections

# Named encoder variants -> (width multiplier, depth multiplier). The config's own
# width_mult / depth_mult multiply these. 'tiny' keeps every stage with 1 block and few
# channels so unit tests compile in seconds; 'b0' is the exact EfficientNet-B0.
VARIANTS: dict[str, tuple[float, float]] = {
    "b0": (1.0, 1.0),
    "tiny": (0.25, 0.25),
}

DTYPES = ("float32", "bfloat16")


def get_model_config() -> ml_collections.ConfigDict:
    """Every model field, with the reference values (EfficientNet-B0 + 8-head fusion)."""
    c = ml_collections.ConfigDict()
    c.variant = "b0"            # 'b0' | 'tiny' (see VARIANTS)
    c.width_mult = 1.0          # extra channel multiplier on top of the variant
    c.depth_mult = 1.0          # extra depth multiplier on top of the variant
    c.depthwise = "auto"        # 'auto' (shift on CPU, grouped elsewhere) | 'shift' | 'grouped'
    c.pretrained = "none"       # 'none' | 'imagenet' | path to a PyTorch .pth/.safetensors file
    c.embed_dim = 128           # projection / attention width
    c.num_heads = 8
    c.ffn_dim = 512
    c.dropout = 0.5             # FFN and classifier dropout
    c.attn_dropout = 0.5        # dropout on the attention weights
    c.stochastic_depth = 0.2    # max stochastic-depth rate (block i: rate * i / num_blocks)
    c.bn_eps = 1e-5
    c.bn_momentum = 0.1         # PyTorch convention (Flax momentum 0.9)
    c.ln_eps = 1e-5
    c.num_classes = 2
    # Recompute each MBConv block in the backward pass (N=1 train step: -8 % memory, +40 % time).
    c.remat = False
    c.dtype = "float32"         # compute dtype: 'float32' | 'bfloat16' (params stay float32)
    return c


def resolve_multipliers(variant: str, width_mult: float, depth_mult: float) -> tuple[float, float]:
    """Combine a named variant with the extra multipliers; errors name the valid variants."""
    if variant not in VARIANTS:
        raise ValueError(
            f"model variant {variant!r} is unknown (histo_jax/models/config.py); "
            f"use one of {sorted(VARIANTS)}.")
    w, d = VARIANTS[variant]
    return w * float(width_mult), d * float(depth_mult)
