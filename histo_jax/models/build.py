"""Building models: the classifier from its config, and any model from a PyTorch file.

The one place where the modules (``efficientnet``, ``fusion``) meet the weight import
(``convert``): both are imported here and neither imports this module, so there is no
import cycle.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from histo_jax.models import convert
from histo_jax.models.config import DTYPES, get_model_config
from histo_jax.models.efficientnet import EfficientNet
from histo_jax.models.fusion import MultiInputClassifier


def build_model(model_cfg: ml_collections.ConfigDict, num_inputs: int,
                rngs: nnx.Rngs) -> MultiInputClassifier:
    """Build the classifier from ``get_model_config()`` fields; load ``model_cfg.pretrained``.

    ``pretrained``: 'none', 'imagenet' (torchvision IMAGENET1K_V1 encoder weights, downloaded
    and cached by :mod:`histo_jax.models.pretrained`) or a path to a PyTorch file (a backbone in
    torchvision or timm names, or a full reference ``MultiInputModule`` checkpoint).
    The model is returned in train mode (call ``.eval()`` for inference).
    """
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype {model_cfg.dtype!r} is not supported; use one of {DTYPES}.")
    dtype = jnp.dtype(model_cfg.dtype)
    # .get: configs saved before these fields existed (run workdirs of earlier versions).
    encoder = EfficientNet(
        variant=model_cfg.variant, width_mult=model_cfg.width_mult,
        depth_mult=model_cfg.depth_mult, stochastic_depth=model_cfg.stochastic_depth,
        impl=model_cfg.get("impl", "auto"), bn_eps=model_cfg.bn_eps,
        bn_momentum=model_cfg.bn_momentum, dtype=dtype,
        remat=bool(model_cfg.remat), rngs=rngs)
    model = MultiInputClassifier(
        num_inputs, encoder=encoder, embed_dim=model_cfg.embed_dim,
        num_heads=model_cfg.num_heads, ffn_dim=model_cfg.ffn_dim, dropout=model_cfg.dropout,
        attn_dropout=model_cfg.attn_dropout, num_classes=model_cfg.num_classes,
        ln_eps=model_cfg.ln_eps, bn_stats=model_cfg.get("bn_stats", "per_input"),
        trunk=model_cfg.get("trunk", "auto"), eval_chunk=model_cfg.get("eval_chunk", -1),
        dtype=dtype,
        rngs=rngs)
    pretrained = str(model_cfg.get("pretrained", "none") or "none")
    if pretrained != "none":
        convert.load_pretrained(model, pretrained)
    model.train()
    return model


def load_pytorch(path: str | os.PathLike, **model_overrides: Any
                 ) -> MultiInputClassifier | EfficientNet:
    """Load a PyTorch file into a histo_jax model in eval mode.

    * a reference ``MultiInputModule`` checkpoint -> :class:`MultiInputClassifier` (N, number of
      classes, embed_dim and ffn_dim inferred from the file): call on (B, N, H, W, 3) float32
      images, returns ``(logits, attention)``;
    * a torchvision / timm ``efficientnet_b0`` file -> :class:`EfficientNet`: call on
      (B, H, W, 3) float32 images, returns pooled (B, 1280) features.

    ``model_overrides`` are ``get_model_config()`` fields (e.g. ``dtype='bfloat16'``,
    ``impl='plain'``, ``variant='tiny'``, ``bn_stats='joint'``).
    """
    sd = dict(convert._strip_module_prefix(convert._read(path)))
    fmt = convert.detect_format(sd, str(path))
    cfg = get_model_config()
    unknown = sorted(set(model_overrides) - set(cfg.keys()))
    if unknown:
        raise TypeError(f"load_pytorch: unknown model fields {unknown}; valid: {sorted(cfg)}.")
    if fmt == "reference":
        idx = {int(m.group(1)) for k in sd if (m := re.match(r"attention_layers\.(\d+)\.", k))}
        if not idx:
            raise convert.WeightImportError(f"{path}: MultiInputModule checkpoint without "
                                    "attention_layers.* keys.")
        for field, key, axis in (("num_classes", "classifier.4.weight", 0),
                                 ("embed_dim", "proj.weight", 0), ("ffn_dim", "ffn.0.weight", 0)):
            if key in sd:
                cfg[field] = int(np.shape(sd[key])[axis])
        cfg.update(model_overrides)
        cfg.pretrained = "none"
        model = build_model(cfg, max(idx) + 1, nnx.Rngs(params=0))
    else:
        cfg.update(model_overrides)
        model = EfficientNet(
            variant=cfg.variant, width_mult=cfg.width_mult, depth_mult=cfg.depth_mult,
            stochastic_depth=cfg.stochastic_depth, impl=cfg.impl, bn_eps=cfg.bn_eps,
            bn_momentum=cfg.bn_momentum, dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(params=0))
    convert.load_state_dict(model, sd, str(path))
    model.eval()
    return model
