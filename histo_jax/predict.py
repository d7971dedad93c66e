"""Classify new samples with a trained run or an original PyTorch checkpoint.

    python -m histo_jax.predict --run=runs/four_scale --data_dir=NEW --out=predictions
    python -m histo_jax.predict --pytorch=multi_input_model.pth --data_dir=NEW --out=predictions
    python -m histo_jax.predict --run=runs/four_scale --slides=SLIDES [PATH ...] --out=OUT [--stride=S]

With ``--slides`` (slide files or folders) every tissue location of every slide is
predicted from crops read in memory, and each slide gets a predictions CSV, a heatmap and
an attention map (histo_jax/slides/predict.py); bad slides are reported at the end and
make the exit code 1.

``NEW`` has the original layout; its labels file is optional. Without it every sample
present in all used scale folders is predicted; with it, metrics are reported too. The
folder is validated as for training (every problem reported, nothing substituted).

Writes to ``--out``: ``predictions.csv`` (filename, num_id, predicted class, class
probabilities, and each input's attention over the inputs), and, as they apply,
``metrics.json``, ``confusion_matrix.png``, ``roc_curve.png`` and ``attention/<file>.png``
panels (the N crops side by side with each scale's attention over the scales).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

from histo_jax import hostenv

if __name__ == "__main__":  # First, before the heavy imports: see histo_jax/hostenv.py.
    hostenv.reexec_with_malloc_tuning()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from histo_jax import checkpointing, errors, failstop, parallel, plots, steps  # noqa: E402
from histo_jax.config import get_base_config  # noqa: E402
from histo_jax.data import layout, pipeline, sources  # noqa: E402
from histo_jax.metrics import classification_metrics, softmax  # noqa: E402
from histo_jax.models import build_model, load_pytorch  # noqa: E402
from histo_jax.stain import normalize as stain_lib  # noqa: E402

log = logging.getLogger(__name__)


def load_run(run_dir: str):
    """Config and best-weight model (eval mode) of a histo_jax training workdir."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a histo_jax training "
                                "workdir (the folder given as --workdir to main.py).")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.model.pretrained = "none"  # the trained weights replace any initialisation
    model = build_model(config.model, config.num_inputs, nnx.Rngs(params=0))
    _, params, batch_stats = steps.split_model(model)
    best = checkpointing.restore_best(run_dir, {"params": params, "batch_stats": batch_stats})
    if best is None:
        raise FileNotFoundError(f"{run_dir}/best holds no weights: the run has not finished an "
                                "epoch yet. Train it (rerun its main.py command) first.")
    nnx.update(model, best[0]["params"], best[0]["batch_stats"])
    model.eval()
    if config.data.stain.get("method", "none") != "none":
        # The run's own copy of the normaliser it was trained with.
        config.data.stain.file = os.path.join(run_dir, stain_lib.RUN_FILE)
    return config, model


def use_stain_file(config: ml_collections.ConfigDict, path: str) -> None:
    """Predicts with the stain normaliser of ``path`` (``--stain``) instead of the run's."""
    fitted = stain_lib.load(path)
    config.data.stain.method, config.data.stain.file = fitted.method, path


def load_pytorch_run(path: str, image_size: int = 224):
    """An original-project checkpoint as (config, model); reference preprocessing ([0, 1])."""
    model = load_pytorch(path)
    n = getattr(model, "num_inputs", None)
    if n is None:
        raise ValueError(f"{path} holds an encoder only (no fusion head): prediction needs a "
                         "checkpoint of the original MultiInputModule.")
    config = get_base_config()
    config.num_inputs = n
    config.data.image_size = image_size
    config.data.normalization = "none"
    return config, model


def _tta_views(images):
    """Identity, horizontal, vertical and both flips of (B, N, H, W, 3) images."""
    return [images, images[:, :, :, ::-1], images[:, :, ::-1], images[:, :, ::-1, ::-1]]


def predict_folder(config: ml_collections.ConfigDict, model: nnx.Module, data_dir: str, out_dir: str,
                   *, tta: bool = False, panels: int | Sequence[str] = 4, batch_size: int | None = None,
                   num_workers: int | None = None) -> dict:
    """Predicts every sample of ``data_dir``; returns a summary (and metrics when labelled)."""
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.dir = data_dir
    if num_workers is not None:
        data_cfg.num_workers = num_workers
    n_in = config.num_inputs
    data_cfg.scales = tuple(data_cfg.scales)[:n_in]
    report = layout.validate_dataset(data_cfg, data_dir, require_labels=False)
    for line in report.format().splitlines():
        log.info(line)
    report.raise_if_errors()
    source = sources.FolderSource(data_cfg, data_dir, samples=report.samples)
    if len(source) == 0:
        raise ValueError(f"{data_dir}: no sample is present in all of {list(data_cfg.scales)}.")

    mesh = parallel.make_mesh()
    batch_size = batch_size or config.eval_batch_size
    batch_size = max(jax.device_count(), batch_size // jax.device_count() * jax.device_count())
    graphs, params, batch_stats = steps.split_model(model)
    repl = parallel.replicated(mesh)
    params, batch_stats = jax.device_put((params, batch_stats), repl)
    step = steps.make_eval_step(graphs, data_cfg.normalization,
                                stain_lib.from_config(data_cfg.stain))

    def eval_fn(p, s, images):
        if not tta:
            return step(p, s, images)
        outs = [step(p, s, v) for v in _tta_views(images)]
        probs = sum(jax.nn.softmax(o[0], -1) for o in outs) / len(outs)
        return jax.numpy.log(probs), sum(o[1] for o in outs) / len(outs)

    eval_fn = hostenv.CompiledOnFirstCall(jax.jit(
        eval_fn, in_shardings=(repl, repl, parallel.batch_sharding(mesh)),
        compiler_options=steps.compiler_options()))
    loader = pipeline.make_eval_loader(
        source, np.arange(len(source)), global_batch_size=batch_size, num_inputs=n_in,
        num_workers=data_cfg.num_workers, process_index=jax.process_index(),
        process_count=jax.process_count())
    from histo_jax.train import evaluate_dataset  # noqa: PLC0415 - avoids an import cycle
    ev = evaluate_dataset(eval_fn, params, batch_stats, loader, mesh, progress=True, desc="predict")
    probs = softmax(ev["logits"].astype(np.float64))
    names = list(data_cfg.class_names)
    scales = list(data_cfg.scales)
    summary = {"num_samples": int(len(ev["index"])), "tta": tta, "data_dir": data_dir,
               "scales": scales}
    if jax.process_index() != 0:
        return summary
    with errors.writing("the predictions", out_dir,
                        kept="Files written before it are kept; the predictions are not "
                             "complete. Free space and run the command again."):
        return _write_predictions(source, ev, probs, names, scales, n_in, panels, out_dir, summary)


def _write_predictions(source, ev, probs, names, scales, n_in, panels, out_dir, summary) -> dict:
    """predictions.csv, the metrics and pictures (labelled data), the panels, summary.json."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "predictions.csv")
    labelled = bool(np.all(ev["labels"] >= 0))
    with open(csv_path, "w", encoding="utf-8") as f:
        cols = ["filename", "num_id"] + (["label"] if labelled else []) + ["predicted", "predicted_label"]
        cols += [f"prob_{c}" for c in names]
        cols += [f"attn_{scales[i]}_to_{scales[j]}" for i in range(n_in) for j in range(n_in)]
        f.write(",".join(cols) + "\n")
        for k, idx in enumerate(ev["index"]):
            pred = int(probs[k].argmax())
            vals = [source.filenames[idx], source.num_ids[idx]]
            vals += ([str(int(ev["labels"][k]))] if labelled else []) + [names[pred], str(pred)]
            vals += [f"{p:.6f}" for p in probs[k]] + [f"{a:.6f}" for a in ev["attention"][k].ravel()]
            f.write(",".join(vals) + "\n")
    summary["predictions"] = csv_path
    if labelled:
        m = classification_metrics(ev["labels"], ev["logits"], len(names))
        summary["metrics"] = m
        plots.confusion_matrix(np.asarray(m["confusion_matrix"]), names,
                               os.path.join(out_dir, "confusion_matrix.png"), title="Confusion matrix")
        if len(names) == 2 and len(np.unique(ev["labels"])) == 2:
            plots.roc_curve(ev["labels"], probs[:, 1], os.path.join(out_dir, "roc_curve.png"), title="ROC")
        log.info("macro-F1 %.4f, accuracy %.4f, AUROC %.4f on %d labelled samples",
                 m["macro_f1"], m["accuracy"], m["auroc"], m["num_samples"])
    summary["panels"] = _attention_panels(source, ev, probs, names, panels, out_dir)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log.info("%d predictions -> %s", len(ev["index"]), csv_path)
    return summary


def _attention_panels(source, ev, probs, names, panels, out_dir) -> list[str]:
    """Panels for the chosen file names, or for ``panels`` samples (most confident per class, in turn)."""
    pos = {int(idx): k for k, idx in enumerate(ev["index"])}
    if isinstance(panels, int):
        # The most confident samples of each predicted class, taken in turn across classes.
        pred = probs.argmax(-1)
        queues = [list(np.flatnonzero(pred == c)[np.argsort(-probs[pred == c, c], kind="stable")])
                  for c in range(probs.shape[1])]
        chosen = []
        while len(chosen) < min(panels, len(pred)):
            for q in queues:
                if q and len(chosen) < panels:
                    chosen.append(int(ev["index"][q.pop(0)]))
    else:
        by_name = {f: i for i, f in enumerate(source.filenames)}
        unknown = [f for f in panels if f not in by_name]
        if unknown:
            raise ValueError(f"--panels names files that are not in the predicted set: {unknown}")
        chosen = [by_name[f] for f in panels]
    paths = []
    for idx in chosen:
        k = pos[idx]
        images = source[idx]["images"]
        title = (f"{source.filenames[idx]}: predicted {names[int(probs[k].argmax())]} "
                 f"(p={probs[k].max():.2f})")
        if ev["labels"][k] >= 0:
            title += f", true {names[int(ev['labels'][k])]}"
        paths.append(plots.attention_panel(images, ev["attention"][k], list(source.scales),
                                           os.path.join(out_dir, "attention", f"{source.filenames[idx]}.png"),
                                           title=title))
    return paths


FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("run", None, "A histo_jax training workdir (its best weights are used).")
    flags.DEFINE_string("pytorch", None, "Or: a checkpoint of the original PyTorch project (.pth/.safetensors).")
    flags.DEFINE_string("data_dir", None, "Folder in the original layout; labels file optional.")
    flags.DEFINE_string("out", "predictions", "Output folder.")
    flags.DEFINE_bool("tta", False, "Test-time augmentation: average over the 4 flips.")
    flags.DEFINE_list("panels", ["4"], "Attention panels: a number (per predicted class, most "
                      "confident first) or file names (without .png).")
    flags.DEFINE_integer("batch_size", None, "Global batch (default: the run's eval_batch_size).")
    flags.DEFINE_integer("image_size", 224, "Image size for --pytorch checkpoints.")
    flags.DEFINE_string("stain", None, "A fitted stain normaliser (stain.json) to apply instead "
                        "of the run's own (a run trained with data.stain uses its copy anyway).")
    flags.DEFINE_integer("num_workers", None, "Grain worker processes (default: the run's); "
                         "with --slides, reader threads (default 4).")
    # Slide mode (histo_jax/slides/predict.py).
    flags.DEFINE_list("slides", None, "Or: slide files / folders of slides (comma-separated; more "
                      "paths may follow as arguments). Every tissue location is predicted.")
    flags.DEFINE_integer("stride", None, "Slides: grid step in level-0 px (default: the smallest "
                         "field of view of the run's scales).")
    flags.DEFINE_float("mpp", None, "Slides: micrometres per level-0 px, overriding the metadata.")
    flags.DEFINE_float("min_tissue", None, "Slides: minimum tissue fraction of a location's "
                       "smallest field (default 0.5).")
    flags.DEFINE_enum("border", "pad", ["pad", "skip"], "Slides: fields crossing the slide border "
                      "are padded with white, or their location skipped.")
    flags.DEFINE_string("annotations", None, "Slides: optional folder of QuPath GeoJSON "
                        "<slide>.geojson; the summary then gives each slide's AUROC against them.")
    flags.DEFINE_string("annotation_classes", "Tumor=1,Tumour=1,Normal=0",
                        "Slides: classification.name -> label (NAME=INT or NAME=ignore).")


def main(argv):
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("histo_jax").setLevel(logging.INFO)
    parallel.maybe_initialize_distributed()
    with failstop.reporting():  # multi-host: the other processes learn of a failure first
        status = _main(argv)
    watchdog = failstop.active()
    if watchdog is not None:
        if status:
            failstop.exit_after_failure(RuntimeError(f"predict ended with status {status}"),
                                        "", status)
        watchdog.finished()
    return status


def _main(argv):
    if bool(FLAGS.run) == bool(FLAGS.pytorch):
        raise app.UsageError("Give exactly one of --run=WORKDIR or --pytorch=CHECKPOINT.")
    if bool(FLAGS.data_dir) == bool(FLAGS.slides):
        raise app.UsageError("Give exactly one of --data_dir=FOLDER or --slides=SLIDES.")
    if len(argv) > 1 and not FLAGS.slides:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    hostenv.keep_step_memory()  # XLA:CPU: step buffers stay resident (histo_jax/hostenv.py)
    try:
        if FLAGS.run:
            config, model = load_run(FLAGS.run)
        else:
            config, model = load_pytorch_run(FLAGS.pytorch, FLAGS.image_size)
        hostenv.release_build_memory()  # before any step compiles (histo_jax/hostenv.py)
        if FLAGS.stain:
            use_stain_file(config, FLAGS.stain)
        stain_lib.from_config(config.data.stain)  # a bad stain file is reported before any work
    except stain_lib.StainError as e:
        print(f"histo_jax: {e}", file=sys.stderr)
        return 1
    try:
        if FLAGS.slides:
            return _main_slides(config, model, list(FLAGS.slides) + list(argv[1:]))
        panels = FLAGS.panels
        panels = int(panels[0]) if len(panels) == 1 and panels[0].isdigit() else list(panels)
        predict_folder(config, model, FLAGS.data_dir, FLAGS.out, tta=FLAGS.tta, panels=panels,
                       batch_size=FLAGS.batch_size, num_workers=FLAGS.num_workers)
    except errors.WriteFailedError as e:
        print(f"histo_jax: {e}", file=sys.stderr)
        return 1
    return 0


def _main_slides(config, model, paths: list[str]) -> int:
    from histo_jax.slides import annotations as ann_lib  # noqa: PLC0415
    from histo_jax.slides import predict as slides_predict  # noqa: PLC0415

    if FLAGS.tta:
        raise app.UsageError("--tta is for --data_dir; slide prediction does not flip.")
    try:
        class_map = ann_lib.parse_class_map(FLAGS.annotation_classes)
    except ValueError as e:
        raise app.UsageError(str(e))
    return slides_predict.run(
        config, model, paths, FLAGS.out, stride=FLAGS.stride, mpp=FLAGS.mpp,
        min_tissue=FLAGS.min_tissue, border=FLAGS.border, batch_size=FLAGS.batch_size,
        num_workers=FLAGS.num_workers or 4, annotations_dir=FLAGS.annotations, class_map=class_map)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
