"""Slide-level prediction: every tissue location of every slide, heatmaps and attention maps.

``predict_slides(config, model, slides, out)`` (``python -m histo_jax.predict --slides``)
detects tissue (``locate.py``), reads the run's fields of view (its ``config.data.scales``,
``high_mag_<F>`` px or ``fov_<U>um``) around every grid location straight from the
pyramid at the model's input size, in memory (no PNG), and classifies them with the
eval step on every device (batch sharded over the mesh, as ``predict_folder``). Reader
threads fill the next batches while the devices compute. Output, per slide::

    OUT/<slide>/predictions.csv   x, y, tissue_fraction, padded, predicted, prob_<class>...,
                                  attn_<query scale>_to_<key scale>...
    OUT/<slide>/heatmap.png       P(class 1) over the overview, tissue-masked; locations
                                  averaged where their smallest fields overlap (CLAM-style)
    OUT/<slide>/attention.png     per scale, the attention it receives (mean over queries)

and ``OUT/slides.csv`` / ``OUT/summary.json``: per slide the location count, the tumour
fraction (share of locations with P(class 1) >= 0.5), the max and mean probability and,
with annotations, the AUROC of the location probabilities against the annotated regions;
the timing split (reading / model). Slides that fail are listed there and do not stop
the others.

Crops are read from the pyramid level that fits ``F / image_size`` and resized once; a
model trained on ``extract`` crops (resized again by the data pipeline) sees the same
fields, with resampling differences of the order of one grey level.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import os
import queue
import sys
import threading
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from histo_jax import errors, hostenv, parallel, steps
from histo_jax.metrics import softmax
from histo_jax.slides import annotations as ann_lib
from histo_jax.slides import geometry, pictures
from histo_jax.slides.locate import fov_pixels, locate
from histo_jax.slides.reader import (InputError, IsolatedProbe, SlideError, check_unique_names,
                                     find_slides, open_slide)
from histo_jax.slides.tissue import TissueParams
from histo_jax.stain import normalize as stain_lib

log = logging.getLogger(__name__)


class _Planned:
    def __init__(self, slide, loc, fovs_px, ann):
        self.slide, self.loc, self.fovs_px, self.ann = slide, loc, fovs_px, ann
        self.error: str | None = None


def _plan(paths, fovs, *, mpp, stride, min_tissue, border, tissue, annotations_dir, class_map,
          failures, isolate: bool = True):
    planned = []
    probe = IsolatedProbe() if isolate else None
    try:
        for path in paths:
            slide = None
            reason = probe(path) if probe is not None else None
            if reason is not None:  # sampled in a separate process first: a crash costs one slide
                failures.append((path, reason))
                log.warning("FAILED %s: %s", path, reason)
                continue
            try:
                slide = open_slide(path, mpp)
                fovs_px = fov_pixels(slide, fovs)
                ann = None
                if annotations_dir:
                    try:
                        f = ann_lib.annotation_file(annotations_dir, slide.name)
                    except InputError:
                        f = None  # Evaluation is optional: unannotated slides are predicted only.
                    if f:
                        ann = ann_lib.read_annotations(f, class_map)
                loc = locate(slide, fovs_px, stride=stride, min_tissue=min_tissue, border=border,
                             tissue=tissue, overview_side=1400)
                planned.append(_Planned(slide, loc, fovs_px, ann))
            except InputError as e:
                failures.append((e.path, e.reason))
                log.warning("FAILED %s", e)
                if slide is not None:
                    slide.close()
    finally:
        if probe is not None:
            probe.close()
    return planned


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2:
        return None

    return float(roc_auc_score(labels, scores))


def predict_slides(config: ml_collections.ConfigDict, model, slide_paths: Sequence[str], out_dir: str,
                   *, stride: int | None = None, mpp: float | None = None,
                   min_tissue: float | None = None, border: str = "pad",
                   tissue: TissueParams = TissueParams(), batch_size: int | None = None,
                   num_workers: int = 4, annotations_dir: str | None = None,
                   class_map: dict | None = None, progress: bool = True,
                   pictures_too: bool = True, isolate: bool = True) -> dict:
    """Predicts every tissue location of every slide (module docstring); returns the summary."""
    n_in = int(config.num_inputs)
    scales = tuple(config.data.scales)[:n_in]
    fovs = [geometry.fov_of_folder(s) for s in scales]
    size = int(config.data.image_size)
    names = list(config.data.class_names)
    positive = 1 if len(names) > 1 else 0
    class_map = class_map or ann_lib.parse_class_map(ann_lib.DEFAULT_CLASS_MAP)
    paths, errs = find_slides(slide_paths)
    failures: list[tuple[str, str]] = [(e.path, e.reason) for e in errs]
    check_unique_names(paths)
    t0 = time.time()
    planned = _plan(paths, fovs, mpp=mpp, stride=stride, min_tissue=min_tissue, border=border,
                    tissue=tissue, annotations_dir=annotations_dir, class_map=class_map,
                    failures=failures, isolate=isolate)
    t_plan = time.time() - t0

    # ---- Model on every device ------------------------------------------------------------
    mesh = parallel.make_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    batch_size = batch_size or int(config.eval_batch_size)
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    local = batch_size // n_proc
    graphs, params, batch_stats = steps.split_model(model)
    repl = parallel.replicated(mesh)
    params, batch_stats = jax.device_put((params, batch_stats), repl)
    stain = stain_lib.from_config(config.data.get("stain"))  # the run's (or --stain's) normaliser
    eval_fn = jax.jit(steps.make_eval_step(graphs, config.data.normalization, stain),
                      in_shardings=(repl, repl, parallel.batch_sharding(mesh)),
                      compiler_options=steps.compiler_options())

    items = [(s, k) for s, p in enumerate(planned) for k in range(len(p.loc))]
    n_batches = -(-len(items) // batch_size)
    t = time.perf_counter()
    if items:  # Compile ahead, so that the timing split below is compile-free.
        spec = jax.ShapeDtypeStruct((batch_size, n_in, size, size, 3), np.uint8,
                                    sharding=parallel.batch_sharding(mesh))
        eval_fn = eval_fn.lower(params, batch_stats, spec).compile()
        hostenv.release_free_memory()
    t_compile = time.perf_counter() - t
    lo = jax.process_index() * local
    read_seconds = [0.0]
    lock = threading.Lock()

    def read_one(item):
        s, k = item
        p = planned[s]
        if p.error:
            return np.zeros((n_in, size, size, 3), np.uint8)
        x, y = p.loc.xy[k]
        t = time.perf_counter()
        try:
            crops = np.stack([p.slide.read_field(int(x), int(y), f, size) for f in p.fovs_px])
        except SlideError as e:
            p.error = e.reason
            crops = np.zeros((n_in, size, size, 3), np.uint8)
        with lock:
            read_seconds[0] += time.perf_counter() - t
        return crops

    batches: queue.Queue = queue.Queue(maxsize=3)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))

    def producer():
        try:
            for b in range(n_batches):
                chunk = items[b * batch_size:(b + 1) * batch_size]
                mine = chunk[lo:lo + local]
                images = np.zeros((local, n_in, size, size, 3), np.uint8)
                for j, crops in enumerate(pool.map(read_one, mine)):
                    images[j] = crops
                batches.put((b, images))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            batches.put((-1, e))

    thread = threading.Thread(target=producer, name="slide-reader", daemon=True)
    probs = np.zeros((len(items), len(names)), np.float64)
    attention = np.zeros((len(items), n_in, n_in), np.float64)
    t_wait = t_model = 0.0
    start = time.perf_counter()
    thread.start()
    bar = tqdm(total=len(items), desc="predict slides", unit="loc",
               disable=not progress or jax.process_index() != 0, leave=False)
    try:
        for _ in range(n_batches):
            t = time.perf_counter()
            b, images = batches.get()
            if b < 0:
                raise images
            t_wait += time.perf_counter() - t
            t = time.perf_counter()
            batch = parallel.global_batch(mesh, {"images": images})
            logits, attn = eval_fn(params, batch_stats, batch["images"])
            logits, attn = parallel.to_host(logits), parallel.to_host(attn)
            t_model += time.perf_counter() - t
            n = min(batch_size, len(items) - b * batch_size)
            probs[b * batch_size:b * batch_size + n] = softmax(logits[:n].astype(np.float64))
            attention[b * batch_size:b * batch_size + n] = attn[:n]
            bar.update(n)
    finally:
        bar.close()
        thread.join(timeout=60)
        pool.shutdown(wait=True)
    wall = time.perf_counter() - start

    # ---- Per-slide outputs ----------------------------------------------------------------
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(out_dir, exist_ok=True)
    rows, pooled_labels, pooled_scores = [], [], []
    offset = 0
    for p in planned:
        n = len(p.loc)
        sl = slice(offset, offset + n)
        offset += n
        slide = p.slide
        if not p.error:
            try:
                slide.check_unchanged()
            except SlideError as e:
                p.error = e.reason
        if p.error:
            failures.append((slide.path, p.error))
            slide.close()
            continue
        pr, at = probs[sl], attention[sl]
        row = {"slide": slide.name, "path": slide.path, "locations": n,
               "tumour_fraction": float(np.mean(pr[:, positive] >= 0.5)) if n else 0.0,
               "max_prob": float(pr[:, positive].max()) if n else 0.0,
               "mean_prob": float(pr[:, positive].mean()) if n else 0.0,
               "padded": int(p.loc.padded.sum()), "mpp": slide.mpp}
        if p.ann is not None and n:
            truth, _ = p.ann.labels(p.loc.xy)
            truth = (truth == positive).astype(int)
            row["annotated_positive"] = int(truth.sum())
            row["auroc"] = _auroc(truth, pr[:, positive])
            pooled_labels.append(truth)
            pooled_scores.append(pr[:, positive])
        rows.append(row)
        if primary:
            with errors.writing(f"the outputs of slide {slide.name}", out_dir,
                                kept=f"The outputs of the slides before it are kept in {out_dir}; "
                                     "free space and run the command again."):
                _write_slide(out_dir, p, pr, at, scales, names, positive, row, pictures_too)
        slide.close()
    summary = {"slides": rows, "failures": [list(f) for f in failures], "scales": list(scales),
               "image_size": size, "stride": stride, "border": border,
               "num_locations": len(items), "devices": n_dev,
               "stain": (None if stain is None else
                         {"file": config.data.stain.file, **stain.fitted.params()}),
               "timing": {"plan_seconds": round(t_plan, 3), "compile_seconds": round(t_compile, 3),
                          "wall_seconds": round(wall, 3),
                          "read_seconds_summed_over_threads": round(read_seconds[0], 3),
                          "read_threads": num_workers,
                          "waiting_for_reads_seconds": round(t_wait, 3),
                          "model_seconds": round(t_model, 3),
                          "locations_per_second": round(len(items) / wall, 2) if wall > 0 else None}}
    if pooled_labels:
        summary["auroc_all_annotated"] = _auroc(np.concatenate(pooled_labels), np.concatenate(pooled_scores))
    if primary:
        with errors.writing("the slide summary", out_dir,
                            kept="Every slide's own outputs are kept; free space and run the "
                                 "command again for slides.csv and summary.json."):
            _write_summary(out_dir, rows, summary)
    return summary


def _write_slide(out_dir, p, pr, at, scales, names, positive, row, pictures_too):
    slide, loc = p.slide, p.loc
    folder = os.path.join(out_dir, slide.name)
    os.makedirs(folder, exist_ok=True)
    n_in = len(scales)
    with open(os.path.join(folder, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["x", "y", "tissue_fraction", "padded", "predicted"] + [f"prob_{c}" for c in names]
                   + [f"attn_{scales[i]}_to_{scales[j]}" for i in range(n_in) for j in range(n_in)])
        for k in range(len(loc)):
            w.writerow([int(loc.xy[k, 0]), int(loc.xy[k, 1]), f"{loc.tissue_fraction[k]:.4f}",
                        int(loc.padded[k]), names[int(pr[k].argmax())]]
                       + [f"{v:.6f}" for v in pr[k]] + [f"{v:.6f}" for v in at[k].ravel()])
    if not pictures_too or not len(loc):
        return
    mpp = slide.mpp
    size = (slide.width, slide.height)
    auc = f", AUROC {row['auroc']:.3f} vs annotations" if row.get("auroc") is not None else ""
    title = (f"{slide.name}: P({names[positive]}) at {len(loc)} locations; tumour fraction "
             f"{row['tumour_fraction']:.2f}, max {row['max_prob']:.2f}{auc}")
    pictures.heatmap(os.path.join(folder, "heatmap.png"), loc.overview, size, loc.mask, loc.xy,
                     pr[:, positive], min(p.fovs_px), mpp, title, label=f"P({names[positive]})",
                     annotations=p.ann)
    received = at.mean(axis=1)  # (n, N): attention each key scale receives, mean over queries
    pictures.attention_maps(os.path.join(folder, "attention.png"), loc.overview, size, loc.mask,
                            loc.xy, received, min(p.fovs_px), scales, mpp,
                            f"{slide.name}: attention per scale")


def _write_summary(out_dir, rows, summary):
    cols = ["slide", "locations", "tumour_fraction", "max_prob", "mean_prob", "padded", "mpp",
            "annotated_positive", "auroc", "path"]
    with open(os.path.join(out_dir, "slides.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r[k]))
                        for k in cols})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def format_summary(summary: dict, out_dir: str) -> str:
    t = summary["timing"]
    lines = [f"Predicted {summary['num_locations']} locations of {len(summary['slides'])} slide(s) "
             f"-> {out_dir} ({t['locations_per_second']} locations/s on {summary['devices']} "
             f"device(s); model {t['model_seconds']:.1f} s, waiting for reads "
             f"{t['waiting_for_reads_seconds']:.1f} s, reads {t['read_seconds_summed_over_threads']:.1f} "
             f"thread-s)"]
    for r in summary["slides"]:
        auc = f", AUROC {r['auroc']:.3f}" if r.get("auroc") is not None else ""
        lines.append(f"  {r['slide']}: {r['locations']} locations, tumour fraction "
                     f"{r['tumour_fraction']:.3f}, max {r['max_prob']:.3f}, mean {r['mean_prob']:.3f}{auc}")
    if summary.get("auroc_all_annotated") is not None:
        lines.append(f"  all annotated locations: AUROC {summary['auroc_all_annotated']:.4f}")
    if summary["failures"]:
        lines.append(f"FAILED: {len(summary['failures'])} slide(s):")
        lines += [f"  {p}: {r}" for p, r in summary["failures"]]
    return "\n".join(lines)


def run(config, model, slide_paths, out_dir, *, log_fn: Callable[[str], None] = print,
        err_fn: Callable[[str], None] | None = None, **kw) -> int:
    """``predict_slides`` for the command line: prints the summary, returns the exit code
    (1 when a slide or input failed), and reports input problems without a traceback."""
    err_fn = err_fn or (lambda m: print(m, file=sys.stderr))
    try:
        summary = predict_slides(config, model, slide_paths, out_dir, **kw)
    except (InputError, ValueError, FileNotFoundError, errors.WriteFailedError) as e:
        err_fn(f"ERROR: {e}")
        return 1
    log_fn(format_summary(summary, out_dir))
    if summary["failures"]:
        err_fn(f"ERROR: {len(summary['failures'])} slide(s) failed (listed above); the others "
               "were predicted.")
        return 1
    return 0
