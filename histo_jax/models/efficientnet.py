"""EfficientNet-B0 (torchvision ``efficientnet_b0().features`` + global average pooling) in NNX.

Numerically equivalent to torchvision's implementation (symmetric padding, BatchNorm eps 1e-5,
squeeze-excitation to ``max(1, block_in // 4)`` channels, row-mode stochastic depth with rate
``stochastic_depth * block_index / num_blocks``), so PyTorch weights map one to one
(see :mod:`histo_jax.models.convert`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from histo_jax.models import layers
from histo_jax.models.config import resolve_multipliers


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One MBConv stage: expand ratio, kernel, stride, in / out channels, repeats."""
    expand: int
    kernel: int
    stride: int
    in_ch: int
    out_ch: int
    repeats: int


# torchvision / timm EfficientNet-B0 (expand, kernel, stride, in, out, repeats).
B0_STAGES = (
    StageSpec(1, 3, 1, 32, 16, 1),
    StageSpec(6, 3, 2, 16, 24, 2),
    StageSpec(6, 5, 2, 24, 40, 2),
    StageSpec(6, 3, 2, 40, 80, 3),
    StageSpec(6, 5, 1, 80, 112, 3),
    StageSpec(6, 5, 2, 112, 192, 4),
    StageSpec(6, 3, 1, 192, 320, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible`` (round to a multiple of 8, never below 90%)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def scaled_stages(width_mult: float = 1.0, depth_mult: float = 1.0) -> tuple[StageSpec, ...]:
    """B0 stages with torchvision's channel / depth scaling rules."""
    return tuple(
        StageSpec(s.expand, s.kernel, s.stride, make_divisible(s.in_ch * width_mult),
                  make_divisible(s.out_ch * width_mult), int(math.ceil(s.repeats * depth_mult)))
        for s in B0_STAGES)


class SqueezeExcite(nnx.Module):
    """avg-pool -> 1x1 conv (bias) -> SiLU -> 1x1 conv (bias) -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int, *, dtype: Any, rngs: nnx.Rngs):
        self.reduce = layers.Conv2d(channels, squeeze, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.expand = layers.Conv2d(squeeze, channels, 1, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = jax.nn.sigmoid(self.expand(jax.nn.silu(self.reduce(s))))
        return x * s


class MBConv(nnx.Module):
    """Inverted residual block: [1x1 expand] -> depthwise -> SE -> 1x1 project [+ residual]."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int, *,
                 drop_rate: float, depthwise: str, bn_eps: float, dtype: Any, rngs: nnx.Rngs):
        hidden = make_divisible(in_ch * expand)
        self.expand = (layers.ConvBN(in_ch, hidden, 1, bn_eps=bn_eps, dtype=dtype, rngs=rngs)
                       if hidden != in_ch else None)
        self.dw = layers.DepthwiseConv2d(hidden, kernel, stride, impl=depthwise, dtype=dtype,
                                         rngs=rngs)
        self.dw_bn = layers.BatchNorm(hidden, eps=bn_eps, dtype=dtype)
        self.se = SqueezeExcite(hidden, max(1, in_ch // 4), dtype=dtype, rngs=rngs)
        self.project = layers.ConvBN(hidden, out_ch, 1, act=False, bn_eps=bn_eps, dtype=dtype,
                                     rngs=rngs)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate
        self.deterministic = False

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        y = x if self.expand is None else self.expand(x)
        y = self.dw_bn(self.dw(y), act=True)
        y = self.project(self.se(y))
        if not self.use_residual:
            return y
        if not self.deterministic and self.drop_rate > 0.0:
            y = layers.stochastic_depth(y, self.drop_rate, layers.next_key(rngs, "EfficientNet"))
        return y + x


class EfficientNet(nnx.Module):
    """EfficientNet encoder: ``model(x)`` maps (B, H, W, 3) float images to pooled (B, F) features.

    ``F`` is 1280 for B0. ``model.features(x)`` returns the feature maps of the stem, of each of
    the 7 stages and of the head (9 NHWC maps). Train mode (the default after construction, like
    PyTorch) uses batch statistics and stochastic depth; ``model.eval()`` switches to inference.
    """

    def __init__(self, *, variant: str = "b0", width_mult: float = 1.0, depth_mult: float = 1.0,
                 stochastic_depth: float = 0.2, depthwise: str = "auto", bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1, dtype: Any = jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        w, d = resolve_multipliers(variant, width_mult, depth_mult)
        self.remat = remat
        self.stages = scaled_stages(w, d)
        self.dtype = jnp.dtype(dtype)
        stem_ch = self.stages[0].in_ch
        self.stem = layers.ConvBN(3, stem_ch, 3, 2, bn_eps=bn_eps, dtype=dtype, rngs=rngs)
        total = sum(s.repeats for s in self.stages)
        blocks, stage_ends, idx = [], [], 0
        for s in self.stages:
            for j in range(s.repeats):
                blocks.append(MBConv(
                    s.in_ch if j == 0 else s.out_ch, s.out_ch, s.expand, s.kernel,
                    s.stride if j == 0 else 1, drop_rate=stochastic_depth * idx / total,
                    depthwise=depthwise, bn_eps=bn_eps, dtype=dtype, rngs=rngs))
                idx += 1
            stage_ends.append(idx)
        self.blocks = nnx.List(blocks)
        self.stage_ends = tuple(stage_ends)
        self.num_features = 4 * self.stages[-1].out_ch
        self.head = layers.ConvBN(self.stages[-1].out_ch, self.num_features, 1, bn_eps=bn_eps,
                                  dtype=dtype, rngs=rngs)
        for bn in (m for _, m in nnx.iter_graph(self) if isinstance(m, layers.BatchNorm)):
            bn.momentum = bn_momentum

    def stage_blocks(self) -> list[list[MBConv]]:
        """Blocks grouped by stage (for weight mapping and inspection)."""
        starts = (0,) + self.stage_ends[:-1]
        return [list(self.blocks[a:b]) for a, b in zip(starts, self.stage_ends)]

    def features(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        """Feature maps after the stem, after each stage, and after the head (9 maps).

        With ``remat`` (train mode only) each MBConv block is rematerialised in the backward
        pass (``nnx.remat``): only block inputs are kept, which cuts the activation memory of a
        train step several-fold for one extra forward pass.
        """
        _check_images(x, 4, "EfficientNet")
        layers.check_rngs(self, rngs, "EfficientNet")
        y = self.stem(x.astype(self.dtype))
        maps = [y]
        for i, block in enumerate(self.blocks):
            y = (_remat_block(block, y, rngs) if self.remat and not block.deterministic
                 else block(y, rngs))
            if i + 1 in self.stage_ends:
                maps.append(y)
        maps.append(self.head(y))
        return maps

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Pooled features (B, num_features), float32."""
        fmap = self.features(x, rngs)[-1]
        return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))


@nnx.remat
def _remat_block(block: MBConv, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    return block(x, rngs)


def _check_images(x: jax.Array, ndim: int, where: str) -> None:
    if x.ndim != ndim or x.shape[-1] != 3:
        want = "(B, H, W, 3)" if ndim == 4 else "(B, N, H, W, 3)"
        raise ValueError(f"{where} expects images of shape {want} (channels last), got "
                         f"{tuple(x.shape)}.")
    if min(x.shape[-3:-1]) < 32:
        raise ValueError(f"{where} needs images of at least 32 x 32 pixels (5 stride-2 stages), "
                         f"got {x.shape[-3]} x {x.shape[-2]}.")
