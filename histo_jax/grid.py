"""The study's experiment grid: number of scales x runs, summarised as a CSV and a plot.

Each cell trains in ``<workdir>/n<N>/run<r>/`` with ``num_inputs=N``, ``run=r`` (splits
with ``random_state=42+r``) and ``seed=config.seed + r``. A finished cell is skipped, so
rerunning the command after an interruption continues the grid. Every cell is a run with
its own identity (``histo_jax.workdir``): before anything is trained, all existing cells
are checked against this command, and cells of another configuration or data are refused
(or, with ``discard_old_run``, moved aside together with the old summary), so
``results.csv`` never mixes settings.
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
from histo_jax import workdir as workdir_lib

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "auroc")


SUMMARY_FILES = ("results.csv", "results.json", "f1_vs_scales.png")


def cell_workdir(workdir: str, num_inputs: int, run: int) -> str:
    return os.path.join(workdir, f"n{num_inputs}", f"run{run}")


def cell_config(config: ml_collections.ConfigDict, num_inputs: int, run: int
                ) -> ml_collections.ConfigDict:
    """The single-run config of grid cell ``(num_inputs, run)``."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.num_inputs, cfg.run, cfg.seed = int(num_inputs), int(run), int(config.seed + run)
    cfg.grid.num_inputs, cfg.grid.runs = (), ()
    return cfg


def run_grid(config: ml_collections.ConfigDict, workdir: str, *,
             discard_old_run: bool = False) -> list[dict]:
    """Trains every (num_inputs, run) cell not yet finished; writes results.csv and the plot."""
    cells = {(n, r): cell_config(config, n, r)
             for n in config.grid.num_inputs for r in config.grid.runs}
    with train.hold_workdir(workdir):
        train.on_primary(lambda: check_cells(config, workdir, cells, discard_old_run),
                         "grid check")
        results = {}
        for (n, r), cfg in cells.items():
            wd = cell_workdir(workdir, n, r)
            log.info("Grid cell: %d input(s), run %d -> %s", n, r, wd)
            results[(n, r)] = train.train_and_evaluate(cfg, wd)
        rows = summarize(results)
        if jax.process_index() == 0:
            write_summary(rows, workdir)
    return rows


def check_cells(config: ml_collections.ConfigDict, workdir: str, cells: dict,
                discard_old_run: bool) -> None:
    """Compares every existing cell with this command before any cell trains.

    Raises:
      IdentityMismatchError: some cells hold runs of another identity (all are listed), and
        ``discard_old_run`` is False. With it, those cells and the old summary files are
        moved to ``<workdir>.discarded-<time>/`` (same layout).
    """
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.dir = train.resolve_data_dir(config)
    fingerprint = workdir_lib.data_fingerprint(data_cfg)
    mismatches = []
    for (n, r), cfg in cells.items():
        wd = cell_workdir(workdir, n, r)
        if os.path.isdir(wd):
            m = workdir_lib.compare(wd, workdir_lib.RunIdentity.of(cfg, fingerprint))
            if m is not None:
                mismatches.append(m)
    if not mismatches:
        return
    if not discard_old_run:
        raise workdir_lib.mismatch_error(mismatches)
    dest = workdir_lib.discarded_path(workdir)
    for m in mismatches:
        with workdir_lib.WorkdirLock(m.workdir):
            rel = os.path.relpath(m.workdir, workdir)
            workdir_lib.move_aside(m.workdir, os.path.join(dest, rel))
    with workdir_lib.writing("the discarded grid summary", dest):
        os.makedirs(dest, exist_ok=True)
        for name in SUMMARY_FILES:
            if os.path.exists(os.path.join(workdir, name)):
                os.replace(os.path.join(workdir, name), os.path.join(dest, name))
    log.warning("Moved %d grid cell(s) of another configuration or data, and the old summary, "
                "to %s.", len(mismatches), dest)


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
    path = os.path.join(workdir, "results.csv")
    with workdir_lib.writing("the grid summary", workdir):
        os.makedirs(workdir, exist_ok=True)
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
