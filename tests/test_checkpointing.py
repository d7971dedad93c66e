"""Orbax checkpoints: exact round trip with the Grain iterator; a damaged latest step falls
back; the loop state is a versioned record; a failed save keeps the previous checkpoints."""

import errno
import glob
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pytest

from histo_jax import checkpointing, optim, steps, workdir
from histo_jax.checkpointing import LoopState
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
    ck.save_latest(3, state.replace(step=jnp.array(3)), it, LoopState(epoch=1))
    next(it)
    bumped = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state.params)
    loop = LoopState(epoch=2, step_in_epoch=1, loss_sum=0.25, accuracy_sum=1.5, summed_steps=2,
                     best_f1=0.5, best_epoch=1, bad_epochs=1, data_start_step=0, metrics_bytes=123,
                     history=[{"epoch": 1, "val_macro_f1": 0.5}])
    ck.save_latest(4, state.replace(step=jnp.array(4), params=bumped), it, loop)

    step, restored, got = ck.restore_latest(state)
    fresh = iter(loader)
    assert ck.restore_data_iter(step, fresh)
    assert step == 4 and int(restored.step) == 4 and got == loop and next(fresh) == 3
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(bumped)):
        np.testing.assert_array_equal(a, b)

    for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"damaged")
    with caplog.at_level(logging.WARNING, logger="histo_jax.checkpointing"):
        step, restored, got = ck.restore_latest(state)
    fresh = iter(loader)
    assert ck.restore_data_iter(step, fresh)
    assert int(restored.step) == 3 and got == LoopState(epoch=1) and next(fresh) == 2
    assert "checkpoints/4 cannot be restored" in caplog.text and "previous one" in caplog.text


def _meta_file(root, step):
    return os.path.join(root, "checkpoints", str(step), "meta", "metadata")


def test_loop_state_is_versioned_and_a_bad_one_is_a_clear_error(tmp_path, caplog):
    state, loader = _state_and_iter()
    it = iter(loader)
    ck = checkpointing.Checkpoints(str(tmp_path), keep=3)
    for s in (2, 3):
        ck.save_latest(s, state.replace(step=jnp.array(s)), it, LoopState(epoch=s))
    assert json.load(open(_meta_file(tmp_path, 3)))["version"] == LoopState.VERSION
    # Corrupt (not JSON, or not a loop state): reported, and the previous checkpoint is used.
    for garbage in ("{not json", json.dumps({"version": LoopState.VERSION, "epoch": "two"})):
        open(_meta_file(tmp_path, 3), "w").write(garbage)
        with caplog.at_level(logging.WARNING, logger="histo_jax.checkpointing"):
            step, _, loop = ck.restore_latest(state)
        assert step == 2 and loop.epoch == 2 and "checkpoints/3 cannot be restored" in caplog.text
    # Another version, or the unversioned dict of older code: refused at once, naming the file.
    for other in ({**LoopState().to_json(), "version": LoopState.VERSION - 1},
                  {"epoch": 1, "step_in_epoch": 0, "sums": [0.0, 0.0, 0], "best_f1": -1.0}):
        open(_meta_file(tmp_path, 3), "w").write(json.dumps(other))
        with pytest.raises(checkpointing.IncompatibleStateError) as e:
            ck.restore_latest(state)
        assert f"{tmp_path}/checkpoints/3/meta" in str(e.value)
        assert f"this histo_jax reads version {LoopState.VERSION}" in str(e.value)
    # Nothing restorable: an error, not a silent restart from scratch.
    for s in (2, 3):
        open(_meta_file(tmp_path, s), "w").write("[]")
    with pytest.raises(checkpointing.CheckpointError,
                       match="None of the checkpoints of this run can be restored"):
        ck.restore_latest(state)
    with pytest.raises(checkpointing.CorruptStateError, match="missing|lacks"):
        LoopState.from_json({"version": LoopState.VERSION, "epoch": 1}, "x")


def test_failed_save_keeps_the_previous_checkpoint_and_a_resave_works(tmp_path, monkeypatch,
                                                                    caplog, capfd):
    state, loader = _state_and_iter()
    it = iter(loader)
    ck = checkpointing.Checkpoints(str(tmp_path), keep=2)
    ck.save_latest(3, state.replace(step=jnp.array(3)), it, LoopState(epoch=1))

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full_disk)
    caplog.clear()
    capfd.readouterr()
    with pytest.raises(workdir.WriteFailedError) as e:
        ck.save_latest(4, state.replace(step=jnp.array(4)), it, LoopState(epoch=2))
    # Orbax's own traceback of its save thread is not printed before our message.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err
    assert f"training state checkpoint {tmp_path}/checkpoints/4" in str(e.value)
    assert "the disk is full ([Errno 28] No space left on device)" in str(e.value)
    assert ck.latest_step() == 3
    monkeypatch.undo()
    fresh = checkpointing.Checkpoints(str(tmp_path), keep=2)  # a rerun
    step, _, loop = fresh.restore_latest(state)
    assert step == 3 and loop.epoch == 1
    fresh.save_latest(4, state.replace(step=jnp.array(4)), it, LoopState(epoch=2))
    # A resumed run replays steps: saving a step that exists replaces it.
    fresh.save_latest(4, state.replace(step=jnp.array(4)), it, LoopState(epoch=2, bad_epochs=1))
    assert fresh.restore_latest(state)[2] == LoopState(epoch=2, bad_epochs=1)


def test_data_iterator_of_another_worker_count_is_reported_not_restored(tmp_path):
    state, loader = _state_and_iter()
    it = iter(loader)
    next(it)
    ck = checkpointing.Checkpoints(str(tmp_path))
    ck.save_latest(1, state, it, LoopState())
    path = os.path.join(tmp_path, "checkpoints", "1", "data_iter", "process_0-of-1.json")
    saved = json.load(open(path))
    saved["worker_count"] = 2
    json.dump(saved, open(path, "w"))
    assert not ck.restore_data_iter(1, iter(loader))


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


def test_best_steps_after_a_resumed_step_are_dropped(tmp_path):
    state, _ = _state_and_iter()
    ck = checkpointing.Checkpoints(str(tmp_path))
    weights = {"params": state.params, "batch_stats": state.batch_stats}
    for s in (3, 6):
        ck.save_best(s, weights, {"epoch": s // 3, "val_macro_f1": 0.5})
    ck.drop_best_after(4)
    assert ck.best.all_steps() == [3] and ck.restore_best(weights)[1]["epoch"] == 1


def test_replicated_and_sharded_arrays_restore_with_the_target_shardings(tmp_path):
    """Replicated leaves are written through their numpy copies, a leaf sharded over the 4
    devices as a jax.Array; a restore with the target gives both back with its shardings."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from histo_jax import parallel
    mesh = parallel.make_mesh(jax.devices())
    repl, split = parallel.replicated(mesh), NamedSharding(mesh, P("data"))
    weights = {"replicated": jax.device_put(jnp.arange(6.0).reshape(2, 3), repl),
               "step": jax.device_put(jnp.array(5, jnp.int32), repl),
               "sharded": jax.device_put(jnp.arange(8.0), split)}
    host = checkpointing._host_copies(weights)
    assert isinstance(host["replicated"], np.ndarray) and isinstance(host["step"], np.ndarray)
    assert isinstance(host["sharded"], jax.Array)
    ck = checkpointing.Checkpoints(str(tmp_path))
    ck.save_best(1, weights, {})
    got, _ = ck.restore_best(weights)
    for name, want in weights.items():
        assert isinstance(got[name], jax.Array) and got[name].sharding == want.sharding, name
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want)


def test_a_checkpoint_of_the_per_tensor_optimizer_state_is_refused_by_its_version(tmp_path):
    """A version-1 checkpoint (optimizer state tensor by tensor) against this version's flat
    optimizer state: refused as another version, naming it, before the state is read."""
    _, params, stats = nnx.split(_Tiny(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    old_tx = optim.make_optimizer(get_base_config().optimizer, 100, flat=False)
    old = steps.init_train_state(params, stats, old_tx)
    state, loader = _state_and_iter()
    ck = checkpointing.Checkpoints(str(tmp_path))
    ck.save_latest(1, old, iter(loader), LoopState(epoch=1))
    open(_meta_file(tmp_path, 1), "w").write(json.dumps({**LoopState(epoch=1).to_json(),
                                                         "version": 1}))
    with pytest.raises(checkpointing.IncompatibleStateError) as e:
        ck.restore_latest(state)
    assert "has version 1; this histo_jax reads version 2" in str(e.value)
