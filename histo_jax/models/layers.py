"""NNX layers with PyTorch semantics: convolutions, depthwise convolution, BatchNorm, dropout.

Each layer computes the ops of :mod:`histo_jax.models.plain` (the readable definition of
what the model computes). With ``impl='xla_cpu'`` it runs their XLA:CPU implementations
from :mod:`histo_jax.models.xla_cpu` instead: the same numbers (tests hold them equal),
several times faster and leaner on XLA:CPU. ``impl='auto'`` (the model default) picks
'xla_cpu' on the CPU backend and 'plain' elsewhere.

Modules hold no RNG streams: randomness is passed at call time as ``rngs`` (an ``nnx.Rngs``
with a ``dropout`` stream). Train / eval behaviour follows the NNX convention: attributes
``deterministic`` (dropout, stochastic depth) and ``use_running_average`` (BatchNorm) are
switched by ``module.train()`` / ``module.eval()``. In train mode, BatchNorm takes
``stat_groups``: the number of groups of the batch normalised with their own statistics
(see :mod:`histo_jax.models.plain`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from histo_jax.models import plain, xla_cpu

IMPLS = ("auto", "plain", "xla_cpu")


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


def resolve_impl(impl: str) -> str:
    """Map 'auto' to 'xla_cpu' on the CPU backend and 'plain' elsewhere; validate the name."""
    if impl not in IMPLS:
        raise ValueError(
            f"layer implementation {impl!r} is unknown (config field model.impl, "
            f"histo_jax/models/layers.py); use one of {IMPLS}.")
    if impl == "auto":
        return "xla_cpu" if jax.default_backend() == "cpu" else "plain"
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


def uniform_draws(rngs: nnx.Rngs | None, shapes: dict[str, tuple[int, ...]],
                  where: str) -> dict[str, jax.Array]:
    """Uniforms in [0, 1) of the given shapes from ONE key of ``rngs``' dropout stream and
    ONE ``jax.random.uniform`` call (nothing drawn when ``shapes`` is empty).

    A module draws all its masks this way instead of a key and a hash per site: each
    ``jax.random`` call is a threefry hash that XLA compiles into its own kernels, and the
    per-site draws of EfficientNet-B0 and the fusion head (~40 calls) were a quarter of
    the train step's compile.
    """
    if not shapes:
        return {}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    u = jax.random.uniform(next_key(rngs, where), (sum(sizes.values()),))
    out, at = {}, 0
    for k, s in shapes.items():
        out[k] = u[at:at + sizes[k]].reshape(s)
        at += sizes[k]
    return out


def require_draw(u: jax.Array | None, where: str, shape: str) -> jax.Array:
    """``u``, or the error that explains a train-mode random op called without its draw."""
    if u is None:
        raise ValueError(f"{where} is in train mode with a random op and needs its draw, "
                         f"uniforms of shape {shape}; call it through its model, or switch "
                         "to inference with .eval().")
    return u


def dropout(x: jax.Array, rate: float, u: jax.Array) -> jax.Array:
    """Inverted dropout (PyTorch ``nn.Dropout`` in training mode); ``u``: uniforms in
    [0, 1) of ``x``'s shape, an element is kept where ``u < 1 - rate``."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    return jnp.where(u < 1.0 - rate, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def stochastic_depth(x: jax.Array, rate: float, u: jax.Array) -> jax.Array:
    """Row-mode stochastic depth (torchvision ``StochasticDepth(p, 'row')``): drop whole
    samples; ``u``: (B,) uniforms in [0, 1), sample b kept where ``u[b] < 1 - rate``."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = (u < 1.0 - rate).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Conv2d(nnx.Module):
    """Dense 2-D convolution, NHWC / HWIO, symmetric padding, optional bias."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, *,
                 use_bias: bool = False, impl: str = "auto", dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(conv_init(rngs.params(),
                                          (kernel_size, kernel_size, in_ch, out_ch)))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32)) if use_bias else None
        self.stride = stride
        self.kernel_size = kernel_size
        self.impl = resolve_impl(impl)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if self.kernel_size == 1 and self.stride == 1:
            # A pointwise conv is a matmul over channels; as a dot, XLA:CPU runs it and its
            # gradients with its matmul kernels instead of the (much slower) conv emitter.
            matmul = xla_cpu.pointwise_matmul if self.impl == "xla_cpu" else plain.pointwise
            y = matmul(x, kernel[0, 0])
        else:
            conv = xla_cpu.conv2d if self.impl == "xla_cpu" else plain.conv2d
            y = conv(x, kernel, self.stride)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class DepthwiseConv2d(nnx.Module):
    """Depthwise k x k convolution (no bias), kernel (k, k, 1, C)."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, *,
                 impl: str = "auto", dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(conv_init(rngs.params(), (kernel_size, kernel_size, 1, channels)))
        self.stride = stride
        self.impl = resolve_impl(impl)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        fn = xla_cpu.depthwise_shift if self.impl == "xla_cpu" else plain.depthwise_conv
        return fn(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride)


class BatchNorm(nnx.Module):
    """BatchNorm over all but the last axis with exact PyTorch ``BatchNorm2d`` semantics,
    optionally followed by SiLU (``bn(x, act=True)``, one op in training).

    Training normalises each of ``stat_groups`` groups of the batch with its own batch
    statistics (biased variance) and updates the running averages once per group, in group
    order: ``var <- (1 - momentum) * var + momentum * unbiased_batch_var`` (``momentum`` is
    PyTorch's, 0.1). Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 impl: str = "auto", dtype: Any = jnp.float32,
                 use_running_average: bool = False):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.eps = eps
        self.momentum = momentum
        self.impl = resolve_impl(impl)
        self.dtype = dtype
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, act: bool = False, stat_groups: int = 1) -> jax.Array:
        if self.use_running_average:
            y = plain.batch_norm_eval(x, self.scale[...], self.bias[...], self.mean[...],
                                      self.var[...], self.eps, act)
            return y.astype(self.dtype)
        norm = xla_cpu.batch_norm_train if self.impl == "xla_cpu" else plain.batch_norm_train
        y, (mean, var) = norm(x, self.scale[...], self.bias[...], self.eps, act, stat_groups)
        self.update_running_stats(mean, var, x.size // (x.shape[-1] * stat_groups))
        return y.astype(self.dtype)

    def update_running_stats(self, mean: jax.Array, var: jax.Array, n: int) -> None:
        """PyTorch's running-average update from per-group batch means and biased variances
        (G, C) over ``n`` values per channel and group (the variance is made unbiased here),
        one update per group in group order.

        ``set_value``, not ``v[...] = x``: Flax's indexed assignment compares the new
        value's ``.sharding``, which under a trace raises an error whose message scans the
        whole jaxpr (quadratic: 4.8 of the 6.4 s of tracing EfficientNet-B0's train step)."""
        mean, var = jax.lax.stop_gradient((mean, var))
        self.mean.set_value(plain.running_update(self.mean[...], mean, self.momentum))
        self.var.set_value(plain.running_update(self.var[...], var * (n / max(n - 1, 1)),
                                                self.momentum))


class ConvBN(nnx.Module):
    """Conv2d (no bias) + BatchNorm + optional SiLU: torchvision ``Conv2dNormActivation``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, *,
                 act: bool = True, bn_eps: float = 1e-5, impl: str = "auto",
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(in_ch, out_ch, kernel_size, stride, impl=impl, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_ch, eps=bn_eps, impl=impl, dtype=dtype)
        self.act = act

    def __call__(self, x: jax.Array, stat_groups: int = 1) -> jax.Array:
        return self.bn(self.conv(x), act=self.act, stat_groups=stat_groups)
