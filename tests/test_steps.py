"""The staged train step (``steps.StagedTrainStep``, the default in training on CPU) equals
the one-program step (``steps.make_train_step``), random ops and augmentation on."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histo_jax import optim, parallel, steps, train
from histo_jax.config import get_base_config
from histo_jax.data import augment
from histo_jax.models import build_model


def _setup(n: int, **model_fields):
    c = get_base_config()
    c.model.variant = "tiny"
    c.model.stochastic_depth = 0.5  # dropout and attention dropout: the config's 0.5
    c.model.update(model_fields)
    graphs, params, stats = steps.split_model(build_model(c.model, n, nnx.Rngs(params=0)))
    tx = optim.make_optimizer(c.optimizer, 100)
    aug = augment.AugmentConfig.from_config(c.data, n)
    return graphs, tx, aug, steps.init_train_state(params, stats, tx)


def _batches(n: int, b: int = 4, size: int = 40, count: int = 2):
    rng = np.random.default_rng(n)
    return [{"images": rng.integers(0, 256, (b, n, size, size, 3), dtype=np.uint8),
             "labels": (np.arange(b) % 2).astype(np.int32)} for _ in range(count)]


def _close(got, want, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def test_staged_step_equals_one_program():
    """Two steps on a 4-device mesh (batch sharded) with dropout, stochastic depth,
    augmentation and class weights: the staged chain (the encoder's forward and backward
    per input) and one program, both compiled ahead by the trainer's ``compile_ahead``,
    after which the steps compile nothing, give the same metrics, parameters, BatchNorm
    statistics and optimizer state."""
    n = 3
    graphs, tx, aug, state = _setup(n)  # trunk 'auto': staged in CPU training
    assert graphs.train_trunk == "staged"
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    cw = jnp.array([1.0, 2.0])
    staged = steps.jit_train_step(graphs, tx, aug, "none", cw, mesh=mesh)
    whole = steps.jit_train_step(graphs, tx, aug, "none", cw, mesh=mesh, staged=False)
    assert isinstance(staged, steps.StagedTrainStep)
    assert isinstance(whole, steps.hostenv.CompiledOnFirstCall)
    batches = [parallel.global_batch(mesh, b) for b in _batches(n, b=8)]
    key = jax.device_put(jax.random.PRNGKey(3), repl)
    s_staged = jax.device_put(state, repl)
    s_whole = jax.device_put(jax.tree.map(jnp.copy, state), repl)
    # Both compiled ahead as the trainer does, from the abstract batch (train.compile_ahead).
    loader = types.SimpleNamespace(started=0)
    loader.start_prefetch = lambda: setattr(loader, "started", loader.started + 1)
    for step, s in ((staged, s_staged), (whole, s_whole)):
        train.compile_ahead(types.SimpleNamespace(
            source=types.SimpleNamespace(image_size=40), mesh=mesh, base_key=key, train_step=step,
            config=types.SimpleNamespace(batch_size=8, num_inputs=n)), s, loader)
    assert loader.started == 2
    programs = (staged.prepare, staged.forward, staged.head, staged.backward, staged.update, whole)
    assert [len(p.compiled) for p in programs] == [1] * 6
    for batch in batches:
        s_staged, m_staged = staged(s_staged, batch, key)
        s_whole, m_whole = whole(s_whole, batch, key)
        _close(m_staged, m_whole, "metrics")
    assert [len(p.compiled) for p in programs] == [1] * 6  # the steps compiled nothing
    assert jax.tree.structure(s_staged) == jax.tree.structure(s_whole)
    _close(s_staged, s_whole, "state")
    assert int(s_staged.step) == 2
    assert s_staged.params["encoder"]["head"]["conv"]["kernel"][...].sharding.is_fully_replicated
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), s_staged.batch_stats,
                         state.batch_stats)
    assert all(jax.tree.leaves(moved))  # every running statistic was updated


def test_trunk_choice_and_errors():
    graphs, tx, aug, _ = _setup(2, trunk="unrolled")
    assert graphs.train_trunk == "unrolled" and graphs.encoder is None
    assert isinstance(steps.jit_train_step(graphs, tx, aug, "none", jnp.ones(2)),
                      steps.hostenv.CompiledOnFirstCall)
    with pytest.raises(ValueError, match="training trunk is 'staged'.*model.trunk.*'unrolled'"):
        steps.StagedTrainStep(graphs, tx, aug, "none", jnp.ones(2))


def test_grad_norm_metric_is_the_norm_of_the_whole_gradient():
    """``metrics['grad_norm']`` (taken on the flattened gradient) is the L2 norm over every
    parameter tensor of :func:`steps.make_grad_fn`'s gradient, before clipping."""
    n = 1
    graphs, tx, _, state = _setup(n, stochastic_depth=0.0, dropout=0.0, attn_dropout=0.0)
    batch = _batches(n, b=4, size=32, count=1)[0]
    cw = jnp.array([1.0, 1.0])
    step = jax.jit(steps.make_train_step(graphs, tx, None, "none", cw))
    _, metrics = step(state, batch, jax.random.PRNGKey(0))
    grad_fn = jax.jit(steps.make_grad_fn(graphs, cw))
    images = augment.preprocess(jnp.asarray(batch["images"]))
    _, grads = grad_fn(state.params, state.batch_stats, images, jnp.asarray(batch["labels"]),
                       jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 0))[1])
    want = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                       for g in jax.tree.leaves(grads)))
    assert want > 1.5  # above the clip norm (1.0): the metric is taken before clipping
    np.testing.assert_allclose(float(metrics["grad_norm"]), want, rtol=1e-5)
