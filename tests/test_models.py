"""Shapes, modes, randomness, dtypes and layer semantics of the NNX model (tiny variant)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histo_jax.models import EfficientNet, MultiInputClassifier, build_model, get_model_config
from histo_jax.models import layers


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
    assert (cfg.variant, cfg.width_mult, cfg.depth_mult, cfg.depthwise, cfg.pretrained) == (
        "b0", 1.0, 1.0, "auto", "none")
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
    with pytest.raises(ValueError, match="depthwise"):
        build_model(tiny_cfg(depthwise="fast"), 2, nnx.Rngs(params=0))


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


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_shift_equals_grouped(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, 11, 13, 6)), jnp.float32)  # odd sizes on purpose
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    ys, yg = layers.depthwise_shift(x, w, stride), layers.depthwise_grouped(x, w, stride)
    assert ys.shape == yg.shape
    np.testing.assert_allclose(np.asarray(ys), np.asarray(yg), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride)))

    gs = jax.grad(loss(layers.depthwise_shift), argnums=(0, 1))(x, w)
    gg = jax.grad(loss(layers.depthwise_grouped), argnums=(0, 1))(x, w)
    for a, b in zip(gs, gg):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_depthwise_auto_is_shift_on_cpu():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_depthwise_impl("auto") == "shift"
    enc = EfficientNet(variant="tiny", depthwise="grouped", rngs=nnx.Rngs(params=0))
    assert {b.dw.impl for b in enc.blocks} == {"grouped"}


def test_batchnorm_follows_pytorch_train_semantics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 7)).astype(np.float32) * 3 + 1
    bn = layers.BatchNorm(7, eps=1e-5, momentum=0.1)
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 7), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.standard_normal(7), jnp.float32)
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


@pytest.mark.parametrize("act", [False, True])
def test_fused_batchnorm_backward_equals_autodiff(act):
    """batch_norm_train's hand-written VJP == autodiff of the same forward (x, scale, bias)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4, 5, 6)) * 2 + 0.5, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
    weight = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # A non-uniform cotangent.

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * weight)

    fused = jax.grad(loss(lambda x, s, b: layers.batch_norm_train(x, s, b, 1e-5, act)), (0, 1, 2))
    plain = jax.grad(loss(lambda x, s, b: layers.bn_act_forward(x, s, b, 1e-5, act)[0]), (0, 1, 2))
    for got, want in zip(fused(x, scale, bias), plain(x, scale, bias)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(layers.batch_norm_train(x, scale, bias, 1e-5, act)),
                                  np.asarray(layers.bn_act_forward(x, scale, bias, 1e-5, act)[0]))


def test_pointwise_matmul_backward_equals_autodiff():
    """The 1x1 conv's hand-written VJP (weight gradient as dot(x, dy)) == autodiff's."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 7)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)

    def plain(x, w):
        return jax.lax.dot_general(x, w, (((3,), (0,)), ((), ())))

    np.testing.assert_allclose(np.asarray(layers.pointwise_matmul(x, w)), np.asarray(plain(x, w)),
                               rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda x, w: jnp.sum(layers.pointwise_matmul(x, w) * weight), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(plain(x, w) * weight), (0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_ch,out_ch,expand,kernel,stride,dtype", [
    (8, 8, 1, 3, 1, "float32"),     # no expand conv (the first B0 block), residual
    (8, 16, 6, 3, 2, "float32"),    # expand, stride 2
    (16, 16, 6, 5, 1, "float32"),   # expand, 5x5, residual
    (8, 16, 6, 5, 2, "bfloat16"),
])
def test_mbconv_fused_train_core_equals_module_path(in_ch, out_ch, expand, kernel, stride, dtype):
    """mbconv_core_train (one op, recomputing backward) == the block module by module:
    output, gradients of every parameter and of the input, and running statistics."""
    from histo_jax.models.efficientnet import MBConv
    dt = jnp.dtype(dtype)
    x = _images((3, 12, 12, in_ch), seed=3) * 2 - 1
    weight = _images((3, 12 // stride, 12 // stride, out_ch), seed=4) - 0.5

    def run(fused):
        block = MBConv(in_ch, out_ch, expand, kernel, stride, drop_rate=0.0, depthwise="shift",
                       bn_eps=1e-5, dtype=dt, rngs=nnx.Rngs(params=0))
        block.fused_train = fused
        graph, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)

        def loss(params, x):
            b = nnx.merge(graph, params, stats, copy=True)
            y = b(x.astype(dt))
            return jnp.sum(y.astype(jnp.float32) * weight), (y, nnx.state(b, nnx.BatchStat))

        (_, (y, new_stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            params, x)
        return y, grads, new_stats

    (y0, g0, s0), (y1, g1, s1) = run(False), run(True)
    tol = {"float32": 1e-4, "bfloat16": 3e-2}[dtype]
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32),
                               rtol=tol, atol=tol)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=tol, atol=tol * scale,
                                   err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert sum(a.size for a in jax.tree.leaves(g0)) > 0


def test_stochastic_depth_and_dropout_scale_kept_values():
    x = jnp.ones((1000, 2, 2, 3))
    y = np.asarray(layers.stochastic_depth(x, 0.25, jax.random.key(0)))
    per_row = y.reshape(1000, -1)
    assert np.all((per_row == 0).all(1) | np.isclose(per_row, 1 / 0.75).all(1))
    assert 0.15 < (per_row == 0).all(1).mean() < 0.35
    d = np.asarray(layers.dropout(jnp.ones((10000,)), 0.5, jax.random.key(1)))
    assert set(np.unique(d)) == {0.0, 2.0} and 0.45 < (d == 0).mean() < 0.55
