"""EfficientNet-B0 (torchvision ``efficientnet_b0().features`` + global average pooling) in NNX.

Numerically equivalent to torchvision's implementation (symmetric padding, BatchNorm eps 1e-5,
squeeze-excitation to ``max(1, block_in // 4)`` channels, row-mode stochastic depth with rate
``stochastic_depth * block_index / num_blocks``, every block's draw from one key of the
``rngs`` given to the call), so PyTorch weights map one to one
(see :mod:`histo_jax.models.convert`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from histo_jax.models import layers, plain, xla_cpu
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

    def __init__(self, channels: int, squeeze: int, *, impl: str = "auto", dtype: Any,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=True, impl=impl, dtype=dtype, rngs=rngs)
        self.reduce = layers.Conv2d(channels, squeeze, 1, **kw)
        self.expand = layers.Conv2d(squeeze, channels, 1, **kw)
        self.dtype = dtype

    def params(self) -> tuple:
        return (self.reduce.kernel[...], self.reduce.bias[...], self.expand.kernel[...],
                self.expand.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * plain.se_gate(self.params(), plain.global_pool(x), self.dtype)


class MBConv(nnx.Module):
    """Inverted residual block: [1x1 expand] -> depthwise -> SE -> 1x1 project [+ residual].

    ``impl='plain'`` runs it module by module (the definition). With ``impl='xla_cpu'`` in
    train mode, the part between the expand conv and the project BatchNorm runs as
    :func:`histo_jax.models.xla_cpu.mbconv_core_train`, one op whose backward recomputes
    instead of storing (same numbers; tested against the plain path).
    """

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int, *,
                 drop_rate: float, impl: str, bn_eps: float, dtype: Any, rngs: nnx.Rngs):
        hidden = make_divisible(in_ch * expand)
        kw = dict(impl=impl, dtype=dtype)
        self.expand = (layers.ConvBN(in_ch, hidden, 1, bn_eps=bn_eps, rngs=rngs, **kw)
                       if hidden != in_ch else None)
        self.dw = layers.DepthwiseConv2d(hidden, kernel, stride, rngs=rngs, **kw)
        self.dw_bn = layers.BatchNorm(hidden, eps=bn_eps, **kw)
        self.se = SqueezeExcite(hidden, max(1, in_ch // 4), rngs=rngs, **kw)
        self.project = layers.ConvBN(hidden, out_ch, 1, act=False, bn_eps=bn_eps, rngs=rngs, **kw)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate
        self.impl = self.dw.impl
        self.deterministic = False

    @property
    def drops(self) -> bool:
        """Whether the block applies stochastic depth (train mode, residual, rate > 0)."""
        return self.use_residual and not self.deterministic and self.drop_rate > 0.0

    def __call__(self, x: jax.Array, drop_u: jax.Array | None = None,
                 stat_groups: int = 1) -> jax.Array:
        """``drop_u``: (B,) uniforms in [0, 1), the stochastic-depth draw (when :attr:`drops`)."""
        if self.impl == "xla_cpu" and not self.dw_bn.use_running_average:
            y = self.project.bn(self._fused_train_core(x, stat_groups), act=False,
                                stat_groups=stat_groups)
        else:
            y = x if self.expand is None else self.expand(x, stat_groups)
            y = self.dw_bn(self.dw(y), act=True, stat_groups=stat_groups)
            y = self.project(self.se(y), stat_groups)
        if not self.use_residual:
            return y
        if self.drops:
            y = layers.stochastic_depth(y, self.drop_rate,
                                        layers.require_draw(drop_u, "MBConv", "(B,)"))
        return y + x

    def _fused_train_core(self, x: jax.Array, stat_groups: int) -> jax.Array:
        dt = self.dw.dtype
        if self.expand is None:
            e, bn_expand, eps_expand = x.astype(dt), None, 0.0
        else:
            e = self.expand.conv(x)
            bn = self.expand.bn
            bn_expand, eps_expand = (bn.scale[...], bn.bias[...]), bn.eps
        spec = xla_cpu.CoreSpec(self.dw.stride, eps_expand, self.dw_bn.eps, stat_groups,
                                jnp.dtype(dt))
        p, stats = xla_cpu.mbconv_core_train(
            spec, e, bn_expand, self.dw.kernel[...], (self.dw_bn.scale[...], self.dw_bn.bias[...]),
            self.se.params(), self.project.conv.kernel[...][0, 0])
        if self.expand is not None:
            self.expand.bn.update_running_stats(*stats[0], e.size // (e.shape[-1] * stat_groups))
        self.dw_bn.update_running_stats(*stats[-1], p.size // (p.shape[-1] * stat_groups))
        return p


class EfficientNet(nnx.Module):
    """EfficientNet encoder: ``model(x)`` maps (B, H, W, 3) float images to pooled (B, F) features.

    ``F`` is 1280 for B0. ``model.features(x)`` returns the feature maps of the stem, of each of
    the 7 stages and of the head (9 NHWC maps). Train mode (the default after construction, like
    PyTorch) uses batch statistics and stochastic depth; ``model.eval()`` switches to inference.
    """

    def __init__(self, *, variant: str = "b0", width_mult: float = 1.0, depth_mult: float = 1.0,
                 stochastic_depth: float = 0.2, impl: str = "auto", bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1, dtype: Any = jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        w, d = resolve_multipliers(variant, width_mult, depth_mult)
        self.remat = remat
        self.stages = scaled_stages(w, d)
        self.dtype = jnp.dtype(dtype)
        stem_ch = self.stages[0].in_ch
        self.stem = layers.ConvBN(3, stem_ch, 3, 2, bn_eps=bn_eps, impl=impl, dtype=dtype,
                                  rngs=rngs)
        total = sum(s.repeats for s in self.stages)
        blocks, stage_ends, idx = [], [], 0
        for s in self.stages:
            for j in range(s.repeats):
                blocks.append(MBConv(
                    s.in_ch if j == 0 else s.out_ch, s.out_ch, s.expand, s.kernel,
                    s.stride if j == 0 else 1, drop_rate=stochastic_depth * idx / total,
                    impl=impl, bn_eps=bn_eps, dtype=dtype, rngs=rngs))
                idx += 1
            stage_ends.append(idx)
        self.blocks = nnx.List(blocks)
        self.stage_ends = tuple(stage_ends)
        self.num_features = 4 * self.stages[-1].out_ch
        self.head = layers.ConvBN(self.stages[-1].out_ch, self.num_features, 1, bn_eps=bn_eps,
                                  impl=impl, dtype=dtype, rngs=rngs)
        for bn in (m for _, m in nnx.iter_graph(self) if isinstance(m, layers.BatchNorm)):
            bn.momentum = bn_momentum

    def stage_blocks(self) -> list[list[MBConv]]:
        """Blocks grouped by stage (for weight mapping and inspection)."""
        starts = (0,) + self.stage_ends[:-1]
        return [list(self.blocks[a:b]) for a, b in zip(starts, self.stage_ends)]

    def features(self, x: jax.Array, rngs: nnx.Rngs | None = None,
                 stat_groups: int = 1) -> list[jax.Array]:
        """Feature maps after the stem, after each stage, and after the head (9 maps).

        ``stat_groups`` (train mode): the batch is (B, G) flattened and every BatchNorm
        normalises each of the G groups (rows r % G) with its own statistics (see
        :mod:`histo_jax.models.plain`); 1 pools the whole batch.

        With ``remat`` (train mode only) each MBConv block is rematerialised in the backward
        pass (``nnx.remat``): only block inputs are kept, for one extra forward pass. Since
        the blocks store little already (:func:`xla_cpu.mbconv_core_train`), this saves only
        ~8 % of the N=1 train step's memory and costs ~40 % of its time; off by default.
        """
        _check_images(x, 4, "EfficientNet")
        layers.check_rngs(self, rngs, "EfficientNet")
        # Every block's stochastic-depth draw from one key and one uniform call.
        u = layers.uniform_draws(rngs, {i: (x.shape[0],) for i, b in enumerate(self.blocks)
                                        if b.drops}, "EfficientNet")
        y = self.stem(x.astype(self.dtype), stat_groups)
        maps = [y]
        for i, block in enumerate(self.blocks):
            y = (_remat_block(block, y, u.get(i), stat_groups)
                 if self.remat and not block.deterministic else block(y, u.get(i), stat_groups))
            if i + 1 in self.stage_ends:
                maps.append(y)
        maps.append(self.head(y, stat_groups))
        return maps

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None,
                 stat_groups: int = 1) -> jax.Array:
        """Pooled features (B, num_features), float32."""
        fmap = self.features(x, rngs, stat_groups)[-1]
        return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))


@functools.partial(nnx.remat, static_argnums=(3,))
def _remat_block(block: MBConv, x: jax.Array, drop_u: jax.Array | None,
                 stat_groups: int) -> jax.Array:
    return block(x, drop_u, stat_groups)


def _check_images(x: jax.Array, ndim: int, where: str) -> None:
    if x.ndim != ndim or x.shape[-1] != 3:
        want = "(B, H, W, 3)" if ndim == 4 else "(B, N, H, W, 3)"
        raise ValueError(f"{where} expects images of shape {want} (channels last), got "
                         f"{tuple(x.shape)}.")
    if min(x.shape[-3:-1]) < 32:
        raise ValueError(f"{where} needs images of at least 32 x 32 pixels (5 stride-2 stages), "
                         f"got {x.shape[-3]} x {x.shape[-2]}.")
