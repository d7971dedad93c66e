"""EfficientNet-B0 (torchvision ``efficientnet_b0().features`` + global average pooling) in NNX.

Numerically equivalent to torchvision's implementation (symmetric padding, BatchNorm eps 1e-5,
squeeze-excitation to ``max(1, block_in // 4)`` channels, row-mode stochastic depth with rate
``stochastic_depth * block_index / num_blocks``), so PyTorch weights map one to one
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


def se_gate(params: tuple, pooled: jax.Array, dtype: Any) -> jax.Array:
    """Squeeze-excitation gate from pooled features (B, 1, 1, C): 1x1 conv (bias) -> SiLU ->
    1x1 conv (bias) -> sigmoid. ``params`` = (reduce kernel, reduce bias, expand kernel,
    expand bias), kernels HWIO (1, 1, in, out)."""
    k1, b1, k2, b2 = (p.astype(dtype) for p in params)
    h = jax.nn.silu(layers.pointwise_matmul(pooled, k1[0, 0]) + b1)
    return jax.nn.sigmoid(layers.pointwise_matmul(h, k2[0, 0]) + b2)


def _pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)


class SqueezeExcite(nnx.Module):
    """avg-pool -> 1x1 conv (bias) -> SiLU -> 1x1 conv (bias) -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int, *, dtype: Any, rngs: nnx.Rngs):
        self.reduce = layers.Conv2d(channels, squeeze, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.expand = layers.Conv2d(squeeze, channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def params(self) -> tuple:
        return (self.reduce.kernel[...], self.reduce.bias[...], self.expand.kernel[...],
                self.expand.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * se_gate(self.params(), _pool(x), self.dtype)


@dataclasses.dataclass(frozen=True)
class _CoreSpec:
    stride: int
    eps_expand: float
    eps_dw: float
    dtype: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mbconv_core_train(spec: _CoreSpec, e, bn_expand, kernel, bn_dw, se, w_project):
    """Train-mode middle of an MBConv block as one op with a hand-written backward:
    [BatchNorm+SiLU of the expand conv output ``e``] -> depthwise (shift) -> BatchNorm+SiLU
    -> squeeze-excitation -> 1x1 project conv. Returns the project conv output and the batch
    statistics ``((mean, var) expand [if any], (mean, var) depthwise)`` for the running
    averages (no gradient flows through them).

    Autodiff of the same chain stores every intermediate (the activated expand output, the
    activated depthwise output and the SE-scaled tensor, the widest tensors of the network)
    for the backward pass. This op stores only ``e`` and the depthwise output before its
    BatchNorm and recomputes the rest in the backward: about 40 % less activation memory
    in the train step for a few elementwise passes. Gradients equal autodiff's (tested).
    """
    return _core_forward(spec, e, bn_expand, kernel, bn_dw, se, w_project)[0]


def _core_forward(spec, e, bn_expand, kernel, bn_dw, se, w_project):
    dt = spec.dtype
    stats, saved = [], []
    a1 = e
    if bn_expand is not None:
        a1, (mean, var, rstd) = layers.bn_act_forward(e, *bn_expand, spec.eps_expand, True)
        a1 = a1.astype(dt)
        stats.append((mean, var))
        saved.append((mean, rstd))
    d = layers.shift_forward(a1, kernel.astype(dt), spec.stride)
    a2, (mean, var, rstd) = layers.bn_act_forward(d, *bn_dw, spec.eps_dw, True)
    a2 = a2.astype(dt)
    stats.append((mean, var))
    pooled = _pool(a2)
    gate = se_gate(se, pooled, dt)
    p = jax.lax.dot_general(a2 * gate, w_project.astype(dt), (((3,), (0,)), ((), ())))
    res = (e, saved, d, (mean, rstd), pooled, gate, bn_expand, kernel, bn_dw, se, w_project)
    return (p, tuple(stats)), res


def _core_bwd(spec, res, cts):
    g = cts[0]  # the statistics' cotangents are ignored: they feed only running averages
    e, saved, d, (mean2, rstd2), pooled, gate, bn_expand, kernel, bn_dw, se, w_project = res
    dt = spec.dtype
    f32 = jnp.float32
    # Recomputations are made to depend on the incoming gradient (``layers.not_before``) so that
    # XLA:CPU's scheduler does not hoist them to the start of the backward pass, where they
    # would all be alive at once.
    a2 = layers.bn_act_recompute(d, layers.not_before(mean2, g), rstd2, *bn_dw, True).astype(dt)
    # project: z = a2 * gate, p = z @ w
    dz, dw_project = layers.pointwise_backward((a2 * gate, w_project.astype(dt)), g)
    # squeeze-excitation: gate = se_gate(pool(a2)), z = a2 * gate
    dgate = jnp.sum(dz.astype(f32) * a2.astype(f32), axis=(1, 2), keepdims=True).astype(dt)
    _, se_vjp = jax.vjp(lambda p, s: se_gate(p, s, dt), se, pooled)
    dse, dpooled = se_vjp(dgate)
    hw = a2.shape[1] * a2.shape[2]
    da2 = dz.astype(f32) * gate.astype(f32) + dpooled.astype(f32) / hw
    dd, dscale2, dbias2 = layers.bn_act_backward(True, (d, mean2, rstd2, *bn_dw), da2)
    a1 = e
    if bn_expand is not None:
        (mean1, rstd1), = saved
        a1 = layers.bn_act_recompute(e, layers.not_before(mean1, dbias2), rstd1, *bn_expand, True)
        a1 = a1.astype(dt)
    da1, dkernel = layers.shift_backward(spec.stride, (a1, kernel.astype(dt)), dd.astype(dt))
    if bn_expand is None:
        de, dbn_expand = da1.astype(e.dtype), None
    else:
        de, dscale1, dbias1 = layers.bn_act_backward(True, (e, mean1, rstd1, *bn_expand), da1)
        de, dbn_expand = de.astype(e.dtype), (dscale1, dbias1)
    return (de, dbn_expand, dkernel.astype(kernel.dtype), (dscale2, dbias2),
            tuple(x.astype(p.dtype) for x, p in zip(dse, se)),
            dw_project.astype(w_project.dtype))


mbconv_core_train.defvjp(_core_forward, _core_bwd)



class MBConv(nnx.Module):
    """Inverted residual block: [1x1 expand] -> depthwise -> SE -> 1x1 project [+ residual].

    In train mode with the ``shift`` depthwise implementation (XLA:CPU), the part between
    the expand conv and the project BatchNorm runs as :func:`mbconv_core_train`, whose
    backward recomputes instead of storing; elsewhere module by module (same numbers;
    ``block.fused_train = False`` forces the module path).
    """

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
        self.fused_train = True

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.fused_train and not self.dw_bn.use_running_average and self.dw.impl == "shift":
            y = self.project.bn(self._train_core(x), act=False)
        else:
            y = x if self.expand is None else self.expand(x)
            y = self.project(self.se(self.dw_bn(self.dw(y), act=True)))
        if not self.use_residual:
            return y
        if not self.deterministic and self.drop_rate > 0.0:
            y = layers.stochastic_depth(y, self.drop_rate, layers.next_key(rngs, "EfficientNet"))
        return y + x

    def _train_core(self, x: jax.Array) -> jax.Array:
        dt = self.dw.dtype
        if self.expand is None:
            e, bn_expand, eps_expand = x.astype(dt), None, 0.0
        else:
            e = self.expand.conv(x)
            bn = self.expand.bn
            bn_expand, eps_expand = (bn.scale[...], bn.bias[...]), bn.eps
        spec = _CoreSpec(self.dw.stride, eps_expand, self.dw_bn.eps, jnp.dtype(dt))
        p, stats = mbconv_core_train(
            spec, e, bn_expand, self.dw.kernel[...], (self.dw_bn.scale[...], self.dw_bn.bias[...]),
            self.se.params(), self.project.conv.kernel[...][0, 0])
        if self.expand is not None:
            self.expand.bn.update_running_stats(*stats[0], e.size // e.shape[-1])
        n = p.size // p.shape[-1]
        self.dw_bn.update_running_stats(*stats[-1], n)
        return p


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
        pass (``nnx.remat``): only block inputs are kept, for one extra forward pass. Since
        the blocks store little already (:func:`mbconv_core_train`), this saves only ~8 % of
        the N=1 train step's memory and costs ~40 % of its time; off by default.
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
