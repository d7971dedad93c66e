"""Shapes, modes, randomness, dtypes and layer semantics of the NNX model (tiny variant)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histo_jax.models import EfficientNet, MultiInputClassifier, build_model, get_model_config
from histo_jax.models import fusion, layers, plain, xla_cpu


def tiny_cfg(**overrides):
    cfg = get_model_config()
    cfg.variant = "tiny"
    cfg.update(overrides)
    return cfg


@nnx.jit
def _eval_call(model, x):
    return model(x)


@nnx.jit
def _train_call(model, x, key):
    return model(x, rngs=nnx.Rngs(dropout=key))


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random(shape, dtype=np.float32))


def test_config_defaults_are_the_reference():
    cfg = get_model_config()
    assert (cfg.variant, cfg.width_mult, cfg.depth_mult, cfg.impl, cfg.pretrained) == (
        "b0", 1.0, 1.0, "auto", "none")
    assert cfg.bn_stats == "per_input"  # the reference: one encoder call per input
    assert (cfg.embed_dim, cfg.num_heads, cfg.ffn_dim, cfg.num_classes) == (128, 8, 512, 2)
    assert (cfg.dropout, cfg.attn_dropout, cfg.stochastic_depth, cfg.dtype) == (
        0.5, 0.5, 0.2, "float32")


def test_state_holds_only_params_and_batch_stats():
    model = build_model(tiny_cfg(), 2, nnx.Rngs(params=0))
    _, state = nnx.split(model)
    kinds = {type(v) for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))}
    assert kinds == {nnx.Param, nnx.BatchStat}
    for v in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert v.dtype == jnp.float32


def test_b0_stage_shapes_at_224_and_block_rates():
    enc = EfficientNet(rngs=nnx.Rngs(params=0))
    enc.eval()
    maps = jax.eval_shape(lambda x: enc.features(x), jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                                           jnp.float32))
    assert [m.shape[1:] for m in maps] == [
        (112, 112, 32), (112, 112, 16), (56, 56, 24), (28, 28, 40), (14, 14, 80),
        (14, 14, 112), (7, 7, 192), (7, 7, 320), (7, 7, 1280)]
    pooled = jax.eval_shape(lambda x: enc(x), jax.ShapeDtypeStruct((3, 224, 224, 3),
                                                                    jnp.float32))
    assert pooled.shape == (3, 1280) and enc.num_features == 1280
    assert len(enc.blocks) == 16
    assert [b.drop_rate for b in enc.blocks] == pytest.approx([0.2 * i / 16 for i in range(16)])
    n_params = sum(v.size for v in jax.tree.leaves(nnx.state(enc, nnx.Param)))
    assert n_params == 4_007_548  # torchvision efficientnet_b0().features


def test_classifier_shapes_at_224_full_size():
    model = build_model(get_model_config(), 4, nnx.Rngs(params=0))
    model.eval()
    logits, attn = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((2, 4, 224, 224, 3),
                                                                            jnp.float32))
    assert (logits.shape, logits.dtype, attn.shape) == ((2, 2), jnp.float32, (2, 4, 4))


def test_tiny_encoder_features():
    enc = EfficientNet(variant="tiny", rngs=nnx.Rngs(params=0))
    enc.eval()
    maps = nnx.jit(lambda m, x: m.features(x))(enc, _images((3, 64, 64, 3)))
    assert [m.shape[1:3] for m in maps] == [(32, 32), (32, 32), (16, 16), (8, 8), (4, 4),
                                            (4, 4), (2, 2), (2, 2), (2, 2)]
    assert len(enc.blocks) == 7  # one block per stage
    assert maps[-1].shape[-1] == enc.num_features


@pytest.mark.parametrize("num_inputs,batch,size", [(1, 3, 64), (2, 1, 64), (3, 3, 32),
                                                   (4, 3, 48)])
def test_classifier_outputs(num_inputs, batch, size):
    model = build_model(tiny_cfg(num_classes=3), num_inputs, nnx.Rngs(params=0))
    assert isinstance(model, MultiInputClassifier)
    model.eval()
    logits, attn = _eval_call(model, _images((batch, num_inputs, size, size, 3)))
    assert logits.shape == (batch, 3) and logits.dtype == jnp.float32
    assert attn.shape == (batch, num_inputs, num_inputs) and attn.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(attn).sum(-1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_train_mode_needs_rngs_and_is_deterministic_given_the_key():
    model = build_model(tiny_cfg(), 2, nnx.Rngs(params=0))
    x = _images((2, 2, 32, 32, 3))
    start = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        model(x)
    unchanged = jax.tree.map(lambda u, v: bool(jnp.all(u == v)), start,
                             nnx.state(model, nnx.BatchStat))
    assert all(jax.tree.leaves(unchanged))  # the failed call did not touch the statistics
    start = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    a1 = _train_call(nnx.clone(model), x, jax.random.key(1))
    a2 = _train_call(nnx.clone(model), x, jax.random.key(1))
    b = _train_call(nnx.clone(model), x, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a1[0]), np.asarray(a2[0]))
    assert not np.allclose(np.asarray(a1[0]), np.asarray(b[0]))
    _train_call(model, x, jax.random.key(1))
    moved = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), start,
                         nnx.state(model, nnx.BatchStat))
    assert all(jax.tree.leaves(moved))  # every running statistic was updated
    model.eval()
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    e1 = _eval_call(model, x)
    e2 = _eval_call(model, x)
    np.testing.assert_array_equal(np.asarray(e1[0]), np.asarray(e2[0]))
    same = jax.tree.map(lambda u, v: bool(jnp.all(u == v)), before,
                        nnx.state(model, nnx.BatchStat))
    assert all(jax.tree.leaves(same))


def test_wrong_inputs_give_clear_errors():
    model = build_model(tiny_cfg(), 2, nnx.Rngs(params=0))
    model.eval()
    with pytest.raises(ValueError, match="built for 2 inputs"):
        model(_images((1, 3, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\(B, N, H, W, 3\)"):
        model(_images((1, 2, 3, 32, 32)))
    with pytest.raises(ValueError, match="at least 32"):
        model(_images((1, 2, 16, 16, 3)))
    with pytest.raises(ValueError, match="variant"):
        build_model(tiny_cfg(variant="b7"), 2, nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="model.impl"):
        build_model(tiny_cfg(impl="fast"), 2, nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="model.bn_stats"):
        build_model(tiny_cfg(bn_stats="pooled"), 2, nnx.Rngs(params=0))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    x = _images((2, 2, 32, 32, 3))
    ref = build_model(tiny_cfg(), 2, nnx.Rngs(params=0))
    half = build_model(tiny_cfg(dtype="bfloat16"), 2, nnx.Rngs(params=0))
    ref.eval()
    half.eval()
    for v in jax.tree.leaves(nnx.state(half, nnx.Param)):
        assert v.dtype == jnp.float32
    (l32, a32), (l16, a16) = _eval_call(ref, x), _eval_call(half, x)
    assert l16.dtype == jnp.float32 and a16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), atol=0.1)
    block = layers.ConvBN(3, 8, 3, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0))
    grads = nnx.grad(lambda m, x: jnp.sum(m(x).astype(jnp.float32)))(block, x[:, 0])
    assert block(x[:, 0]).dtype == jnp.bfloat16
    for g in jax.tree.leaves(nnx.state(grads, nnx.Param)):
        assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kernel,stride,hw", [
    (3, 1, (11, 13)), (3, 2, (11, 13)), (5, 1, (11, 13)), (5, 2, (11, 13)),
    (3, 2, (12, 14)), (5, 2, (12, 14)),   # even sizes: the stride-2 input gradient by parity
])
def test_depthwise_shift_equals_grouped_conv(kernel, stride, hw):
    """xla_cpu.depthwise_shift (and its written-out VJP) == plain.depthwise_conv (XLA's)."""
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, *hw, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    ys, yg = xla_cpu.depthwise_shift(x, w, stride), plain.depthwise_conv(x, w, stride)
    assert ys.shape == yg.shape
    np.testing.assert_allclose(np.asarray(ys), np.asarray(yg), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride)))

    gs = jax.grad(loss(xla_cpu.depthwise_shift), argnums=(0, 1))(x, w)
    gg = jax.grad(loss(plain.depthwise_conv), argnums=(0, 1))(x, w)
    for a, b in zip(gs, gg):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_impl_auto_is_xla_cpu_on_cpu():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_impl("auto") == "xla_cpu"
    enc = EfficientNet(variant="tiny", impl="plain", rngs=nnx.Rngs(params=0))
    impls = {m.impl for _, m in nnx.iter_graph(enc) if hasattr(m, "impl")}
    assert impls == {"plain"}


def _bn_with_random_affine(rng, c):
    bn = layers.BatchNorm(c, eps=1e-5, momentum=0.1)
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
    return bn


def test_batchnorm_follows_pytorch_train_semantics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 7)).astype(np.float32) * 3 + 1
    bn = _bn_with_random_affine(rng, 7)
    y = bn(jnp.asarray(x))
    flat = x.reshape(-1, 7)
    mean, var = flat.mean(0), flat.var(0)
    expect = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-5)
    bn.eval()
    y_eval = bn(jnp.asarray(x))
    expect_eval = ((x - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
                   * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...]))
    np.testing.assert_allclose(np.asarray(y_eval), expect_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["plain", "xla_cpu"])
def test_grouped_batchnorm_is_one_pytorch_call_per_group(impl):
    """stat_groups=G on a (B, G)-flattened batch == G sequential PyTorch BatchNorm calls, one
    per group in group order: outputs normalised per group, running averages updated G times
    (unbiased variance), so the last group weighs most."""
    rng = np.random.default_rng(5)
    b, g, c = 3, 4, 6
    x = (rng.standard_normal((b, g, 5, 5, c)) * rng.uniform(0.5, 3, (1, g, 1, 1, 1))
         + rng.uniform(-2, 2, (1, g, 1, 1, 1))).astype(np.float32)   # groups differ on purpose
    bn = _bn_with_random_affine(rng, c)
    bn.impl = impl
    bn.mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
    mean0, var0 = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    y = np.asarray(bn(jnp.asarray(x.reshape(b * g, 5, 5, c)), act=True, stat_groups=g))
    y = y.reshape(b, g, 5, 5, c)
    run_mean, run_var = mean0.copy(), var0.copy()
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    for i in range(g):  # what the reference's per-input encoder calls do
        xi = x[:, i].reshape(-1, c)
        z = (x[:, i] - xi.mean(0)) / np.sqrt(xi.var(0) + 1e-5) * scale + bias
        np.testing.assert_allclose(y[:, i], z / (1 + np.exp(-z)), rtol=1e-4, atol=1e-5)
        run_mean = 0.9 * run_mean + 0.1 * xi.mean(0)
        run_var = 0.9 * run_var + 0.1 * xi.var(0, ddof=1)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), run_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), run_var, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot hold 5 statistics groups"):
        bn(jnp.asarray(x.reshape(b * g, 5, 5, c)), stat_groups=5)


@pytest.mark.parametrize("act,groups", [(False, 1), (True, 1), (True, 3)])
def test_batchnorm_fast_backward_equals_plain_autodiff(act, groups):
    """xla_cpu.batch_norm_train (hand-written VJP) == plain.batch_norm_train by autodiff:
    output, statistics, and the gradients of x, scale and bias."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((6, 4, 5, 6)) * 2 + 0.5, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
    weight = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # A non-uniform cotangent.

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, 1e-5, act, groups)[0] * weight)

    fast = jax.grad(loss(xla_cpu.batch_norm_train), (0, 1, 2))(x, scale, bias)
    ref = jax.grad(loss(plain.batch_norm_train), (0, 1, 2))(x, scale, bias)
    for got, want in zip(fast, ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    (y1, s1), (y0, s0) = (fn(x, scale, bias, 1e-5, act, groups)
                          for fn in (xla_cpu.batch_norm_train, plain.batch_norm_train))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
    assert s1[0].shape == (groups, 6)
    for a, b in zip(s1, s0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (2, 128, 64, 7)])  # the second: split in two
def test_pointwise_matmul_backward_equals_autodiff(shape):
    """The 1x1 conv's hand-written VJP (weight gradient as dot(x, dy), split over the pixels
    from xla_cpu.SPLIT_WEIGHT_GRAD_ROWS on) == autodiff's."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal(shape[:3] + (4,)), jnp.float32)
    np.testing.assert_allclose(np.asarray(xla_cpu.pointwise_matmul(x, w)),
                               np.asarray(plain.pointwise(x, w)), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda x, w: jnp.sum(xla_cpu.pointwise_matmul(x, w) * weight), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(plain.pointwise(x, w) * weight), (0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,size", [(3, 2, 224), (3, 1, 13), (5, 2, 11)])
def test_conv2d_im2col_kernel_grad_equals_autodiff(kernel, stride, size):
    """xla_cpu.conv2d (kernel gradient as im2col + matmul; 224 px: split in two) == the
    plain convolution and its autodiff gradients."""
    rng = np.random.default_rng(kernel + stride)
    x = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 5)), jnp.float32)
    np.testing.assert_allclose(np.asarray(xla_cpu.conv2d(x, w, stride)),
                               np.asarray(plain.conv2d(x, w, stride)), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride)))

    got = jax.grad(loss(xla_cpu.conv2d), (0, 1))(x, w)
    want = jax.grad(loss(plain.conv2d), (0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4,
                                   atol=1e-4 * float(jnp.max(jnp.abs(e))))


def _assert_trees_close(got, want, tol, what):
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    pairs = zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got))
    for (path, a), b in pairs:
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   rtol=tol, atol=tol * scale,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("in_ch,out_ch,expand,kernel,stride,dtype,groups", [
    (8, 8, 1, 3, 1, "float32", 1),     # no expand conv (the first B0 block), residual
    (8, 16, 6, 3, 2, "float32", 3),    # expand, stride 2, per-group statistics
    (16, 16, 6, 5, 1, "float32", 1),   # expand, 5x5, residual
    (8, 16, 6, 5, 2, "bfloat16", 3),
])
def test_mbconv_xla_cpu_equals_plain(in_ch, out_ch, expand, kernel, stride, dtype, groups):
    """An MBConv block in train mode on the XLA:CPU path (xla_cpu.mbconv_core_train: one op,
    recomputing backward) == the plain path module by module: output, gradients of every
    parameter and of the input, and running statistics."""
    from histo_jax.models.efficientnet import MBConv
    dt = jnp.dtype(dtype)
    x = _images((12, 12, 12, in_ch), seed=3) * 2 - 1
    weight = _images((12, 12 // stride, 12 // stride, out_ch), seed=4) - 0.5

    def run(impl):
        block = MBConv(in_ch, out_ch, expand, kernel, stride, drop_rate=0.0, impl=impl,
                       bn_eps=1e-5, dtype=dt, rngs=nnx.Rngs(params=0))
        graph, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)

        def loss(params, x):
            b = nnx.merge(graph, params, stats, copy=True)
            y = b(x.astype(dt), stat_groups=groups)
            return jnp.sum(y.astype(jnp.float32) * weight), (y, nnx.state(b, nnx.BatchStat))

        (_, (y, new_stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            params, x)
        return y, grads, new_stats

    (y0, g0, s0), (y1, g1, s1) = run("plain"), run("xla_cpu")
    tol = {"float32": 1e-4, "bfloat16": 3e-2}[dtype]
    _assert_trees_close(y1, y0, tol, "output")  # tolerances relative to the largest value
    _assert_trees_close(g1, g0, tol, "gradient")
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5 if dtype == "float32"
                                   else 1e-2, atol=1e-6 if dtype == "float32" else 1e-3)
    assert sum(a.size for a in jax.tree.leaves(g0)) > 0


@pytest.mark.parametrize("impl,remat", [("plain", False), ("xla_cpu", True)])
def test_per_input_statistics_equal_one_encoder_call_per_input(impl, remat):
    """The encoder's one call over all inputs folded into the batch with stat_groups=N == the
    reference structure, the encoder called once per input in input order: features and
    running statistics, and on the XLA:CPU path (fused MBConv op, hand-written backward
    passes; here with remat) the gradients too. Plain gradients are autodiff of the plain
    forward; the full-size XLA:CPU step without remat is held to PyTorch itself in
    tests/test_parity.py, and bfloat16 blocks to the plain path in
    test_mbconv_xla_cpu_equals_plain (per-block: in bfloat16, 7 blocks of BatchNorm over 8
    values amplify rounding beyond any useful tolerance)."""
    n, b = 2, 2
    x = _images((b, n, 64, 64, 3), seed=7)   # 2 x 2 maps at the end: 8 values per statistic
    weight = _images((b, n, 8), seed=8) - 0.5
    enc = EfficientNet(variant="tiny", impl=impl, stochastic_depth=0.0, remat=remat,
                       rngs=nnx.Rngs(params=0))
    graph, params, stats = nnx.split(enc, nnx.Param, nnx.BatchStat)

    def loss(params, per_input_calls):
        e = nnx.merge(graph, params, stats, copy=True)
        if per_input_calls:
            feats = jnp.stack([e(x[:, i]) for i in range(n)], axis=1)
        else:  # b-major, as the classifier folds its inputs
            feats = e(x.reshape((b * n,) + x.shape[2:]), stat_groups=n).reshape(b, n, -1)
        return jnp.sum(feats[..., :8] * weight), (feats, nnx.state(e, nnx.BatchStat))

    with_grads = impl == "xla_cpu"
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True) if with_grads else loss,
                 static_argnums=1)
    ref, one = fn(params, True), fn(params, False)
    if with_grads:
        (ref, g_ref), (one, g_one) = ref, one
    (_, (f_ref, s_ref)), (_, (f_one, s_one)) = ref, one
    tol = 2e-4
    _assert_trees_close(f_one, f_ref, tol, "features")
    _assert_trees_close(s_one, s_ref, tol / 10, "running statistics")
    if with_grads:
        _assert_trees_close(g_one, g_ref, tol, "gradient")


def test_stochastic_depth_and_dropout_scale_kept_values():
    x = jnp.ones((1000, 2, 2, 3))
    y = np.asarray(layers.stochastic_depth(x, 0.25, jax.random.uniform(jax.random.key(0), (1000,))))
    per_row = y.reshape(1000, -1)
    assert np.all((per_row == 0).all(1) | np.isclose(per_row, 1 / 0.75).all(1))
    assert 0.15 < (per_row == 0).all(1).mean() < 0.35
    d = np.asarray(layers.dropout(jnp.ones((10000,)), 0.5,
                                  jax.random.uniform(jax.random.key(1), (10000,))))
    assert set(np.unique(d)) == {0.0, 2.0} and 0.45 < (d == 0).mean() < 0.55


def test_uniform_draws_one_key_per_call():
    """All of a module's masks come from one key of the stream and one uniform call: the
    slices are disjoint parts of that draw; nothing is drawn when there is nothing to mask."""
    rngs = nnx.Rngs(dropout=3)
    u = layers.uniform_draws(rngs, {"a": (2, 3), "b": (4,)}, "test")
    assert u["a"].shape == (2, 3) and u["b"].shape == (4,)
    whole = jax.random.uniform(nnx.Rngs(dropout=3).dropout(), (10,))
    np.testing.assert_array_equal(np.concatenate([np.ravel(u["a"]), u["b"]]), whole)
    assert layers.uniform_draws(rngs, {}, "test") == {}
    np.testing.assert_array_equal(  # the empty call took no key: the next draw is the 2nd key
        layers.uniform_draws(rngs, {"c": (1,)}, "test")["c"],
        jax.random.uniform(jax.random.fold_in(jax.random.key(3), 1), (1,)))
    with pytest.raises(ValueError, match="rngs"):
        layers.uniform_draws(None, {"a": (1,)}, "test")


def test_trunk_per_input_calls_equal_folded():
    """model.trunk='scan' (the encoder once per input, in a lax.scan) == 'folded' (one call,
    statistics grouped per input): train-mode logits, gradients and running statistics; and
    'scan' and 'unrolled' (N calls: in training, the reference structure of
    test_per_input_statistics_equal_one_encoder_call_per_input) == 'folded' in eval mode.
    Random ops off: the calls draw their keys differently."""
    n, b = 2, 2
    x = _images((b, n, 48, 48, 3), seed=3)
    trunks = ("folded", "scan", "unrolled")
    models = {t: build_model(tiny_cfg(trunk=t, dropout=0.0, attn_dropout=0.0,
                                      stochastic_depth=0.0), n, nnx.Rngs(params=0))
              for t in trunks}

    def step(model):
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            m = nnx.merge(graph, params, rest, copy=True)
            logits, _ = m(x, rngs=nnx.Rngs(dropout=0))
            return jnp.sum(logits * jnp.arange(1.0, 3.0)), (logits, nnx.state(m, nnx.BatchStat))
        (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads, stats

    l0, g0, s0 = step(models["folded"])
    assert sum(np.abs(np.asarray(v)).sum() for v in jax.tree.leaves(g0)) > 0
    for trunk in ("scan",):
        l1, g1, s1 = step(models[trunk])
        _assert_trees_close(l1, l0, 1e-4, f"{trunk} logits")
        _assert_trees_close(g1, g0, 1e-4, f"{trunk} gradient")
        _assert_trees_close(s1, s0, 1e-5, f"{trunk} running statistics")
    for m in models.values():
        m.eval()
    e0 = _eval_call(models["folded"], x)[0]
    for trunk in trunks[1:]:
        _assert_trees_close(_eval_call(models[trunk], x)[0], e0, 1e-5, f"{trunk} eval logits")
        with pytest.raises(ValueError, match=f"trunk='{trunk}'.*bn_stats='per_input'"):
            build_model(tiny_cfg(trunk=trunk, bn_stats="joint"), n, nnx.Rngs(params=0))


def test_per_input_trunks_draw_the_same_random_numbers():
    """With dropout and stochastic depth on, every per-input trunk (scan, unrolled, staged)
    gives input i's encoder the same key (fusion.input_keys): the same train-mode logits and
    running statistics."""
    n, b = 2, 2
    x = _images((b, n, 40, 40, 3), seed=4)
    out = {}
    for trunk in ("scan", "unrolled", "staged"):
        model = build_model(tiny_cfg(trunk=trunk, stochastic_depth=0.5), n, nnx.Rngs(params=0))
        logits, _ = _train_call(model, x, jax.random.key(5))
        out[trunk] = (logits, nnx.state(model, nnx.BatchStat))
    for trunk in ("unrolled", "staged"):
        _assert_trees_close(out[trunk], out["scan"], 1e-5, trunk)
    other = build_model(tiny_cfg(trunk="scan", stochastic_depth=0.5), n, nnx.Rngs(params=0))
    assert not np.allclose(np.asarray(_train_call(other, x, jax.random.key(6))[0]),
                           np.asarray(out["scan"][0]))  # the key matters


def test_trunk_auto_is_staged_in_cpu_training_and_scan_in_eval():
    model = build_model(tiny_cfg(trunk="auto"), 2, nnx.Rngs(params=0))
    x = _images((2, 2, 32, 32, 3))

    def primitives(m, train):
        graph, state = nnx.split(m)
        return str(jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(
            x, rngs=nnx.Rngs(dropout=0) if train else None)[0])(state, x))
    # Training on CPU: 'staged' (steps.StagedTrainStep chains the programs); called whole,
    # two encoder calls of B = 2 crops (no scan, no folded batch of 4).
    assert fusion.resolve_trunk("auto", False, "per_input", backend="cpu") == "staged"
    train = primitives(model, True)
    assert " scan[" not in train
    assert "f32[2,32,32,3]" in train and "f32[4,32,32,3]" not in train
    model.eval()
    assert " scan[" in primitives(model, False)
    assert fusion.resolve_trunk("auto", False, "per_input", backend="gpu") == "folded"
    assert fusion.resolve_trunk("auto", False, "joint", backend="cpu") == "folded"
    assert fusion.resolve_trunk("auto", True, "per_input", backend="gpu") == "scan"
    assert fusion.resolve_trunk("folded", True, "per_input", backend="cpu") == "folded"


def test_eval_chunks_equal_whole_batch():
    """Eval mode with the batch cut into chunks per encoder call (model.eval_chunk: 3 crops,
    the batch of 7 zero-padded to 9; and 7 whole) == the folded trunk; the automatic size."""
    n, b = 2, 7
    x = _images((b, n, 32, 32, 3), seed=5)
    ref = build_model(tiny_cfg(trunk="folded"), n, nnx.Rngs(params=0))
    ref.eval()
    want = _eval_call(ref, x)
    for chunk in (3, 0):
        m = build_model(tiny_cfg(trunk="auto", eval_chunk=chunk), n, nnx.Rngs(params=0))
        m.eval()
        got = _eval_call(m, x)
        _assert_trees_close(got, want, 1e-5, f"eval_chunk={chunk}")
        graph, state = nnx.split(m)
        jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x)[0])(state, x))
        assert (f"f32[{chunk or b},32,32,3]" in jaxpr) and " scan[" in jaxpr
    assert [fusion.eval_chunk_size(b, -1, "cpu") for b in (8, 16, 17, 24, 25, 32, 100)] == [
        8, 16, 9, 8, 5, 8, 10]
    assert fusion.eval_chunk_size(25, -1, "gpu") == 25
    assert fusion.eval_chunk_size(25, 40, "cpu") == 25
    with pytest.raises(ValueError, match="model.eval_chunk"):
        build_model(tiny_cfg(eval_chunk=-2), n, nnx.Rngs(params=0))
