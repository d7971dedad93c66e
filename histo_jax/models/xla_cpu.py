"""The XLA:CPU fast path: ops of :mod:`histo_jax.models.plain` rewritten for XLA:CPU.

Same signatures and the same numbers as their plain versions: ``tests/test_models.py``
holds every op here and the MBConv block equal to the plain ones, and the encoder's train
step on this path equal to the reference structure (one encoder call per input). Nothing
here changes what the model computes, only how XLA:CPU computes it (``model.impl``:
'xla_cpu', the default on the CPU backend; 'plain' elsewhere):

* depthwise convolution as k*k shifted slices times per-channel weights (XLA:CPU's grouped
  convolution is ~6x slower, its gradient ~10x);
* hand-written backward passes that store less and recompute: BatchNorm (+ SiLU), the 1x1
  convolution, the depthwise convolution, and the middle of an MBConv block as ONE op
  (:func:`mbconv_core_train`);
* backward passes shaped for XLA:CPU's kernels: the depthwise kernel gradient as one
  variadic reduction over all k*k taps (:func:`kernel_grad`), the stride-2 depthwise input
  gradient by pixel parity instead of over a zero-dilated gradient, the 1x1 weight gradient of
  large layers as a batch of two half-products that YNNPACK runs on both cores
  (:func:`weight_grad`), the stem's kernel gradient as im2col and that product
  (:func:`conv2d`);
* scheduling ties (:func:`not_before`) that make XLA:CPU's scheduler run the backward pass
  block by block instead of keeping every activation alive to its end.

Train-mode BatchNorm statistics are grouped as in :mod:`histo_jax.models.plain` (``groups``:
the batch is (B, G) flattened, one set of statistics per group). Measured effects of each
piece: ``benchmarks/README.md``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from histo_jax.models import plain
from histo_jax.models.plain import f32, group_sum, spread


def not_before(v: Any, t: jax.Array) -> Any:
    """``v`` (an array or a tuple of arrays), made to depend on ``t`` for XLA's scheduler:
    ``v + 0 * (max(t) + min(t))``.

    XLA:CPU's scheduler otherwise runs the whole input-gradient chain down to the stem first
    and the parameter gradients (which read the stored activations) last, so that every
    activation of the step stays alive until the end of the backward pass; tying each ``dx``
    to its ``dw`` makes the backward go block by block. It also keeps recomputations from
    being hoisted to the start of the backward. ``0 * v`` is not simplified away for floats
    (it is NaN for non-finite ``v``). Neither a single element of ``t`` (XLA slices the
    producer down to it) nor ``sum(t)`` (XLA merges reductions and materialises their
    products) works, and ``optimization_barrier`` cannot be used: XLA:CPU removes barriers
    before scheduling.

    Max and min are ONE variadic reduction: XLA:CPU rewrites a plain reduction over more
    than 32 values into a tree of reduce-windows, a chain of 2-5 kernels (a single max over
    ``(t, t)`` is merged back into one). The EfficientNet-B0 backward program had ~700 such
    kernels, a third of its kernels, for ~80 ties; now ~80.
    """
    flat = t.reshape(-1)
    inf = jnp.array(jnp.inf, t.dtype)
    top, low = jax.lax.reduce((flat, flat), (-inf, inf), _max_min, (0,))
    zero = (top + low) * 0
    return jax.tree.map(lambda u: u + zero.astype(u.dtype), v)


def _max_min(a, b):
    return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _add(a, b):
    return tuple(u + v for u, v in zip(a, b))


# ---- 1x1 convolution ------------------------------------------------------------------------

@jax.custom_vjp
def pointwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """:func:`plain.pointwise` with a backward that computes the weight gradient as
    ``dot_general(x, dy)`` contracting the pixel axis, which XLA:CPU canonicalises by
    transposing ``x`` (a stored activation: a plain tiled transpose). Autodiff's form
    transposes ``dy`` instead, and XLA fuses the elementwise ops producing ``dy`` (the
    BatchNorm backward) into that transpose: a loop with strided reads over the largest
    tensors of the step, several times slower."""
    return plain.pointwise(x, w)


def _pointwise_fwd(x, w):
    return plain.pointwise(x, w), (x, w)


# Pixels (rows of the weight-gradient product) from which that product is split in two.
SPLIT_WEIGHT_GRAD_ROWS = 16384


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """``dot_general(x, g)`` contracting every axis but the channels: the 1x1 convolution's
    weight gradient (C_in, C_out), float32 accumulation.

    With many pixels (at least :data:`SPLIT_WEIGHT_GRAD_ROWS`, an even number), the pixels
    are split in two halves, multiplied as a batch of two and the two products added.
    YNNPACK parallelises a matmul over its output tiles, and this output is small (e.g.
    16 x 96) with a long contraction (313,600 pixels at 112 x 112), so one product runs
    almost on one core; a batch of two gives each core its half: 1.3-4.5x faster for the
    layers at 28 x 28 px and above on 2 cores (benchmarks/README.md).
    """
    if _split(x):
        halves = jax.lax.dot_general(_halves(x), _halves(g), (((1,), (1,)), ((0,), (0,))),
                                     preferred_element_type=f32)
        return halves[0] + halves[1]
    axes = tuple(range(x.ndim - 1))
    return jax.lax.dot_general(x, g, ((axes, axes), ((), ())), preferred_element_type=f32)


def _split(t: jax.Array) -> bool:
    """Whether :func:`weight_grad` splits the pixels (rows) of ``t`` in two halves."""
    rows = t.size // t.shape[-1]
    return rows >= SPLIT_WEIGHT_GRAD_ROWS and rows % 2 == 0


def _halves(t: jax.Array) -> jax.Array:
    """``t`` as (2, rows / 2, C), the two halves of its pixels."""
    return t.reshape(2, t.size // (2 * t.shape[-1]), t.shape[-1])


def pointwise_backward(res, g):
    """Backward of :func:`pointwise_matmul`: ``res = (x, w)``, returns ``(dx, dw)``.

    ``dx`` is computed from ``g`` in the shape :func:`weight_grad` gives it: with two
    shapes, XLA computed and wrote ``g``'s producer (a BatchNorm backward) once per shape."""
    x, w = res
    if _split(g):  # a batch of two, as XLA would otherwise fold the halves into rows
        dx = jax.lax.dot_general(_halves(g), jnp.broadcast_to(w, (2, *w.shape)),
                                 (((2,), (2,)), ((0,), (0,))))
    else:
        dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    dx = dx.reshape(*g.shape[:-1], w.shape[0])
    dw = weight_grad(x, g)
    dx = not_before(dx, dw)
    return dx.astype(x.dtype), dw.astype(w.dtype)


pointwise_matmul.defvjp(_pointwise_fwd, pointwise_backward)


# ---- k x k taps (the stem's im2col, the depthwise shift-and-add and its kernel gradient) ----

def _pad_same(x: jax.Array, k: int) -> jax.Array:
    """The symmetric padding of :func:`plain.conv2d` / :func:`plain.depthwise_conv`."""
    p = (k - 1) // 2
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _tap(xp: jax.Array, a: int, b: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """``xp[:, a::stride, b::stride]``, ``out_hw`` pixels: one tap's shifted, strided view."""
    n, c = xp.shape[0], xp.shape[-1]
    ho, wo = out_hw
    return jax.lax.slice(xp, (0, a, b, 0),
                         (n, a + stride * (ho - 1) + 1, b + stride * (wo - 1) + 1, c),
                         (1, stride, stride, 1))


# ---- Dense k x k convolution (the stem) -----------------------------------------------------

def patches(x: jax.Array, k: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """im2col: (N, Ho, Wo, k*k*C), channel index (i * k + j) * C + c, the symmetric padding
    of :func:`plain.conv2d`."""
    xp = _pad_same(x, k)
    return jnp.concatenate([_tap(xp, i, j, stride, out_hw)
                            for i in range(k) for j in range(k)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """:func:`plain.conv2d` whose kernel gradient is im2col and one matmul
    (:func:`weight_grad`): for the stem (3 -> 32 channels at 112 x 112 px), XLA:CPU's
    convolution kernel gradient takes 3-4x as long. The input gradient is autodiff's."""
    return plain.conv2d(x, kernel, stride)


def _conv2d_fwd(x, kernel, stride):
    return plain.conv2d(x, kernel, stride), (x, kernel)


def conv2d_backward(stride, res, g):
    """Backward of :func:`conv2d`: ``res = (x, kernel)``, returns ``(dx, dkernel)``."""
    x, kernel = res
    dk = weight_grad(patches(x, kernel.shape[0], stride, g.shape[1:3]), g)
    (dx,) = jax.vjp(lambda x: plain.conv2d(x, kernel, stride), x)[1](g)
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, conv2d_backward)


# ---- Depthwise convolution ------------------------------------------------------------------

def _shift_sum(xp: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int],
               offset: int = 0) -> jax.Array:
    """sum_ij xp[:, offset + i :: stride, offset + j :: stride] * kernel[i, j, 0]
    (``out_hw`` pixels)."""
    k = kernel.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            term = _tap(xp, offset + i, offset + j, stride, out_hw) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def shift_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """:func:`plain.depthwise_conv` as a sum of k*k shifted, strided slices."""
    k = kernel.shape[0]
    p = (k - 1) // 2
    _, h, w, _ = x.shape
    ho = (h + 2 * p - k) // stride + 1
    wo = (w + 2 * p - k) // stride + 1
    return _shift_sum(_pad_same(x, k), kernel, stride, (ho, wo))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """:func:`plain.depthwise_conv` as a shift-and-add, with a written-out backward: the
    input gradient is the same shift-and-add over the zero-dilated output gradient with the
    flipped kernel (one fused loop; at stride 2 on even sizes, by input-pixel parity
    without the dilation: :func:`_input_grad_stride2`), the kernel gradient k*k
    multiply-reductions; only ``x`` and the kernel are kept for the backward."""
    return shift_forward(x, kernel, stride)


def _shift_fwd(x, kernel, stride):
    return shift_forward(x, kernel, stride), (x, kernel)


def kernel_grad(x: jax.Array, g: jax.Array, k: int, stride: int) -> jax.Array:
    """The depthwise kernel gradient, (k*k, C) float32: per tap (i, j), the sum over batch and
    pixels of the shifted input times the output gradient ``g``.

    All k*k taps are ONE variadic reduction over the pixel axes, its operands the products
    of shifted slices with ``g``, so that XLA:CPU reads ``x`` and ``g`` once, in one loop
    that it parallelises over the batch; the per-sample partial sums (N, C) are then added,
    all taps again in one variadic reduction (one kernel where a sum per tap made k*k).
    One reduction per tap (YNNPACK's, which cannot take a slice as operand, so XLA first
    copies each shifted slice out) read both tensors k*k times: 5-10x slower per layer
    (benchmarks/README.md).
    """
    xp = _pad_same(x, k)
    gf = g.astype(f32)
    prods = tuple(_tap(xp, i, j, stride, g.shape[1:3]).astype(f32) * gf
                  for i in range(k) for j in range(k))
    zeros = (jnp.zeros((), f32),) * len(prods)
    partial = jax.lax.reduce(prods, zeros, _add, (1, 2))
    return jnp.stack(jax.lax.reduce(partial, zeros, _add, (0,)))


def shift_backward(stride, res, g):
    """Backward of :func:`depthwise_shift`: ``res = (x, kernel)``, returns ``(dx, dkernel)``."""
    x, kernel = res
    k = kernel.shape[0]
    p = (k - 1) // 2
    _, h, w, c = x.shape
    ho, wo = g.shape[1:3]
    if stride == 2 and h % 2 == 0 and w % 2 == 0:
        dx = _input_grad_stride2(g, kernel, (h, w))
    else:
        # d x: full correlation of the stride-dilated gradient with the flipped kernel.
        gd = jax.lax.pad(g, jnp.zeros((), g.dtype),
                         ((0, 0, 0), (k - 1, h + 2 * p - stride * (ho - 1) - 1, stride - 1),
                          (k - 1, w + 2 * p - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
        dx = _shift_sum(gd, kernel[::-1, ::-1], 1, (h, w), offset=p)
    dk = kernel_grad(x, g, k, stride).reshape(k, k, 1, c).astype(kernel.dtype)
    dx = not_before(dx, dk)
    return dx.astype(x.dtype), dk


def _phase_taps(k: int, parity: int) -> list[tuple[int, int]]:
    """Stride 2, one axis: the taps ``t`` reaching input pixels ``2q + parity`` and the
    output-gradient offset ``d`` they read: ``dx[2q + parity] = sum g[q + d] * w[t]``."""
    p = (k - 1) // 2
    return [(t, (parity + p - t) // 2) for t in range(k) if (parity + p - t) % 2 == 0]


def _input_grad_stride2(g: jax.Array, kernel: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """The input gradient of a stride-2 depthwise convolution (even ``hw``), by input-pixel
    parity: each of the four parity classes of ``dx`` is a shift-and-add of ``g`` over the
    taps that reach it, and the four are interleaved. The same sums as the shift-and-add over
    the zero-dilated gradient, without that 4x larger tensor of mostly zeros (N=1 train step:
    129 MB at the backward's peak) and its multiplications by zero."""
    k, (q, r) = kernel.shape[0], (hw[0] // 2, hw[1] // 2)
    offsets = [d for parity in (0, 1) for _, d in _phase_taps(k, parity)]
    lo = max(0, -min(offsets))
    hi_h = max(0, q - 1 + max(offsets) - (g.shape[1] - 1))
    hi_w = max(0, r - 1 + max(offsets) - (g.shape[2] - 1))
    gp = jnp.pad(g, ((0, 0), (lo, hi_h), (lo, hi_w), (0, 0)))
    n, c = g.shape[0], g.shape[-1]

    def phase(a, b):
        out = None
        for ti, di in _phase_taps(k, a):
            for tj, dj in _phase_taps(k, b):
                tap = jax.lax.slice(gp, (0, lo + di, lo + dj, 0), (n, lo + di + q, lo + dj + r, c))
                term = tap * kernel[ti, tj, 0]
                out = term if out is None else out + term
        return out

    rows = [jnp.stack([phase(a, 0), phase(a, 1)], axis=3) for a in (0, 1)]   # (N, Q, R, 2, C)
    return jnp.stack(rows, axis=2).reshape(n, 2 * q, 2 * r, c)


depthwise_shift.defvjp(_shift_fwd, shift_backward)


# ---- Train-mode BatchNorm (+ SiLU) ----------------------------------------------------------

def bn_act_forward(x, scale, bias, eps, act, groups):
    """:func:`plain.batch_norm_train`, also returning ``rstd``: ``(out, (mean, var, rstd))``.

    The output is computed as ``x * a + b`` (:func:`bn_act_recompute`), not from the centred
    ``x - mean``: XLA would share that tensor between the variance and the output and write
    it out whole, a write and a read of every BatchNorm input more (EfficientNet-B0 train
    forward, N=1: 10.1 -> 8.8 GB accessed); alone, it is fused into the variance's
    reduction."""
    mean, var = plain.batch_stats(x, groups)
    rstd = jax.lax.rsqrt(var + eps)
    return bn_act_recompute(x, mean, rstd, scale, bias, act), (mean, var, rstd)


def bn_act_recompute(x, mean, rstd, scale, bias, act):
    """The output of :func:`bn_act_forward` again, from its saved input and statistics, for a
    backward pass that keeps only ``x``, in the forward's form ``x * a + b``. Its callers in a
    backward pass tie ``mean`` and ``rstd`` to the incoming gradient (:func:`not_before`), so
    that XLA cannot CSE ``x * a`` or the output with the forward's (which would keep a
    forward tensor alive until the backward, where one program holds both)."""
    a = scale * rstd                                                      # (G, C)
    y = x.astype(f32) * spread(a, x) + spread(bias - mean * a, x)
    return jax.nn.silu(y) if act else y


def bn_act_backward(act, groups, res, g):
    """Backward of train-mode BatchNorm (+ SiLU): ``res = (x, mean, rstd, scale, bias)``
    (statistics (G, C)), returns ``(dx, dscale, dbias)``."""
    x, mean, rstd, scale, bias = res
    xf, dy = x.astype(f32), g.astype(f32)
    n = x.size // (groups * x.shape[-1])                                  # values per group
    m_, r_ = spread(mean, x), spread(rstd, x)
    if act:
        y = (xf - m_) * r_ * scale + bias
        sig = jax.nn.sigmoid(y)
        dy = dy * (sig * (1.0 + y * (1.0 - sig)))
    dbias = group_sum(dy, groups)                                         # (G, C)
    # Written without a shared centred tensor ``x - mean``: XLA would CSE it with the
    # forward's, keep it as one more stored activation per BatchNorm, and compute it early
    # (N=1 train step: XLA temp memory 1.67 -> 1.42 GB).
    dscale = (group_sum(dy * xf, groups) - mean * dbias) * rstd
    k = spread((dscale / n) * rstd, x)
    dx = spread(scale * rstd, x) * (dy - spread(dbias / n, x) - (xf * k - m_ * k))
    return dx.astype(x.dtype), jnp.sum(dscale, 0), jnp.sum(dbias, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, act: bool,
                     groups: int = 1):
    """:func:`plain.batch_norm_train` with a hand-written backward that saves only ``x`` and
    per-channel vectors and recomputes the normalised values (as PyTorch's fused kernels
    do), where autodiff keeps the centred input, the normalised and activated tensors and the
    sigmoid. No gradient flows into the returned statistics (they feed running averages)."""
    out, (mean, var, _) = bn_act_forward(x, scale, bias, eps, act, groups)
    return out, (mean, var)


def _bn_train_fwd(x, scale, bias, eps, act, groups):
    out, (mean, var, rstd) = bn_act_forward(x, scale, bias, eps, act, groups)
    return (out, (mean, var)), (x, mean, rstd, scale, bias)


def _bn_train_bwd(eps, act, groups, res, cts):
    return bn_act_backward(act, groups, res, cts[0])


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


# ---- The middle of an MBConv block as one op ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """Static arguments of :func:`mbconv_core_train`."""
    stride: int
    eps_expand: float
    eps_dw: float
    groups: int
    dtype: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mbconv_core_train(spec: CoreSpec, e, bn_expand, kernel, bn_dw, se, w_project):
    """Train-mode middle of an MBConv block as one op with a hand-written backward:
    [BatchNorm+SiLU of the expand conv output ``e``] -> depthwise (shift) -> BatchNorm+SiLU
    -> squeeze-excitation -> 1x1 project conv. The plain version is the block's module path
    (``MBConv`` with ``impl='plain'``). Returns the project conv output and the batch
    statistics ``((mean, var) expand [if any], (mean, var) depthwise)``, (G, C) each, for the
    running averages (no gradient flows through them).

    Autodiff of the same chain stores every intermediate (the activated expand output, the
    activated depthwise output and the SE-scaled tensor, the widest tensors of the network).
    This op stores only ``e`` and the depthwise output before its BatchNorm and recomputes
    the rest in the backward: about 40 % less activation memory in the train step for a few
    elementwise passes.
    """
    return _core_forward(spec, e, bn_expand, kernel, bn_dw, se, w_project)[0]


def _core_forward(spec, e, bn_expand, kernel, bn_dw, se, w_project):
    dt, g = spec.dtype, spec.groups
    stats, saved = [], []
    a1 = e
    if bn_expand is not None:
        a1, (mean, var, rstd) = bn_act_forward(e, *bn_expand, spec.eps_expand, True, g)
        a1 = a1.astype(dt)
        stats.append((mean, var))
        saved.append((mean, rstd))
    d = shift_forward(a1, kernel.astype(dt), spec.stride)
    a2, (mean, var, rstd) = bn_act_forward(d, *bn_dw, spec.eps_dw, True, g)
    a2 = a2.astype(dt)
    stats.append((mean, var))
    pooled = plain.global_pool(a2)
    gate = plain.se_gate(se, pooled, dt, pointwise_matmul)
    p = jax.lax.dot_general(a2 * gate, w_project.astype(dt), (((3,), (0,)), ((), ())))
    res = (e, saved, d, (mean, rstd), pooled, gate, bn_expand, kernel, bn_dw, se, w_project)
    return (p, tuple(stats)), res


def _core_bwd(spec, res, cts):
    g = cts[0]  # the statistics' cotangents are ignored: they feed only running averages
    e, saved, d, (mean2, rstd2), pooled, gate, bn_expand, kernel, bn_dw, se, w_project = res
    dt, groups = spec.dtype, spec.groups
    # Recomputations are made to depend on the incoming gradient (``not_before``) so that
    # XLA:CPU's scheduler does not hoist them to the start of the backward pass, where they
    # would all be alive at once.
    a2 = bn_act_recompute(d, *not_before((mean2, rstd2), g), *bn_dw, True).astype(dt)
    # project: z = a2 * gate, p = z @ w
    dz, dw_project = pointwise_backward((a2 * gate, w_project.astype(dt)), g)
    # squeeze-excitation: gate = se_gate(pool(a2)), z = a2 * gate
    dgate = jnp.sum(dz.astype(f32) * a2.astype(f32), axis=(1, 2), keepdims=True).astype(dt)
    _, se_vjp = jax.vjp(lambda p, s: plain.se_gate(p, s, dt, pointwise_matmul), se, pooled)
    dse, dpooled = se_vjp(dgate)
    hw = a2.shape[1] * a2.shape[2]
    da2 = dz.astype(f32) * gate.astype(f32) + dpooled.astype(f32) / hw
    dd, dscale2, dbias2 = bn_act_backward(True, groups, (d, mean2, rstd2, *bn_dw), da2)
    a1 = e
    if bn_expand is not None:
        (mean1, rstd1), = saved
        a1 = bn_act_recompute(e, *not_before((mean1, rstd1), dbias2), *bn_expand, True)
        a1 = a1.astype(dt)
    da1, dkernel = shift_backward(spec.stride, (a1, kernel.astype(dt)), dd.astype(dt))
    if bn_expand is None:
        de, dbn_expand = da1.astype(e.dtype), None
    else:
        de, dscale1, dbias1 = bn_act_backward(True, groups, (e, mean1, rstd1, *bn_expand), da1)
        de, dbn_expand = de.astype(e.dtype), (dscale1, dbias1)
    return (de, dbn_expand, dkernel.astype(kernel.dtype), (dscale2, dbias2),
            tuple(x.astype(p.dtype) for x, p in zip(dse, se)),
            dw_project.astype(w_project.dtype))


mbconv_core_train.defvjp(_core_forward, _core_bwd)
