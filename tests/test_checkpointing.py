"""Orbax checkpoints: exact round trip with the Grain iterator; a damaged latest step falls back."""

import glob
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from histo_jax import checkpointing, optim, steps
from histo_jax.config import get_base_config


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def _state_and_iter():
    _, params, stats = nnx.split(_Tiny(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    tx = optim.make_optimizer(get_base_config().optimizer, 100)
    state = steps.init_train_state(params, stats, tx)
    loader = grain.DataLoader(data_source=list(range(20)), worker_count=0,
                              sampler=grain.samplers.IndexSampler(20, num_epochs=1, shuffle=False, seed=0))
    return state, loader


def test_latest_round_trip_and_fallback_from_damaged_checkpoint(tmp_path, caplog):
    state, loader = _state_and_iter()
    it = iter(loader)
    ck = checkpointing.Checkpoints(str(tmp_path), keep=2)
    next(it), next(it)
    ck.save_latest(3, state.replace(step=jnp.array(3)), it, {"epoch": 1})
    next(it)
    bumped = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state.params)
    ck.save_latest(4, state.replace(step=jnp.array(4), params=bumped), it, {"epoch": 2})

    fresh = iter(loader)
    restored, meta = ck.restore_latest(state, fresh)
    assert int(restored.step) == 4 and meta == {"epoch": 2} and next(fresh) == 3
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(bumped)):
        np.testing.assert_array_equal(a, b)

    for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"damaged")
    fresh = iter(loader)
    with caplog.at_level(logging.WARNING, logger="histo_jax.checkpointing"):
        restored, meta = ck.restore_latest(state, fresh)
    assert int(restored.step) == 3 and meta == {"epoch": 1} and next(fresh) == 2
    assert "checkpoints/4 cannot be restored" in caplog.text and "previous one" in caplog.text


def test_best_weights_round_trip_and_empty_workdir(tmp_path):
    state, _ = _state_and_iter()
    assert checkpointing.restore_best(str(tmp_path)) is None
    ck = checkpointing.Checkpoints(str(tmp_path))
    weights = {"params": state.params, "batch_stats": state.batch_stats}
    ck.save_best(7, weights, {"epoch": 2, "val_macro_f1": 0.75})
    got, meta = checkpointing.restore_best(str(tmp_path), weights)
    assert meta == {"epoch": 2, "val_macro_f1": 0.75}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(a, b)
