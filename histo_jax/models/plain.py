"""The plain semantics of the layer ops: what the model computes, written to be read.

Every op has PyTorch's numerics: symmetric ``(k - 1) // 2`` padding on every convolution,
also at stride 2 (Flax's ``'SAME'`` pads asymmetrically there and breaks parity), and
BatchNorm with the biased batch variance in training and PyTorch's running-average update.
Gradients come from autodiff. :mod:`histo_jax.models.xla_cpu` reimplements some of these
ops for XLA:CPU with the same signatures and numbers; ``tests/test_models.py`` holds each
fast op, and the whole encoder's train step, equal to the plain one. To change what the
model computes, change it here (and its fast twin, or run with ``model.impl='plain'``).

Layout: NHWC activations, HWIO kernels (depthwise kernels (k, k, 1, C)).

**Grouped BatchNorm statistics.** A train-mode BatchNorm can normalise G groups of one
batch separately (``stat_groups``). The batch is (B, G) flattened row-major: row r belongs
to group r % G. The classifier folds its N input scales into the batch this way and,
like the reference (which calls its encoder once per input), normalises each scale with its
own statistics (G = N); the running averages then take N updates, group 0 first. G = 1 is
ordinary BatchNorm.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

f32 = jnp.float32


def symmetric_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = (kernel_size - 1) // 2
    return ((p, p), (p, p))


def pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
    """A 1x1 convolution as a matmul over the last axis: x (..., C_in), w (C_in, C_out)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Dense k x k convolution, kernel (k, k, C_in, C_out)."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=symmetric_padding(kernel.shape[0]),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise k x k convolution (XLA's grouped convolution), kernel (k, k, 1, C)."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=symmetric_padding(kernel.shape[0]),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


# ---- BatchNorm ------------------------------------------------------------------------------

def check_groups(rows: int, groups: int) -> None:
    if groups < 1 or rows % groups:
        raise ValueError(f"a batch of {rows} rows cannot hold {groups} statistics groups "
                         "(rows are (B, G) flattened; see histo_jax/models/plain.py).")


def group_sum(t: jax.Array, groups: int) -> jax.Array:
    """Sum of each group's rows over all but the channel axis: (B * G, ..., C) -> (G, C).

    One reduction per group over its rows ``t[g::G]`` (each row contiguous), so that the
    activations keep their shape: XLA:CPU handles reshaped (B, G, ...) views of them far
    worse (1.8x the memory and 2-3x the time of the N=4 train step)."""
    check_groups(t.shape[0], groups)
    axes = tuple(range(t.ndim - 1))
    return jnp.stack([jnp.sum(t[g::groups], axis=axes) for g in range(groups)])


def spread(s: jax.Array, x: jax.Array) -> jax.Array:
    """Per-group vectors (G, C) shaped to broadcast against the rows of ``x``."""
    if s.shape[0] == 1:
        return s.reshape((1,) * (x.ndim - 1) + s.shape[1:])
    rows = jnp.tile(s, (x.shape[0] // s.shape[0], 1))
    return rows.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + s.shape[1:])


def batch_stats(x: jax.Array, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of each group and channel, float32, (G, C) each."""
    xf = x.astype(f32)
    n = x.size // (groups * x.shape[-1])                                  # values per group
    mean = group_sum(xf, groups) / n
    var = group_sum(jnp.square(xf - spread(mean, x)), groups) / n
    return mean, var


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, act: bool,
                     groups: int = 1) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Train-mode BatchNorm, then SiLU if ``act``: each group normalised with its own batch
    statistics. Returns the float32 output and the statistics ``(mean, biased var)`` (G, C)."""
    mean, var = batch_stats(x, groups)
    a = scale * jax.lax.rsqrt(var + eps)                                  # (G, C)
    y = (x.astype(f32) - spread(mean, x)) * spread(a, x) + bias
    return (jax.nn.silu(y) if act else y), (mean, var)


def batch_norm_eval(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
                    var: jax.Array, eps: float, act: bool) -> jax.Array:
    """Eval-mode BatchNorm (running statistics), then SiLU if ``act``; float32."""
    a = scale * jax.lax.rsqrt(var + eps)
    y = (x.astype(f32) - mean) * a + bias
    return jax.nn.silu(y) if act else y


def running_update(running: jax.Array, stats: jax.Array, momentum: float) -> jax.Array:
    """PyTorch's running average, applied once per group in group order:
    ``running <- (1 - momentum) * running + momentum * stats[g]`` for g = 0, 1, ..."""
    for s in stats:
        running = (1.0 - momentum) * running + momentum * s
    return running


# ---- Squeeze-excitation ---------------------------------------------------------------------

def global_pool(x: jax.Array) -> jax.Array:
    """Spatial mean (B, H, W, C) -> (B, 1, 1, C), accumulated in float32."""
    return jnp.mean(x.astype(f32), axis=(1, 2), keepdims=True).astype(x.dtype)


def se_gate(params: tuple, pooled: jax.Array, dtype: Any, matmul=pointwise) -> jax.Array:
    """Squeeze-excitation gate from pooled features (B, 1, 1, C): 1x1 conv (bias) -> SiLU ->
    1x1 conv (bias) -> sigmoid. ``params`` = (reduce kernel, reduce bias, expand kernel,
    expand bias), kernels HWIO (1, 1, in, out); ``matmul``: a :func:`pointwise` twin."""
    k1, b1, k2, b2 = (p.astype(dtype) for p in params)
    h = jax.nn.silu(matmul(pooled, k1[0, 0]) + b1)
    return jax.nn.sigmoid(matmul(h, k2[0, 0]) + b2)
