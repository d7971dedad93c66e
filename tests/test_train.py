"""The trainer end to end on a tiny model: outputs, exact resume after SIGKILL, NaN guard, grid."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runutil import REPO, cli_flags, tiny_config

from histo_jax import grid, train
from histo_jax.config import get_base_config


def test_run_writes_metrics_and_artifacts(trained_run):
    wd, result = trained_run["workdir"], trained_run["result"]
    on_disk = json.load(open(os.path.join(wd, "metrics.json")))
    assert on_disk == json.loads(json.dumps(result))
    for key in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "confusion_matrix"):
        assert key in result
    assert np.asarray(result["confusion_matrix"]).sum() == result["num_samples"] > 0
    for name in ("config.json", "splits.json", "metrics.jsonl", "test_predictions.csv",
                 "training_curves.png", "confusion_matrix.png"):
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
    # The best epoch's validation F1 is the maximum of the history.
    assert result["best_val_macro_f1"] == max(r["epoch/val_macro_f1"] for r in epochs)
    header = open(os.path.join(wd, "test_predictions.csv")).readline().strip().split(",")
    assert header[:4] == ["filename", "num_id", "label", "predicted"]
    assert "attn_high_mag_1024_to_high_mag_2048" in header


def test_rerun_of_finished_run_returns_its_metrics(trained_run):
    again = train.train_and_evaluate(trained_run["config"], trained_run["workdir"])
    assert again == json.loads(json.dumps(trained_run["result"]))


def test_sigkill_mid_epoch_then_rerun_gives_identical_metrics(trained_run, tmp_path):
    """Kill the training process mid-epoch; the same command resumes and ends identically."""
    c = trained_run["config"]
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(REPO, "main.py"), f"--config={REPO}/configs/four_scale.py",
           f"--workdir={workdir}", *cli_flags(c)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Step 4 is mid-epoch 2 (3 steps per epoch, a checkpoint every 2 steps).
    target = os.path.join(workdir, "checkpoints", "4")
    deadline = time.time() + 600
    while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from" in out.stderr
    resumed = json.load(open(os.path.join(workdir, "metrics.json")))
    expected = json.loads(json.dumps(trained_run["result"]))
    for key in ("macro_f1", "accuracy", "auroc", "confusion_matrix", "best_epoch", "best_val_macro_f1"):
        assert resumed[key] == expected[key], key

    def epoch_rows(wd):
        rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
        return {r["epoch"]: (r["epoch/train_loss"], r["epoch/val_macro_f1"], r["epoch/val_loss"])
                for r in rows if "epoch/val_macro_f1" in r}
    got, want = epoch_rows(workdir), epoch_rows(trained_run["workdir"])
    assert sorted(got) == [1, 2, 3, 4]
    for e in want:
        np.testing.assert_allclose(got[e], want[e], rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(trained_run, tmp_path):
    c = tiny_config(trained_run["config"].data.dir, trained_run["config"].data.prepared_dir,
                    trained_run["config"].compilation_cache_dir)
    c.optimizer.learning_rate = 1e30
    c.optimizer.grad_clip_norm = 0.0
    c.checkpoint_every_steps = 1
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="Non-finite training loss.*last good checkpoint"):
        train.train_and_evaluate(c, workdir)
    kept = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert kept, "the good steps before the divergence were checkpointed"
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    good = [r["step"] for r in rows if "train/loss" in r]
    assert max(kept) == max(good)  # nothing saved after the non-finite step
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))


def test_grid_summary_and_skip_of_finished_cells(tmp_path, monkeypatch):
    """results.csv / plot from per-cell metrics; finished cells are not retrained."""
    c = get_base_config()
    c.grid.num_inputs, c.grid.runs = (1, 2), (0, 1)
    f1 = {(1, 0): 0.6, (1, 1): 0.7, (2, 0): 0.8, (2, 1): 0.9}
    for (n, r), v in f1.items():
        wd = grid.cell_workdir(str(tmp_path), n, r)
        os.makedirs(wd)
        json.dump({"macro_f1": v, "accuracy": v, "balanced_accuracy": v, "auroc": 1.0},
                  open(os.path.join(wd, "metrics.json"), "w"))
    seen = []
    real = train.train_and_evaluate

    def spy(cfg, wd):
        seen.append((cfg.num_inputs, cfg.run, cfg.seed))
        assert os.path.exists(os.path.join(wd, "metrics.json")), "a finished cell was retrained"
        return real(cfg, wd)  # returns the stored metrics without training
    monkeypatch.setattr(train, "train_and_evaluate", spy)
    rows = grid.run_grid(c, str(tmp_path))
    assert seen == [(1, 0, 0), (1, 1, 1), (2, 0, 0), (2, 1, 1)]
    assert [r["num_inputs"] for r in rows] == [1, 2]
    np.testing.assert_allclose([r["mean_test_f1"] for r in rows], [0.65, 0.85])
    # The reference's figure is np.std (population, ddof=0); the sample std has its own column.
    np.testing.assert_allclose([r["std_test_f1"] for r in rows], [0.05, 0.05])
    np.testing.assert_allclose([r["sample_std_test_f1"] for r in rows], [np.std([.6, .7], ddof=1)] * 2)
    csv_lines = open(tmp_path / "results.csv").read().splitlines()
    assert csv_lines[0].startswith("num_inputs,mean_test_f1,std_test_f1,n_runs")
    assert len(csv_lines) == 3
    assert os.path.getsize(tmp_path / "f1_vs_scales.png") > 0


def test_splits_written_by_the_run_are_leakage_free(trained_run):
    split = json.load(open(os.path.join(trained_run["workdir"], "splits.json")))
    ids = {k: {f.split("_")[0] for f in split[k]["filenames"]} for k in ("train", "val", "test")}
    assert all(ids.values())
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    n = sum(len(split[k]["indices"]) for k in ("train", "val", "test"))
    assert n == 36  # every sample in exactly one split
    index_sets = [set(split[k]["indices"]) for k in ("train", "val", "test")]
    assert len(set.union(*index_sets)) == n


def test_two_processes_on_loopback_match_one_process(trained_run, tmp_path):
    """jax.distributed with a local coordinator: 2 processes x 2 CPU devices = the 4-device run."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = trained_run["config"]
    workdir = str(tmp_path / "two_procs")
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "main.py"), f"--config={REPO}/configs/four_scale.py",
             f"--workdir={workdir}", *cli_flags(c)], env=env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err)
        assert p.returncode == 0, err[-3000:]
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
