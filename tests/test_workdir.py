"""A workdir's guarantees without training: the run identity, the claim, the lock, failed writes."""

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from runutil import tiny_config

from histo_jax import train, workdir
from histo_jax.config import get_base_config


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _changed(value):
    if value is None:
        return "x"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value[::-1] if len(set(value)) > 1 else value + ((value[0] if value else 1),)
    raise TypeError(value)


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def test_identity_is_every_config_field_but_the_documented_ones_plus_the_data():
    base = get_base_config()
    ref = workdir.RunIdentity.of(base, "data-a")
    leaves = dict(_leaves(base.to_dict()))
    # The documented exclusions are real fields (data.demo_dir is optional) ...
    assert set(workdir.NOT_IN_IDENTITY) - {"data.demo_dir"} <= set(leaves)
    for name, value in leaves.items():
        c = get_base_config()
        _set(c, name, _changed(value))
        changed = workdir.RunIdentity.of(c, "data-a")
        if name in workdir.NOT_IN_IDENTITY:
            assert changed.fingerprint == ref.fingerprint, name
        else:  # ... and every other field is part of the identity.
            assert changed.fingerprint != ref.fingerprint, name
            assert [d.split(":")[0] for d in ref.differences(changed)] == [name]
    other_data = workdir.RunIdentity.of(base, "data-b")
    assert other_data.fingerprint != ref.fingerprint
    assert ref.differences(other_data)[0].startswith("data (prepared dataset fingerprint)")


def test_differences_show_stored_and_new_values():
    a = get_base_config()
    b = get_base_config()
    b.optimizer.learning_rate, b.batch_size = 1e-3, 16
    old, new = workdir.RunIdentity.of(a, "d"), workdir.RunIdentity.of(b, "d")
    assert old.differences(new) == ["batch_size: 25 -> 16", "optimizer.learning_rate: 0.0003 -> 0.001"]
    fewer = workdir.RunIdentity({k: v for k, v in old.fields.items() if k != "model.dtype"}, "d")
    assert fewer.differences(old) == ['model.dtype: (not recorded) -> "float32"']


def _identity(lr=3e-4, data="d"):
    c = get_base_config()
    c.optimizer.learning_rate = lr
    return workdir.RunIdentity.of(c, data), c.to_json_best_effort(indent=2)


def test_claim_new_same_other_and_discard(tmp_path, caplog):
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    ident, cfg_json = _identity()
    workdir.claim(wd, ident, cfg_json)
    assert json.load(open(os.path.join(wd, "identity.json")))["fingerprint"] == ident.fingerprint
    assert open(os.path.join(wd, "config.json")).read() == cfg_json
    # The same run again: nothing rewritten (config.json keeps the config the run started with).
    workdir.claim(wd, ident, cfg_json.replace('"progress": true', '"progress": false'))
    assert open(os.path.join(wd, "config.json")).read() == cfg_json
    # Another run while nothing was computed yet: replaced, with a warning.
    other, other_json = _identity(lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="histo_jax.workdir"):
        workdir.claim(wd, other, other_json)
    assert "replacing the identity of a start that saved no result" in caplog.text
    assert open(os.path.join(wd, "config.json")).read() == other_json
    # Once there are results, another run is refused; nothing changes.
    os.makedirs(os.path.join(wd, "checkpoints", "4"))
    with open(os.path.join(wd, "run.lock"), "w"):
        pass
    with pytest.raises(workdir.IdentityMismatchError) as e:
        workdir.claim(wd, ident, cfg_json)
    msg = str(e.value)
    assert wd in msg and "an unfinished run" in msg
    assert "optimizer.learning_rate: 0.001 -> 0.0003" in msg
    assert "--workdir" in msg and "--discard_old_run" in msg
    assert open(os.path.join(wd, "config.json")).read() == other_json
    # Discarding moves the old run aside (nothing deleted); the lock stays.
    workdir.claim(wd, ident, cfg_json, discard_old_run=True)
    [moved] = [p for p in os.listdir(tmp_path) if p.startswith("run.discarded-")]
    assert sorted(os.listdir(tmp_path / moved)) == ["checkpoints", "config.json", "identity.json"]
    assert open(tmp_path / moved / "config.json").read() == other_json
    assert sorted(os.listdir(wd)) == ["config.json", "identity.json", "run.lock"]
    assert open(os.path.join(wd, "config.json")).read() == cfg_json


def test_results_without_identity_are_refused(tmp_path):
    wd = str(tmp_path)
    json.dump({"macro_f1": 0.9}, open(os.path.join(wd, "metrics.json"), "w"))
    ident, cfg_json = _identity()
    with pytest.raises(workdir.IdentityMismatchError,
                       match="a finished run(.|\n)*identity.json: missing"):
        workdir.claim(wd, ident, cfg_json)
    open(os.path.join(wd, "identity.json"), "w").write("{not json")
    with pytest.raises(workdir.WorkdirError, match="identity.json cannot be read"):
        workdir.claim(wd, ident, cfg_json)


_HOLDER = """
import sys, time
from histo_jax.workdir import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_busy_workdir_is_refused_and_a_killed_holders_lock_taken_over(tmp_path, caplog):
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, wd], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirBusyError) as e:
            workdir.WorkdirLock(wd).acquire()
        msg = str(e.value)
        assert wd in msg and f"pid {holder.pid} on host {socket.gethostname()}" in msg
        assert "another --workdir" in msg
        # The trainer is refused before it does anything in the workdir.
        c = tiny_config(str(tmp_path / "no_data"), str(tmp_path / "prepared"))
        with pytest.raises(workdir.WorkdirBusyError, match=f"pid {holder.pid}"):
            train.train_and_evaluate(c, wd)
        assert os.listdir(wd) == ["run.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="histo_jax.workdir"):
        lock = workdir.WorkdirLock(wd).acquire()
    assert f"taking over the lock left by pid {holder.pid}" in caplog.text
    assert json.load(open(lock.path))["pid"] == os.getpid()
    lock.release()
    assert open(lock.path).read() == ""  # released, not abandoned: the next one warns not
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histo_jax.workdir"):
        workdir.WorkdirLock(wd).acquire().release()
    assert "taking over" not in caplog.text


def test_write_failures_name_the_file_and_the_reason(tmp_path):
    path = str(tmp_path / "x.json")
    with pytest.raises(workdir.WriteFailedError) as e:
        with workdir.writing("the test metrics", path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == (f"Could not write the test metrics ({path}): the disk is full "
                            "([Errno 28] No space left on device).")
    with pytest.raises(workdir.WriteFailedError, match="an I/O error"):
        with workdir.writing("the metrics log", path):
            raise OSError(errno.EIO, "Input/output error")
    workdir.write_atomic(path, "{}", "x")
    assert open(path).read() == "{}" and os.listdir(tmp_path) == ["x.json"]
