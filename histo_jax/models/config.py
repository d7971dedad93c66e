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
BN_STATS = ("per_input", "joint")
TRUNKS = ("auto", "folded", "scan", "unrolled", "staged")


def get_model_config() -> ml_collections.ConfigDict:
    """Every model field, with the reference values (EfficientNet-B0 + 8-head fusion)."""
    c = ml_collections.ConfigDict()
    c.variant = "b0"            # 'b0' | 'tiny' (see VARIANTS)
    c.width_mult = 1.0          # extra channel multiplier on top of the variant
    c.depth_mult = 1.0          # extra depth multiplier on top of the variant
    # Layer implementation: 'plain' (histo_jax/models/plain.py: the readable definition, autodiff)
    # or 'xla_cpu' (histo_jax/models/xla_cpu.py: same numbers, several times faster on XLA:CPU);
    # 'auto' = xla_cpu on the CPU backend, plain elsewhere.
    c.impl = "auto"
    # Train-mode BatchNorm statistics. 'per_input' (the reference): each input scale is
    # normalised with its own batch statistics and the running averages take one update per
    # input, input 0 first, exactly as the original, which calls its encoder once per input.
    # 'joint' (a deviation from the reference): statistics pooled over all B x N crops of the
    # step, one running update per step. Eval mode is the same for both.
    c.bn_stats = "per_input"
    # How the shared encoder is called in a step (same numbers; a speed and memory choice):
    # 'folded' = once over all B x N crops (statistics grouped per input); once per input over
    # its B crops, as the original calls it, in one lax.scan ('scan'), unrolled ('unrolled':
    # N compiled copies) or 'staged': the train step as a chain of compiled programs (the
    # encoder's forward and backward each compiled once and called per input; the compile of
    # one input whatever N; steps.StagedTrainStep). 'auto' = staged in training on CPU
    # (folded on other backends or with bn_stats='joint'), scan in eval
    # (fusion.resolve_trunk, benchmarks/README.md).
    c.trunk = "auto"
    # Crops per encoder call in eval mode (crops are independent there; same numbers): -1 =
    # auto (on CPU about 8, cache-sized: faster and leaner; the whole batch elsewhere),
    # 0 = the whole batch, k > 0 = k (fusion.eval_chunk_size).
    c.eval_chunk = -1
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
