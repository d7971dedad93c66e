"""Building blocks with PyTorch semantics: convolutions, depthwise convolution, BatchNorm, dropout.

Layout is NHWC for activations and HWIO for kernels (depthwise kernels are (k, k, 1, C)).
Padding is always symmetric ``(k - 1) // 2`` (PyTorch ``padding=k // 2`` for odd k), also at
stride 2, where Flax's ``'SAME'`` would pad asymmetrically and break parity with PyTorch.

Modules hold no RNG streams: randomness is passed at call time as ``rngs`` (an ``nnx.Rngs``
with a ``dropout`` stream). Train / eval behaviour follows the NNX convention: attributes
``deterministic`` (dropout, stochastic depth) and ``use_running_average`` (BatchNorm) are
switched by ``module.train()`` / ``module.eval()``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEPTHWISE_IMPLS = ("auto", "shift", "grouped")


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of an HWIO kernel or an (in, out) matrix, as PyTorch counts them."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _initializer(sample: Callable[[np.random.Generator, tuple], np.ndarray],
                 jax_init: Callable) -> Callable:
    """An initializer drawing with numpy from the key's data (no XLA compile per shape, which
    makes eager model construction ~10x faster on CPU); under tracing (``nnx.eval_shape``,
    construction inside ``jit``) it falls back to the equivalent ``jax.random`` sampler."""

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(d) for d in shape)
        if isinstance(key, jax.core.Tracer):
            return jax_init(key, shape, dtype)
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        return jnp.asarray(sample(np.random.default_rng(seed), shape), dtype)

    return init


# torchvision's EfficientNet conv init: kaiming normal, fan_out (depthwise: C * k * k).
conv_init = _initializer(
    lambda rng, shape: rng.standard_normal(shape) * np.sqrt(2.0 / _fans(shape)[1]),
    jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def torch_linear_init(fan_in: int) -> Callable:
    """PyTorch ``nn.Linear`` default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return _initializer(
        lambda rng, shape: rng.uniform(-bound, bound, shape),
        lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))


# PyTorch xavier_uniform_ (nn.MultiheadAttention in_proj_weight), for an (in, out) matrix.
glorot_init = _initializer(
    lambda rng, shape: rng.uniform(-1, 1, shape) * np.sqrt(6.0 / sum(_fans(shape))),
    jax.nn.initializers.glorot_uniform())


def resolve_depthwise_impl(impl: str) -> str:
    """Map 'auto' to 'shift' on the CPU backend and 'grouped' elsewhere; validate the name."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"depthwise implementation {impl!r} is unknown (histo_jax/models/layers.py); "
            f"use one of {DEPTHWISE_IMPLS}.")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "grouped"
    return impl


def next_key(rngs: nnx.Rngs | None, where: str) -> jax.Array:
    """Draw a key from the ``dropout`` stream, or explain how to call the model in train mode."""
    if rngs is None:
        raise ValueError(
            f"{where} is in train mode and needs randomness (dropout / stochastic depth), but no "
            "rngs were given: call model(x, rngs=nnx.Rngs(dropout=key)), or switch to inference "
            "with model.eval().")
    return rngs.dropout()


def check_rngs(module: nnx.Module, rngs: nnx.Rngs | None, where: str) -> None:
    """Fail BEFORE any state update when ``module`` is in train mode with random ops and no rngs.

    A random op is a sub-module with ``deterministic == False`` and a positive ``drop_rate``,
    ``dropout`` or ``rate`` attribute.
    """
    if rngs is not None:
        return
    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Module) and getattr(m, "deterministic", True) is False and any(
                isinstance(getattr(m, a, 0.0), (int, float)) and getattr(m, a, 0.0) > 0.0
                for a in ("drop_rate", "dropout", "rate")):
            next_key(None, where)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout (PyTorch ``nn.Dropout`` in training mode)."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def stochastic_depth(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Row-mode stochastic depth (torchvision ``StochasticDepth(p, 'row')``): drop whole samples."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = (kernel_size - 1) // 2
    return ((p, p), (p, p))


def not_before(v: jax.Array, t: jax.Array) -> jax.Array:
    """``v``, made to depend on ``t`` for XLA's scheduler: ``v + 0 * max(t)``.

    Used in the hand-written backward passes. XLA:CPU's scheduler otherwise runs the whole
    input-gradient chain down to the stem first and the parameter gradients (which read the
    stored activations) last, so that every activation of the step stays alive until the end
    of the backward pass; tying each ``dx`` to its ``dw`` makes the backward go block by
    block. It also keeps recomputations from being hoisted to the start of the backward.
    ``0 * v`` is not simplified away for floats (it is NaN for non-finite ``v``). Neither a
    single element of ``t`` (XLA slices the producer down to it) nor ``sum(t)`` (XLA merges
    reductions and materialises their products) works, and ``optimization_barrier`` cannot
    be used: XLA:CPU removes barriers before scheduling.
    """
    return v + (jnp.max(t) * 0).astype(v.dtype)


@jax.custom_vjp
def pointwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of x (a 1x1 convolution); w is (C_in, C_out).

    Its backward computes the weight gradient as ``dot_general(x, dy)`` contracting the
    pixel axis, which XLA:CPU canonicalises by transposing ``x`` (a stored activation: a
    plain tiled transpose). Autodiff's form transposes ``dy`` instead, and XLA fuses the
    elementwise ops producing ``dy`` (the BatchNorm backward) into that transpose: a loop
    with strided reads over the largest tensors of the step, several times slower.
    """
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, w):
    return pointwise_matmul(x, w), (x, w)


def pointwise_backward(res, g):
    """Backward of :func:`pointwise_matmul`: ``res = (x, w)``, returns ``(dx, dw)``."""
    x, w = res
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    batch_axes = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((batch_axes, batch_axes), ((), ())))
    dx = not_before(dx, dw)
    return dx.astype(x.dtype), dw.astype(w.dtype)


pointwise_matmul.defvjp(_pointwise_fwd, pointwise_backward)


class Conv2d(nnx.Module):
    """Dense 2-D convolution, NHWC / HWIO, symmetric padding, optional bias."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, *,
                 use_bias: bool = False, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(conv_init(rngs.params(),
                                          (kernel_size, kernel_size, in_ch, out_ch)))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32)) if use_bias else None
        self.stride = stride
        self.kernel_size = kernel_size
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if self.kernel_size == 1 and self.stride == 1:
            # A pointwise conv is a matmul over channels; as a dot, XLA:CPU runs it and its
            # gradients with its matmul kernels instead of the (much slower) conv emitter.
            y = pointwise_matmul(x, kernel[0, 0])
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride, self.stride),
                padding=_pad(self.kernel_size), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def depthwise_grouped(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv as an XLA grouped convolution; kernel (k, k, 1, C)."""
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=_pad(k),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shift_sum(xp: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int],
               offset: int = 0) -> jax.Array:
    """sum_ij xp[:, offset + i :: stride, offset + j :: stride] * kernel[i, j, 0] (out_hw pixels)."""
    k = kernel.shape[0]
    n, c = xp.shape[0], xp.shape[-1]
    ho, wo = out_hw
    out = None
    for i in range(k):
        for j in range(k):
            a, b = offset + i, offset + j
            sl = jax.lax.slice(xp, (0, a, b, 0),
                               (n, a + stride * (ho - 1) + 1, b + stride * (wo - 1) + 1, c),
                               (1, stride, stride, 1))
            term = sl * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def shift_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    k = kernel.shape[0]
    p = (k - 1) // 2
    _, h, w, _ = x.shape
    ho = (h + 2 * p - k) // stride + 1
    wo = (w + 2 * p - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return _shift_sum(xp, kernel, stride, (ho, wo))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv as a sum of k*k shifted, strided slices times per-channel weights.

    Same numbers as :func:`depthwise_grouped`, much faster on XLA:CPU. Its backward pass is
    written out (custom VJP): the input gradient is the same shift-and-add over the
    zero-dilated output gradient with the flipped kernel (one fused loop), the kernel gradient
    k*k multiply-reductions; only ``x`` and the kernel are kept for the backward.
    """
    return shift_forward(x, kernel, stride)


def _shift_fwd(x, kernel, stride):
    return shift_forward(x, kernel, stride), (x, kernel)


def shift_backward(stride, res, g):
    """Backward of :func:`depthwise_shift`: ``res = (x, kernel)``, returns ``(dx, dkernel)``."""
    x, kernel = res
    k = kernel.shape[0]
    p = (k - 1) // 2
    n, h, w, c = x.shape
    ho, wo = g.shape[1:3]
    # d x: full correlation of the stride-dilated gradient with the flipped kernel.
    gd = jax.lax.pad(g, jnp.zeros((), g.dtype),
                     ((0, 0, 0), (k - 1, h + 2 * p - stride * (ho - 1) - 1, stride - 1),
                      (k - 1, w + 2 * p - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
    dx = _shift_sum(gd, kernel[::-1, ::-1], 1, (h, w), offset=p)
    # d kernel: per tap, the sum over batch and pixels of the shifted input times the gradient.
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    gf = g.astype(jnp.float32)
    taps = []
    for i in range(k):
        for j in range(k):
            sl = jax.lax.slice(xp, (0, i, j, 0),
                               (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                               (1, stride, stride, 1))
            taps.append(jnp.sum(sl.astype(jnp.float32) * gf, axis=(0, 1, 2)))
    dk = jnp.stack(taps).reshape(k, k, 1, c).astype(kernel.dtype)
    dx = not_before(dx, dk)
    return dx.astype(x.dtype), dk


depthwise_shift.defvjp(_shift_fwd, shift_backward)


class DepthwiseConv2d(nnx.Module):
    """Depthwise k x k convolution (no bias), kernel (k, k, 1, C), impl 'shift' or 'grouped'."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, *,
                 impl: str = "auto", dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(conv_init(rngs.params(), (kernel_size, kernel_size, 1, channels)))
        self.stride = stride
        self.impl = resolve_depthwise_impl(impl)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        fn = depthwise_shift if self.impl == "shift" else depthwise_grouped
        return fn(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride)


def bn_act_forward(x, scale, bias, eps, act):
    """Train-mode BatchNorm (+ SiLU) forward: ``(out float32, (mean, biased var, rstd))``."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    rstd = jax.lax.rsqrt(var + eps)
    y = (xf - mean) * (scale * rstd) + bias
    return (jax.nn.silu(y) if act else y), (mean, var, rstd)


def bn_act_recompute(x, mean, rstd, scale, bias, act):
    """The output of :func:`bn_act_forward` again, from its saved input and statistics, for a
    backward pass that keeps only ``x``. Written as ``x * a + b``: a form XLA cannot CSE with
    the forward's ``(x - mean) * a + bias`` (which would keep the forward output alive)."""
    a = scale * rstd
    y = x.astype(jnp.float32) * a + (bias - mean * a)
    return jax.nn.silu(y) if act else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                     act: bool) -> jax.Array:
    """Train-mode BatchNorm (batch statistics, biased variance) over all but the last axis,
    then SiLU if ``act``; float32 result.

    Its hand-written backward saves only ``x`` and two per-channel vectors and recomputes the
    normalised values (as PyTorch's fused kernels do), where autodiff would keep the centred
    input, the normalised and activated tensors and the sigmoid: less memory and fewer passes
    over the activations in the train step. Gradients equal autodiff's (tested).
    """
    return bn_act_forward(x, scale, bias, eps, act)[0]


def _bn_train_fwd(x, scale, bias, eps, act):
    out, (mean, _, rstd) = bn_act_forward(x, scale, bias, eps, act)
    return out, (x, mean, rstd, scale, bias)


def _bn_train_bwd(eps, act, res, g):
    return bn_act_backward(act, res, g)


def bn_act_backward(act, res, g):
    """Backward of train-mode BatchNorm (+ SiLU): ``res = (x, mean, rstd, scale, bias)``,
    returns ``(dx, dscale, dbias)``."""
    x, mean, rstd, scale, bias = res
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xf = x.astype(jnp.float32)
    dy = g.astype(jnp.float32)
    if act:
        y = (xf - mean) * rstd * scale + bias
        sig = jax.nn.sigmoid(y)
        dy = dy * (sig * (1.0 + y * (1.0 - sig)))
    dbias = jnp.sum(dy, axis=axes)
    # Written without a shared centred tensor ``x - mean``: XLA would CSE it with the
    # forward's, keep it as one more stored activation per BatchNorm, and compute it early
    # (N=1 train step: XLA temp memory 1.67 -> 1.42 GB).
    dscale = (jnp.sum(dy * xf, axis=axes) - mean * dbias) * rstd
    k = (dscale / n) * rstd
    dx = (scale * rstd) * (dy - (dbias / n) - (xf * k - mean * k))
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nnx.Module):
    """BatchNorm over all but the last axis with exact PyTorch ``BatchNorm2d`` semantics,
    optionally followed by SiLU (``bn(x, act=True)``, fused into one op in training).

    Training normalises with the biased batch variance and updates
    ``var <- (1 - momentum) * var + momentum * unbiased_batch_var`` (``momentum`` is PyTorch's,
    0.1). Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype: Any = jnp.float32, use_running_average: bool = False):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.eps = eps
        self.momentum = momentum
        self.dtype = dtype
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, act: bool = False) -> jax.Array:
        if self.use_running_average:
            mul = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
            y = (x.astype(jnp.float32) - self.mean[...]) * mul + self.bias[...]
            return (jax.nn.silu(y) if act else y).astype(self.dtype)
        # Running statistics: the same reductions as inside batch_norm_train (CSE can merge them).
        xf = jax.lax.stop_gradient(x).astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axis=axes)
        self.update_running_stats(mean, jnp.mean(jnp.square(xf - mean), axis=axes),
                                  xf.size // xf.shape[-1])
        y = batch_norm_train(x, self.scale[...], self.bias[...], self.eps, act)
        return y.astype(self.dtype)

    def update_running_stats(self, mean: jax.Array, var: jax.Array, n: int) -> None:
        """PyTorch's running-average update from a batch's mean and biased variance over
        ``n`` values per channel (the variance is made unbiased here)."""
        mean, var = jax.lax.stop_gradient((mean, var))
        m = self.momentum
        self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
        self.var[...] = (1.0 - m) * self.var[...] + m * var * (n / max(n - 1, 1))


class ConvBN(nnx.Module):
    """Conv2d (no bias) + BatchNorm + optional SiLU: torchvision ``Conv2dNormActivation``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, *,
                 act: bool = True, bn_eps: float = 1e-5, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = Conv2d(in_ch, out_ch, kernel_size, stride, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_ch, eps=bn_eps, dtype=dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x), act=self.act)
