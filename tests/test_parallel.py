"""Data parallelism: a few train steps on 4 (fake CPU) devices equal the same steps on 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histo_jax import optim, parallel, steps
from histo_jax.config import get_base_config
from histo_jax.data import augment
from histo_jax.models import build_model


def _run_steps(devices, n_steps=3, num_inputs=2, batch=8, size=48):
    """A few train steps with the default config (per-input BatchNorm statistics). 48 px gives
    2 x 2 final maps: with 1 x 1 maps each input's statistic would pool only 8 values, and
    float reassociation across devices would be amplified far beyond the tolerances."""
    c = get_base_config()
    c.model.variant, c.data.image_size = "tiny", size
    model = build_model(c.model, num_inputs, nnx.Rngs(params=0))
    graphs, params, stats = steps.split_model(model)
    tx = optim.make_optimizer(c.optimizer, 100)
    mesh = parallel.make_mesh(devices)
    repl = parallel.replicated(mesh)
    state = jax.device_put(steps.init_train_state(params, stats, tx), repl)
    # The trainer's step: on CPU the staged chain (model.trunk 'auto').
    fn = steps.jit_train_step(graphs, tx, augment.AugmentConfig.from_config(c.data, num_inputs),
                              "none", jnp.array([1.0, 2.0]), mesh=mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(n_steps):
        local = {"images": rng.integers(0, 256, (batch, num_inputs, size, size, 3), dtype=np.uint8),
                 "labels": rng.integers(0, 2, batch).astype(np.int32)}
        state, m = fn(state, parallel.global_batch(mesh, local), jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    assert state.params is not None
    return losses, jax.device_get(state.params), jax.device_get(state.batch_stats)


def test_four_devices_match_one_device():
    assert jax.device_count() == 4, "tests/conftest.py sets 4 fake CPU devices"
    l1, p1, s1 = _run_steps(jax.devices()[:1])
    l4, p4, s4 = _run_steps(jax.devices())
    np.testing.assert_allclose(l1, l4, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    # BN statistics of each input over its global batch (all devices), as on one device.
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    assert l1[0] != l1[-1]  # the steps really trained


def test_batch_must_divide_by_devices():
    with pytest.raises(ValueError, match=r"batch_size=25 does not divide by the 4 devices.*multiple of 4"):
        parallel.check_batch_size(25)
    assert parallel.check_batch_size(24) == 24  # one process: the whole global batch is local
