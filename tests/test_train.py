"""The trainer end to end on a tiny model: outputs, what a workdir refuses (another config or
data, a half-way run under new settings, mixed grid cells) and survives (kill -9 at every
stage, full disk and I/O errors, a non-finite loss), the grid, and two processes."""

import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grain
import ml_collections
import numpy as np
import pytest

from runutil import REPO, cli_flags, tiny_config

from histo_jax import failstop, grid, metrics, parallel, plots, train, workdir

# Values that differ between two identical runs: wall-clock times and throughput.
TIMING_KEYS = {"time", "epoch/samples_per_s", "epoch/train_s", "epoch/val_s"}


def _rows(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(wd):
    return sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())


def assert_same_run(wd, trained_run):
    """``wd`` ended exactly as the uninterrupted run: test metrics and every logged scalar."""
    got, want = json.load(open(os.path.join(wd, "metrics.json"))), trained_run["result"]
    for key in ("macro_f1", "accuracy", "auroc", "confusion_matrix", "best_epoch",
                "best_val_macro_f1", "epochs_trained"):
        assert got[key] == want[key], key
    rows, ref = _rows(wd), _rows(trained_run["workdir"])
    assert [r["epoch"] for r in rows if "epoch/val_macro_f1" in r] == [1, 2, 3, 4]
    assert [(r["step"], sorted(set(r) - TIMING_KEYS)) for r in rows] == \
        [(r["step"], sorted(set(r) - TIMING_KEYS)) for r in ref]
    for a, b in zip(rows, ref):
        keys = sorted(set(a) - TIMING_KEYS - {"step", "epoch"})
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-6,
                                   err_msg=f"step {a['step']}")
    # TensorBoard: each (tag, step) once, the same scalars as the uninterrupted run's.
    tb, tb_ref = (metrics.read_tensorboard_scalars(os.path.join(d, "tensorboard"))
                  for d in (wd, trained_run["workdir"]))
    pairs = [(tag, step) for tag, step, _ in tb if tag not in TIMING_KEYS]
    assert len(pairs) == len(set(pairs)) and len(pairs) > 20
    assert pairs == [(tag, step) for tag, step, _ in tb_ref if tag not in TIMING_KEYS]
    np.testing.assert_allclose([v for t, _, v in tb if t not in TIMING_KEYS],
                               [v for t, _, v in tb_ref if t not in TIMING_KEYS], rtol=1e-6)


def _copy(config):
    return ml_collections.ConfigDict(config.to_dict())


def test_run_writes_metrics_and_artifacts(trained_run):
    wd, result = trained_run["workdir"], trained_run["result"]
    on_disk = json.load(open(os.path.join(wd, "metrics.json")))
    assert on_disk == json.loads(json.dumps(result))
    for key in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "confusion_matrix"):
        assert key in result
    assert np.asarray(result["confusion_matrix"]).sum() == result["num_samples"] > 0
    for name in ("identity.json", "config.json", "splits.json", "metrics.jsonl",
                 "test_predictions.csv", "training_curves.png", "confusion_matrix.png"):
        path = os.path.join(wd, name)
        assert os.path.getsize(path) > 0, name
    assert os.listdir(os.path.join(wd, "tensorboard"))
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    epochs = [r for r in rows if "epoch/val_macro_f1" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert any("train/loss" in r for r in rows) and any("test/macro_f1" in r for r in rows)
    split = json.load(open(os.path.join(wd, "splits.json")))
    assert set(split) >= {"train", "val", "test"}
    assert json.load(open(os.path.join(wd, "config.json")))["num_inputs"] == 2
    identity = json.load(open(os.path.join(wd, "identity.json")))
    assert identity["fields"]["num_inputs"] == 2 and "progress" not in identity["fields"]
    assert open(os.path.join(wd, "run.lock")).read() == ""  # released
    # The best epoch's validation F1 is the maximum of the history.
    assert result["best_val_macro_f1"] == max(r["epoch/val_macro_f1"] for r in epochs)
    header = open(os.path.join(wd, "test_predictions.csv")).readline().strip().split(",")
    assert header[:4] == ["filename", "num_id", "label", "predicted"]
    assert "attn_high_mag_1024_to_high_mag_2048" in header


def test_rerun_of_finished_run_returns_its_metrics(trained_run):
    c = _copy(trained_run["config"])
    # Fields outside the identity may change; config.json keeps the run's own config.
    c.progress, c.log_every_steps, c.keep_checkpoints, c.checkpoint_every_steps = True, 5, 3, 0
    c.data.num_workers, c.compilation_cache_dir = 1, ""
    config_json = open(os.path.join(trained_run["workdir"], "config.json")).read()
    again = train.train_and_evaluate(c, trained_run["workdir"])
    assert again == json.loads(json.dumps(trained_run["result"]))
    assert open(os.path.join(trained_run["workdir"], "config.json")).read() == config_json


def test_finished_run_is_refused_for_another_model_or_data_but_not_a_moved_folder(trained_run, tmp_path):
    wd = trained_run["workdir"]
    before = {n: open(os.path.join(wd, n)).read() for n in ("config.json", "metrics.json")}
    c = _copy(trained_run["config"])
    c.model.width_mult = 0.5
    with pytest.raises(workdir.IdentityMismatchError) as e:
        train.train_and_evaluate(c, wd)
    assert f"{wd} holds a finished run of another configuration" in str(e.value)
    assert "  model.width_mult: 1.0 -> 0.5\n" in str(e.value)
    # The same files elsewhere (copied with their times) are the same data ...
    moved = str(tmp_path / "moved_data")
    shutil.copytree(trained_run["config"].data.dir, moved)
    c = _copy(trained_run["config"])
    c.data.dir = moved
    assert train.train_and_evaluate(c, wd) == json.loads(json.dumps(trained_run["result"]))
    # ... relabelled, they are not (refused from a scan, before anything is prepared).
    labels = os.path.join(moved, "labels.csv")
    rows = open(labels).read().splitlines()
    name, label = rows[1].split(",")
    rows[1] = f"{name},{1 - int(label)}"
    open(labels, "w").write("\n".join(rows) + "\n")
    with pytest.raises(workdir.IdentityMismatchError, match="data \\(prepared dataset fingerprint\\)"):
        train.train_and_evaluate(c, wd)
    assert before == {n: open(os.path.join(wd, n)).read() for n in before}


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)  # XLA_FLAGS of tests/conftest.py


def test_cli_refuses_another_config_with_the_differences_and_no_traceback(trained_run):
    c, wd = trained_run["config"], trained_run["workdir"]
    before = open(os.path.join(wd, "config.json")).read()
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), f"--config={REPO}/configs/four_scale.py",
         f"--workdir={wd}", *cli_flags(c), "--config.optimizer.learning_rate=0.001"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    message = out.stderr[out.stderr.index("histo_jax: "):]
    # Exactly one difference: the command line is the fixture's config but for the lr.
    assert message.splitlines()[1:3] == ["  optimizer.learning_rate: 0.0003 -> 0.001",
                                         workdir.DISCARD_HINT]
    assert open(os.path.join(wd, "config.json")).read() == before


# One workdir, one command, killed in turn at each point of tests/killpoint.py.
KILL_CHAIN = ("compile", "batch:6", "checkpoint", "validation:2", "test_outputs")


def test_kill_9_at_every_stage_then_the_same_command_ends_identically(trained_run, tmp_path):
    """SIGKILL while the train step compiles, mid-epoch, inside a checkpoint write, during
    validation and while the test outputs are written, each followed by the same command:
    the last, uninterrupted run ends exactly as the uninterrupted fixture run (3 steps per
    epoch, a checkpoint every 2 steps)."""
    c = trained_run["config"]
    wd = str(tmp_path / "killed")
    flags = [f"--config={REPO}/configs/four_scale.py", f"--workdir={wd}", *cli_flags(c)]
    hook = [sys.executable, os.path.join(REPO, "tests", "killpoint.py"), *flags]
    for k, point in enumerate(KILL_CHAIN):
        out = subprocess.run(hook, env=_env(HISTO_JAX_KILL_AT=point, HISTO_JAX_MALLOC_TUNING="0"),
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == -signal.SIGKILL, f"{point}:\n{out.stderr[-3000:]}"
        assert not os.path.exists(os.path.join(wd, "metrics.json")), point
        assert ("taking over the lock left by pid" in out.stderr) == (k > 0), point
        if point == "compile":
            assert os.path.exists(os.path.join(wd, "identity.json"))
            assert not os.path.exists(os.path.join(wd, "checkpoints")) or not _steps(wd)
        elif point == "batch:6":  # after step 5, one step after the checkpoint of step 4
            assert _steps(wd) == [3, 4]
        elif point == "checkpoint":  # in the save of step 6: unfinished, ignored on resume
            assert _steps(wd) == [3, 4]
            assert glob.glob(os.path.join(wd, "checkpoints", "6.orbax-checkpoint-tmp*"))
        elif point == "validation:2":  # resumed at 4, saved 6 and 8, killed validating epoch 3
            assert _steps(wd) == [6, 8]
        elif point == "test_outputs":
            assert _steps(wd) == [10, 12]
            assert os.path.exists(os.path.join(wd, "test_predictions.csv"))
    out = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *flags], env=_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from" in out.stderr and "taking over the lock" in out.stderr
    assert_same_run(wd, trained_run)


def test_faults_stop_the_run_clearly_and_the_rerun_resumes_exactly(trained_run, tmp_path, monkeypatch):
    """A non-finite loss, a full disk in a checkpoint write, an I/O error in the metrics log
    and a full disk while the test outputs are written: each stops the run with a clear
    error, keeps the last complete checkpoint, and the same call resumes from it. The workdir
    first holds an old run of another config, discarded (moved aside); one resume finds a
    data-iterator state of another worker count. At the end the run equals the
    uninterrupted one, scalar log included."""
    c = tiny_config(trained_run["config"].data.dir, trained_run["config"].data.prepared_dir,
                    trained_run["config"].compilation_cache_dir)
    wd = str(tmp_path / "faults")
    old = _copy(c)
    old.optimizer.learning_rate = 1e-3
    os.makedirs(os.path.join(wd, "checkpoints", "7"))
    json.dump({"macro_f1": 0.99}, open(os.path.join(wd, "metrics.json"), "w"))
    workdir.write_atomic(os.path.join(wd, "identity.json"), json.dumps(
        workdir.RunIdentity.of(old, workdir.data_fingerprint(old.data)).to_json()), "identity")

    # 1. A non-finite loss at step 5 (an out-of-range label; the compiled step is the same).
    global_batch, seen = parallel.global_batch, [0]

    def bad_label_batch(mesh, local):
        if "mask" not in local:
            seen[0] += 1
            if seen[0] == 5:
                local = dict(local, labels=np.full_like(local["labels"], 7))
        return global_batch(mesh, local)
    monkeypatch.setattr(parallel, "global_batch", bad_label_batch)
    with pytest.raises(train.NonFiniteLossError,
                       match="Non-finite training loss.*step 5.*last good checkpoint"):
        train.train_and_evaluate(c, wd, discard_old_run=True)
    monkeypatch.undo()
    [discarded] = glob.glob(wd + ".discarded-*")
    assert json.load(open(os.path.join(discarded, "metrics.json"))) == {"macro_f1": 0.99}
    assert _steps(wd) == [3, 4]  # nothing saved after the non-finite step
    assert max(r["step"] for r in _rows(wd) if "train/loss" in r) == 4

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def stopped(fault_target, fault, kept_step):
        monkeypatch.setattr(*fault_target, fault)
        with pytest.raises(workdir.WriteFailedError) as e:
            train.train_and_evaluate(c, wd)
        monkeypatch.undo()
        assert f"Its last complete checkpoint, {wd}/checkpoints/{kept_step}, is kept" in str(e.value)
        assert "the same command resumes from it" in str(e.value)
        assert _steps(wd)[-1] == kept_step and not os.path.exists(os.path.join(wd, "metrics.json"))
        return str(e.value)

    # 2. The disk fills up inside the checkpoint write of step 6 (end of epoch 2).
    msg = stopped((grain.checkpoint.CheckpointHandler, "save"), no_space, 4)
    assert msg.startswith(f"Could not write the training state checkpoint {wd}/checkpoints/6: "
                          "the disk is full ([Errno 28] No space left on device).")

    # The half-way run under another learning rate: refused, config.json untouched.
    config_json = open(os.path.join(wd, "config.json")).read()
    with pytest.raises(workdir.IdentityMismatchError,
                       match="an unfinished run(.|\n)*optimizer.learning_rate: 0.0003 -> 0.001"):
        train.train_and_evaluate(old, wd)
    assert open(os.path.join(wd, "config.json")).read() == config_json

    # 3. An I/O error half-way through epoch 3's row of the metrics log.
    write = metrics.MetricWriter.write

    def broken_write(self, step, scalars, **fields):
        if "epoch/val_macro_f1" in scalars and fields.get("epoch") == 3:
            self._jsonl.write('{"step": 9, "ep')
            self._jsonl.flush()
            raise OSError(errno.EIO, "Input/output error")
        return write(self, step, scalars, **fields)
    msg = stopped((metrics.MetricWriter, "write"), broken_write, 8)
    assert msg.startswith(f"Could not write the metrics log ({wd}/metrics.jsonl): an I/O error")
    assert open(os.path.join(wd, "metrics.jsonl")).read().endswith('{"step": 9, "ep')

    # As if step 8 had been saved with data.num_workers=2: Grain refuses that iterator state,
    # so the training stream restarts at global batch 8 (the same batches, see the end).
    it_file = os.path.join(wd, "checkpoints", "8", "data_iter", "process_0-of-1.json")
    it_state = json.load(open(it_file))
    json.dump(dict(it_state, worker_count=2), open(it_file, "w"))

    # 4. The disk fills up while the test outputs are written.
    msg = stopped((plots, "confusion_matrix"), no_space, 12)
    assert msg.startswith(f"Could not write the test outputs ({wd}): the disk is full")
    meta = json.load(open(os.path.join(wd, "checkpoints", "12", "meta", "metadata")))
    assert meta["data_start_step"] == 8

    # The same call once more: it resumes (the log continues from the checkpoint's rows).
    train.train_and_evaluate(c, wd)
    assert_same_run(wd, trained_run)


def _grid_with_finished_cells(trained_run, root):
    """A 2 x 2 grid whose cells are finished (their identity and metrics.json only)."""
    c = tiny_config(trained_run["config"].data.dir, trained_run["config"].data.prepared_dir)
    c.grid.num_inputs, c.grid.runs = (1, 2), (0, 1)
    fingerprint = workdir.data_fingerprint(c.data)
    f1 = {(1, 0): 0.6, (1, 1): 0.7, (2, 0): 0.8, (2, 1): 0.9}
    for (n, r), v in f1.items():
        wd = grid.cell_workdir(root, n, r)
        os.makedirs(wd)
        identity = workdir.RunIdentity.of(grid.cell_config(c, n, r), fingerprint)
        workdir.write_atomic(os.path.join(wd, "identity.json"), json.dumps(identity.to_json()), "id")
        json.dump({"macro_f1": v, "accuracy": v, "balanced_accuracy": v, "auroc": 1.0},
                  open(os.path.join(wd, "metrics.json"), "w"))
    return c


def test_grid_summary_and_skip_of_finished_cells(trained_run, tmp_path, monkeypatch):
    """results.csv / plot from per-cell metrics; finished cells are not retrained."""
    root = str(tmp_path / "grid")
    c = _grid_with_finished_cells(trained_run, root)
    seen = []
    real = train.train_and_evaluate

    def spy(cfg, wd, **kwargs):
        seen.append((cfg.num_inputs, cfg.run, cfg.seed))
        assert os.path.exists(os.path.join(wd, "metrics.json")), "a finished cell was retrained"
        return real(cfg, wd, **kwargs)  # returns the stored metrics without training
    monkeypatch.setattr(train, "train_and_evaluate", spy)
    rows = grid.run_grid(c, root)
    assert seen == [(1, 0, 0), (1, 1, 1), (2, 0, 0), (2, 1, 1)]
    assert [r["num_inputs"] for r in rows] == [1, 2]
    np.testing.assert_allclose([r["mean_test_f1"] for r in rows], [0.65, 0.85])
    # The reference's figure is np.std (population, ddof=0); the sample std has its own column.
    np.testing.assert_allclose([r["std_test_f1"] for r in rows], [0.05, 0.05])
    np.testing.assert_allclose([r["sample_std_test_f1"] for r in rows], [np.std([.6, .7], ddof=1)] * 2)
    csv_lines = open(os.path.join(root, "results.csv")).read().splitlines()
    assert csv_lines[0].startswith("num_inputs,mean_test_f1,std_test_f1,n_runs")
    assert len(csv_lines) == 3
    assert os.path.getsize(os.path.join(root, "f1_vs_scales.png")) > 0


def test_grid_refuses_cells_of_another_setting_before_training_any(trained_run, tmp_path, monkeypatch):
    root = str(tmp_path / "grid")
    c = _grid_with_finished_cells(trained_run, root)
    grid.write_summary(grid.summarize({(1, 0): {"macro_f1": 0.6, "accuracy": 0, "balanced_accuracy": 0,
                                               "auroc": 0}}), root)
    summary = open(os.path.join(root, "results.csv")).read()
    c.data.normalization = "imagenet"
    c.grid.runs = (0, 1, 2)  # a new cell, n1/run2, would be trained first
    trained = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda cfg, wd, **kw: trained.append(wd) or
                        {"macro_f1": 0.5, "accuracy": 0.5, "balanced_accuracy": 0.5, "auroc": 0.5})
    with pytest.raises(workdir.IdentityMismatchError) as e:
        grid.run_grid(c, root)
    msg = str(e.value)
    assert f"{root}/n1/run0 holds a finished run of another configuration" in msg
    assert '  data.normalization: "none" -> "imagenet"' in msg and "3 more run(s) differ" in msg
    assert trained == [] and open(os.path.join(root, "results.csv")).read() == summary
    # Discarding moves the old cells and summary aside, in the grid's layout; all cells train.
    rows = grid.run_grid(c, root, discard_old_run=True)
    [moved] = glob.glob(root + ".discarded-*")
    assert sorted(os.listdir(moved)) == ["f1_vs_scales.png", "n1", "n2", "results.csv", "results.json"]
    assert json.load(open(os.path.join(moved, "n2", "run1", "metrics.json")))["macro_f1"] == 0.9
    assert open(os.path.join(moved, "results.csv")).read() == summary
    assert len(trained) == 6 and rows[0]["n_runs"] == 3
    assert not os.path.exists(os.path.join(root, "n2", "run1", "metrics.json"))


def test_splits_written_by_the_run_are_leakage_free(trained_run):
    split = json.load(open(os.path.join(trained_run["workdir"], "splits.json")))
    ids = {k: {f.split("_")[0] for f in split[k]["filenames"]} for k in ("train", "val", "test")}
    assert all(ids.values())
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    n = sum(len(split[k]["indices"]) for k in ("train", "val", "test"))
    assert n == 36  # every sample in exactly one split
    index_sets = [set(split[k]["indices"]) for k in ("train", "val", "test")]
    assert len(set.union(*index_sets)) == n


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: str, c, env=({}, {}), extra=(), timeout=900):
    """main.py (through tests/killpoint.py, which honours HISTO_JAX_KILL_AT / _FAIL_AT in
    ``env[i]``) as 2 processes x 2 CPU devices on a loopback coordinator. Returns, per
    process, (exit status, stderr, seconds after the first process ended)."""
    port = _free_port()
    two_devices = re.sub(r"(xla_force_host_platform_device_count)=\d+", r"\1=2", os.environ["XLA_FLAGS"])
    procs = []
    for pid in range(2):
        e = _env(XLA_FLAGS=two_devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), HISTO_JAX_MALLOC_TUNING="0",
                 **env[pid])
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "killpoint.py"),
             f"--config={REPO}/configs/four_scale.py", f"--workdir={workdir}", *cli_flags(c), *extra],
            env=e, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    # Drain both stderr pipes while waiting (a full pipe would block a process).
    errs, ended = ["", ""], [None, None]

    def drain(i):
        errs[i] = procs[i].stderr.read()
        procs[i].wait()
        ended[i] = time.monotonic()
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        for q in procs:
            q.kill()
        raise AssertionError(f"a process did not end within {timeout} s: {[e[-2000:] for e in errs]}")
    first = min(ended)
    return [(p.returncode, err, t - first) for p, err, t in zip(procs, errs, ended)]


def test_two_processes_fail_stop_then_resume_and_match_one_process(trained_run, tmp_path):
    """jax.distributed with a loopback coordinator, 2 processes x 2 CPU devices, the fixture
    run's command. Fail-stop (histo_jax/failstop.py, timeout 10 s): process 1 killed -9
    mid-epoch, then process 0 (the coordinator) failing its checkpoint write; each time the
    survivor stops with status 3, naming the failed process and why. The third run of the
    same command resumes and ends as the 4-device one-process run (a wrong resume would feed
    other batches: the losses would differ far beyond the reassociation tolerance)."""
    c, timeout = trained_run["config"], 10
    workdir = str(tmp_path / "two_procs")
    extra = [f"--config.failure_timeout_s={timeout}"]
    killed = run_two_processes(workdir, c, env=({}, {"HISTO_JAX_KILL_AT": "batch:5"}), extra=extra)
    (rc0, err0, after0), (rc1, _, _) = killed
    print(f"kill -9 of process 1: process 0 ended {after0:.1f} s later")  # pytest -s shows it
    assert rc1 == -signal.SIGKILL
    assert rc0 == failstop.EXIT_PEER_FAILED, err0[-3000:]
    assert "histo_jax: process 1 of 2 failed: no sign of life for" in err0, err0[-3000:]
    assert "Terminating process" not in err0 and "Traceback" not in err0  # not JAX's abort
    assert _steps(workdir) == [3, 4]  # killed fetching step 5's batch

    failed = run_two_processes(workdir, c, env=({"HISTO_JAX_FAIL_AT": "checkpoint"}, {}), extra=extra)
    (rc0, err0, after0), (rc1, err1, after1) = failed
    print(f"failed write on process 0: the processes ended {after0:.1f} and {after1:.1f} s apart")
    assert rc0 == 1, err0[-3000:]
    assert "histo_jax: Could not write the training state checkpoint" in err0, err0[-3000:]
    assert rc1 == failstop.EXIT_PEER_FAILED, err1[-3000:]
    assert ("histo_jax: process 0 of 2 failed: WriteFailedError: Could not write the training "
            "state checkpoint") in err1 and "No space left on device" in err1, err1[-3000:]
    assert "Terminating process" not in err1 + err0 and "Traceback" not in err1 + err0
    assert _steps(workdir) == [3, 4]  # the failed save of step 6 left nothing

    out = run_two_processes(workdir, c, extra=extra)
    for rc, err, _ in out:
        assert rc == 0, err[-3000:]
    errs = [err for _, err, _ in out]
    assert "Resumed from" in errs[0]
    assert "2 process(es)" in errs[0]
    got = json.load(open(os.path.join(workdir, "metrics.json")))
    want = json.loads(json.dumps(trained_run["result"]))
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["best_epoch"] == want["best_epoch"]
    # Same numbers up to float reassociation in the cross-process reductions. (Exact metric
    # equality is not asked: a tiny model's near-tied scores can reorder under 1e-6 noise.)
    def probs(wd):
        with open(os.path.join(wd, "test_predictions.csv")) as f:
            rows = [line.rstrip().split(",") for line in f][1:]
        return {r[0]: float(r[5]) for r in rows}
    p2, p1 = probs(workdir), probs(trained_run["workdir"])
    assert sorted(p2) == sorted(p1)
    np.testing.assert_allclose([p2[k] for k in sorted(p1)], [p1[k] for k in sorted(p1)], atol=1e-4)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(trained_run["workdir"], "metrics.jsonl"))]
    for key in ("epoch/train_loss", "epoch/val_loss"):
        np.testing.assert_allclose([r[key] for r in rows if key in r], [r[key] for r in ref if key in r],
                                   rtol=1e-4, err_msg=key)
    # Each process saved its own data-iterator state.
    step_dirs = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    it_dir = os.path.join(workdir, "checkpoints", step_dirs[-1], "data_iter")
    assert sorted(f for f in os.listdir(it_dir) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    # Process 0 claimed the shared workdir (identity, lock) and released it.
    assert json.load(open(os.path.join(workdir, "identity.json")))["fields"]["num_inputs"] == 2
    assert open(os.path.join(workdir, "run.lock")).read() == ""


