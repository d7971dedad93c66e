"""The study's experiment grid: number of scales x runs, summarised as a CSV and a plot.

Each cell trains in ``<workdir>/n<N>/run<r>/`` with ``num_inputs=N``, ``run=r`` (splits
with ``random_state=42+r``) and ``seed=config.seed + r``. A cell whose ``metrics.json``
exists is skipped, so rerunning the command after an interruption continues the grid.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from histo_jax import plots, train

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "auroc")


def cell_workdir(workdir: str, num_inputs: int, run: int) -> str:
    return os.path.join(workdir, f"n{num_inputs}", f"run{run}")


def run_grid(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains every (num_inputs, run) cell not yet finished; writes results.csv and the plot."""
    results = {}
    for n in config.grid.num_inputs:
        for r in config.grid.runs:
            cfg = ml_collections.ConfigDict(config.to_dict())
            cfg.num_inputs, cfg.run, cfg.seed = int(n), int(r), int(config.seed + r)
            cfg.grid.num_inputs, cfg.grid.runs = (), ()
            wd = cell_workdir(workdir, n, r)
            log.info("Grid cell: %d input(s), run %d -> %s", n, r, wd)
            results[(n, r)] = train.train_and_evaluate(cfg, wd)
    rows = summarize(results)
    if jax.process_index() == 0:
        write_summary(rows, workdir)
    return rows


def summarize(results: dict) -> list[dict]:
    """One row per number of inputs: mean and std of the test macro-F1 and means of the other
    metrics. ``std_test_f1`` is the population standard deviation (ddof = 0), the figure the
    reference reports (``np.std``); ``sample_std_test_f1`` is the sample one (ddof = 1; empty
    for a single run)."""
    rows = []
    for n in sorted({k[0] for k in results}):
        cell = [results[k] for k in sorted(results) if k[0] == n]
        f1 = np.array([m["macro_f1"] for m in cell], float)
        # std_test_f1 is the reference's figure: numpy's default, the population std (ddof=0).
        row = {"num_inputs": n, "mean_test_f1": float(f1.mean()), "std_test_f1": float(f1.std()),
               "n_runs": len(cell),
               "sample_std_test_f1": float(f1.std(ddof=1)) if len(f1) > 1 else None}
        for k in SUMMARY_METRICS:
            row[f"mean_test_{k}"] = float(np.nanmean([m[k] for m in cell]))
        rows.append(row)
    return rows


def write_summary(rows: list[dict], workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "results.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plots.f1_vs_scales(rows, os.path.join(workdir, "f1_vs_scales.png"))
    for r in rows:
        log.info("%d input(s): test macro-F1 %.4f +- %.4f over %d run(s)", r["num_inputs"],
                 r["mean_test_f1"], r["std_test_f1"], r["n_runs"])
    log.info("Grid summary -> %s", path)
