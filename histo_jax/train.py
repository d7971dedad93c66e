"""The trainer: one run = one (num_inputs, run, seed) of the study, docs/reference.md §4.

``train_and_evaluate(config, workdir)`` claims the workdir (one process at a time, and only
for the run whose identity it holds: ``histo_jax.workdir``), validates and prepares the
data, splits it by ``num_id``, trains with the reference procedure (weighted sampling with
replacement, weighted cross-entropy, Adam + OneCycle, clipping, early stopping on
validation macro-F1), checkpoints so that rerunning the same command resumes exactly, and
tests the best weights.

Outline (top-down, as the Flax ImageNet example's ``train_and_evaluate``)::

    train_and_evaluate  claim the workdir; a finished run returns its result
      _train
        setup_run        data (checked, split), model, optimizer, jitted steps -> Run, state
        resume_or_start  latest checkpoint (state, LoopState, data stream) or a fresh start
        while epochs remain and not stopped early:
          train_epoch    steps, NaN guard, step scalars, mid-epoch checkpoints
          validate_epoch validation macro-F1, best weights, early stopping
          save_latest    the checkpoint a rerun resumes from
        test_best        test metrics of the best weights, outputs, metrics.json (last)

``Run`` holds what the run is built from (fixed after set-up); the train state and the typed
``LoopState`` are the only state the loop changes, and both are checkpointed.

Workdir contents: ``identity.json`` (what the results are computed from), ``run.lock``,
``config.json`` (resolved config), ``splits.json``, ``metrics.jsonl`` (scalars as JSON
lines; a resumed run continues it from its checkpoint), ``tensorboard/``, ``checkpoints/``
(latest state), ``best/`` (best weights), ``metrics.json`` (final test metrics, written
last), ``test_predictions.csv`` and the pictures (``training_curves.png``,
``confusion_matrix.png``, ``roc_curve.png``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from histo_jax import checkpointing, failstop, hostenv, optim, parallel, paths, plots, steps
from histo_jax import workdir as workdir_lib
from histo_jax.data import augment, pipeline, sources, splits as splits_lib
from histo_jax.metrics import MetricWriter, classification_metrics, softmax
from histo_jax.models import build_model
from histo_jax.stain import normalize as stain_lib

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


class NonFiniteLossError(FloatingPointError):
    """The loss (the same global value on every process) is NaN or infinite."""

    raised_on_every_process = True  # see histo_jax.failstop


def primary_first(fn, what: str):
    """Runs ``fn`` on process 0, then on the others (which then reuse its files on disk)."""
    if jax.process_count() == 1:
        return fn()
    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"histo_jax: {what}")
    return out if jax.process_index() == 0 else fn()


def setup_compilation_cache(config: ml_collections.ConfigDict) -> None:
    """JAX's persistent compilation cache (``config.compilation_cache_dir``: 'auto' = in the
    histo_jax cache folder, '' disables)."""
    path = config.get("compilation_cache_dir", "")
    if path == "auto":
        path = os.path.join(paths.cache_root(), "jax_compilation_cache")
    if path:
        path = os.path.expanduser(path)
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    """``config.data.dir``, or the embedded demo dataset (generated on first use) when empty."""
    if config.data.dir:
        return os.path.expanduser(config.data.dir)
    return ensure_demo_dataset(config.data.get("demo_dir", ""))


def demo_cache_dir() -> str:
    return os.path.join(paths.cache_root(), "demo_dataset")


def ensure_demo_dataset(path: str = "") -> str:
    """The demo dataset's folder, written on first use (atomically: a crash leaves no half copy)."""
    from histo_jax.data import demo
    path = os.path.expanduser(path) if path else demo_cache_dir()
    if os.path.exists(os.path.join(path, "labels.csv")):
        return path
    log.info("No --config.data.dir given: writing the embedded demo dataset to %s (once).", path)
    tmp = f"{path}.tmp-{os.getpid()}"
    demo.write_demo_dataset(tmp, seed=0)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        if not os.path.exists(os.path.join(path, "labels.csv")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights of the training split; every class must be present."""
    counts = np.bincount(labels, minlength=num_classes)
    if np.any(counts == 0):
        missing = [c for c in range(num_classes) if counts[c] == 0]
        raise ValueError(f"The training split has no sample of class(es) {missing}; "
                         "the dataset is too small or too unbalanced to train on.")
    return pipeline.balanced_class_weights(labels, num_classes).astype(np.float32)


def evaluate_dataset(eval_fn, params, batch_stats, loader, mesh, *, progress: bool = False,
                     desc: str = "eval") -> dict:
    """Runs ``eval_fn`` over every batch of an eval loader; returns host arrays of the real
    (unpadded) samples: ``logits``, ``attention``, ``labels``, ``index``."""
    out = {k: [] for k in ("logits", "attention", "labels", "index")}
    bar = tqdm(total=getattr(loader, "num_samples", None), desc=desc,
               unit="samples", disable=not progress or jax.process_index() != 0, leave=False)
    for local in loader:
        batch = parallel.global_batch(mesh, local)
        logits, attention = eval_fn(params, batch_stats, batch["images"])
        mask = parallel.to_host(batch["mask"]).astype(bool)
        out["logits"].append(parallel.to_host(logits)[mask])
        out["attention"].append(parallel.to_host(attention)[mask])
        out["labels"].append(parallel.to_host(batch["labels"])[mask])
        out["index"].append(parallel.to_host(batch["index"])[mask])
        bar.update(int(mask.sum()))
    bar.close()
    return {k: np.concatenate(v) for k, v in out.items()}


def _weighted_ce_host(logits, labels, weights):
    p = softmax(logits.astype(np.float64))
    nll = -np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))
    w = weights[labels]
    return float((w * nll).sum() / w.sum())


def on_primary(fn, what: str):
    """Runs ``fn`` on process 0 only; when it raises there, every process stops (none is left
    waiting for a partner that gave up). Returns ``fn()`` on process 0, None elsewhere."""
    if jax.process_count() == 1:
        return fn()
    out, err = None, None
    if jax.process_index() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the others know
            err = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if err is not None:
        raise failstop.mark_raised_everywhere(err)
    if not ok:
        raise failstop.mark_raised_everywhere(workdir_lib.WorkdirError(
            f"Process 0 stopped ({what}); its error message says why."))
    return out


@contextlib.contextmanager
def hold_workdir(workdir: str):
    """One process per workdir while inside: process 0 holds ``<workdir>/run.lock``."""
    with workdir_lib.writing("the workdir", workdir):
        os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.WorkdirLock(workdir)
    on_primary(lock.acquire, f"{workdir} is not free")
    try:
        yield
    finally:
        lock.release()  # A no-op on the processes that did not take it.


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
    """The checks that need no data, made before a workdir is claimed for the config."""
    n_in, scales = config.num_inputs, config.data.scales
    if not 1 <= n_in <= len(scales):
        raise ValueError(f"config.num_inputs={n_in} must be between 1 and the number of "
                         f"configured scale folders ({len(scales)}: {list(scales)}).")
    parallel.check_batch_size(config.batch_size, "batch_size", mesh)
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size", mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       discard_old_run: bool = False) -> dict:
    """Trains one run and returns its test metrics (also written to ``workdir/metrics.json``).

    The workdir is claimed first (``histo_jax.workdir``): a busy one is refused, and so is
    one holding a run of another identity (config fields and data), unless
    ``discard_old_run`` moves that run aside. A finished run of this identity returns its
    stored result; an unfinished one resumes exactly. A failed write (full disk, I/O
    error) stops the run with :class:`~histo_jax.workdir.WriteFailedError`; the last
    complete checkpoint is kept and the same command resumes from it.
    """
    mesh = parallel.make_mesh()
    check_config(config, mesh)
    with hold_workdir(workdir), contextlib.ExitStack() as cleanup:
        data_cfg = ml_collections.ConfigDict(config.data.to_dict())
        data_cfg.dir = primary_first(lambda: resolve_data_dir(config), "demo data")
        config_json = config.to_json_best_effort(indent=2)

        def claim():
            identity = workdir_lib.RunIdentity.of(config, workdir_lib.data_fingerprint(data_cfg))
            workdir_lib.claim(workdir, identity, config_json, discard_old_run=discard_old_run)
            return identity
        identity = on_primary(claim, "workdir check")

        done_file = os.path.join(workdir, METRICS_FILE)
        if os.path.exists(done_file):
            with open(done_file) as f:
                result = json.load(f)
            log.info("%s: this run is finished (same configuration and data): test macro-F1 %.4f, "
                     "accuracy %.4f (%s).", workdir, result.get("macro_f1", math.nan),
                     result.get("accuracy", math.nan), done_file)
            return result
        with workdir_lib.writing("the checkpoint folders", workdir):
            ckpt = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
        cleanup.callback(_close_quietly, ckpt)
        return workdir_lib.call_with_hint(
            lambda: _train(config, workdir, data_cfg, identity, mesh, ckpt, cleanup),
            lambda: _after_failure(ckpt))


def _close_quietly(obj) -> None:
    with contextlib.suppress(Exception):
        obj.close()


def _after_failure(ckpt: checkpointing.Checkpoints) -> str:
    step = ckpt.latest_step()
    if step is None:
        return ("The run stopped before its first checkpoint; once the problem is fixed (e.g. "
                "disk space freed), the same command starts it again.")
    return (f"The run stopped. Its last complete checkpoint, {ckpt.latest.directory}/{step}, is "
            "kept: once the problem is fixed (e.g. disk space freed), the same command resumes "
            "from it.")


def _check_data(source, identity, data_dir: str) -> None:
    if source.prepared.fingerprint != identity.data_fingerprint:
        raise workdir_lib.WorkdirError(
            f"The data of {data_dir} changed while the run was starting (prepared fingerprint "
            f"{source.prepared.fingerprint[:12]}, checked {identity.data_fingerprint[:12]}). "
            "Leave the folder unchanged during a run and run the command again.")


def _reset_logs(workdir: str) -> None:
    """A fresh start (no checkpoint): the scalars of an earlier start that saved nothing go."""
    path = os.path.join(workdir, "metrics.jsonl")
    with workdir_lib.writing("the metrics log", path):
        if os.path.exists(path):
            os.truncate(path, 0)
        shutil.rmtree(os.path.join(workdir, "tensorboard"), ignore_errors=True)


def _truncate_log(path: str, size: int) -> None:
    """A resumed run's scalar log continues from its checkpoint: rows written after it go."""
    current = os.path.getsize(path) if os.path.exists(path) else 0
    if current > size:
        with workdir_lib.writing("the metrics log", path):
            os.truncate(path, size)
    elif current < size:
        log.warning("%s is shorter than when the resumed checkpoint was saved (%d < %d bytes): "
                    "some of its rows are missing.", path, current, size)


@dataclasses.dataclass
class Run:
    """What one run is built from: made once by :func:`setup_run`, read by the loop functions.

    The loop's state lives elsewhere: the train state (params, optimizer, step) and the
    typed :class:`~histo_jax.checkpointing.LoopState`, both saved with every checkpoint.
    """

    config: ml_collections.ConfigDict
    workdir: str
    data_cfg: ml_collections.ConfigDict
    mesh: Any
    ckpt: checkpointing.Checkpoints
    source: Any
    split: dict
    class_weights: np.ndarray
    steps_per_epoch: int
    train_step: Callable  # steps.jit_train_step
    eval_step: Any
    base_key: jax.Array
    lr_schedule: Any
    stain: Any
    val_loader: Any
    loader_kw: dict
    writer: MetricWriter | None = None

    @property
    def primary(self) -> bool:
        return jax.process_index() == 0

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def write_scalars(self, step: int, scalars: dict, **fields) -> None:
        with workdir_lib.writing("the metrics log", self.metrics_path):
            self.writer.write(step, scalars, **fields)

    def train_loader(self, start_step: int):
        return iter(pipeline.make_train_loader(
            self.source, self.split["train"], global_batch_size=self.config.batch_size,
            seed=self.config.seed, num_workers=self.data_cfg.num_workers,
            start_step=start_step, **self.loader_kw))


def _train(config, workdir, data_cfg, identity, mesh, ckpt, cleanup) -> dict:
    """The run, top-down: set-up, resume, the epochs (train, validate, stop early), test.

    An error is reported to the other processes of a multi-host run before anything unwinds
    (``histo_jax.failstop``), so that none waits for this one."""
    with failstop.reporting():
        run, state = setup_run(config, workdir, data_cfg, identity, mesh, ckpt)
        state, loop, train_iter = resume_or_start(run, state)
        if loop.epoch < config.num_epochs and not loop.stopped_early:
            compile_ahead(run, state, train_iter)
        with workdir_lib.writing("the metrics log", run.metrics_path):
            run.writer = MetricWriter(workdir, enabled=run.primary)
        cleanup.callback(_close_quietly, run.writer)
        log.info("Training %d inputs for up to %d epochs x %d steps (batch %d over %d devices, "
                 "%d process(es)).", config.num_inputs, config.num_epochs, run.steps_per_epoch,
                 config.batch_size, jax.device_count(), jax.process_count())
        while loop.epoch < config.num_epochs and not loop.stopped_early:
            state, train_seconds = train_epoch(run, state, loop, train_iter)
            validate_epoch(run, state, loop, train_seconds)
            save_latest(run, state, loop, train_iter)
        return test_best(run, state, loop)


def setup_run(config, workdir, data_cfg, identity, mesh, ckpt) -> tuple[Run, Any]:
    """Data (loaded, checked, split), model, optimizer, the jitted steps; the initial state."""
    primary = jax.process_index() == 0
    setup_compilation_cache(config)
    n_in = config.num_inputs
    source = primary_first(lambda: sources.load_dataset(data_cfg, log=log.info), "data prepared")
    on_primary(lambda: _check_data(source, identity, data_cfg.dir), "data check")
    split = splits_lib.make_splits(source.num_ids, source.labels, config.run,
                                   test_size=data_cfg.test_size, val_size=data_cfg.val_size)
    if primary:
        splits_path = os.path.join(workdir, "splits.json")
        with workdir_lib.writing("the splits", splits_path):
            splits_lib.save_splits(splits_path, split, source.num_ids, source.filenames)
    weights = class_weights(source.labels[split["train"]], config.model.num_classes)
    log.info("Data: %s | %d train, %d val, %d test samples | class weights %s",
             data_cfg.dir, len(split["train"]), len(split["val"]), len(split["test"]),
             np.round(weights, 4).tolist())
    steps_per_epoch = config.steps_per_epoch or math.ceil(len(split["train"]) / config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch

    model = build_model(config.model, n_in, nnx.Rngs(params=config.seed))
    graphs, params, batch_stats = steps.split_model(model)
    tx = optim.make_optimizer(config.optimizer, total_steps)
    repl = parallel.replicated(mesh)
    # One compiled program for the optimizer state: op by op, each zeros_like of a new
    # shape is its own small compile (2 s for the tiny model).
    state = jax.jit(functools.partial(steps.init_train_state, tx=tx), out_shardings=repl)(
        *jax.device_put((params, batch_stats), repl))
    del model, params, batch_stats
    hostenv.release_build_memory()  # the eager build's small programs (-110 MB for B0)
    aug_cfg = augment.AugmentConfig.from_config(data_cfg, n_in)
    aug_cfg = aug_cfg if aug_cfg.enabled or aug_cfg.stain.enabled else None
    stain = stain_lib.from_config(data_cfg.stain)
    if stain is not None and primary:  # The run keeps its normaliser (predict uses it).
        workdir_lib.write_atomic(os.path.join(workdir, stain_lib.RUN_FILE),
                                 json.dumps(stain.fitted.to_json(), indent=2), "the stain file")
    cw = jnp.asarray(weights if config.class_weighted_loss else np.ones_like(weights))
    copts = steps.compiler_options(memory_scheduler=config.xla_cpu_memory_scheduler)
    train_step = steps.jit_train_step(graphs, tx, aug_cfg, data_cfg.normalization, cw, stain,
                                      mesh=mesh, compiler_options=copts)
    eval_step = jax.jit(steps.make_eval_step(graphs, data_cfg.normalization, stain),
                        in_shardings=(repl, repl, parallel.batch_sharding(mesh)),
                        compiler_options=copts)
    loader_kw = dict(num_inputs=n_in, process_index=jax.process_index(),
                     process_count=jax.process_count())
    # Evaluation reads prepared (already resized, unaugmented) records: cheap enough in the
    # main process, and re-iterating a multi-worker loader would restart its workers each epoch.
    val_loader = pipeline.make_eval_loader(
        source, split["val"], global_batch_size=config.eval_batch_size, num_workers=0, **loader_kw)
    run = Run(config=config, workdir=workdir, data_cfg=data_cfg, mesh=mesh, ckpt=ckpt,
              source=source, split=split, class_weights=weights, steps_per_epoch=steps_per_epoch,
              train_step=train_step,
              eval_step=hostenv.CompiledOnFirstCall(eval_step),
              base_key=jax.device_put(jax.random.PRNGKey(config.seed), repl),
              lr_schedule=optim.make_schedules(config.optimizer, total_steps)[0], stain=stain,
              val_loader=val_loader, loader_kw=loader_kw)
    return run, state


def resume_or_start(run: Run, state) -> tuple[Any, checkpointing.LoopState, Any]:
    """The latest checkpoint's train state, loop state and data stream, or a fresh start
    (which clears the logs of an earlier start that saved nothing)."""
    ckpt = run.ckpt
    restored = ckpt.restore_latest(state)
    if restored is None:
        if run.primary:
            _reset_logs(run.workdir)
        return state, checkpointing.LoopState(), run.train_loader(0)
    resumed_step, state, loop = restored
    train_iter = run.train_loader(loop.data_start_step)
    if not ckpt.restore_data_iter(resumed_step, train_iter):
        # Global batch b is a pure function of (seed, b): a fresh stream at the resumed
        # step gives the same batches (e.g. after a change of data.num_workers).
        log.info("The training stream restarts at global batch %d.", resumed_step)
        loop.data_start_step = resumed_step
        train_iter = run.train_loader(resumed_step)
    ckpt.drop_best_after(resumed_step)
    if run.primary:
        _truncate_log(run.metrics_path, loop.metrics_bytes)
    log.info("Resumed from %s/%d (epoch %d).", ckpt.latest.directory, resumed_step, loop.epoch)
    return state, loop, train_iter


def compile_ahead(run: Run, state, train_iter) -> None:
    """Starts the training loader's workers, then compiles the train step while they warm
    up: the first batch waited for the workers (~6 s on 2 cores), then the first step for
    its compile. The abstract batch is the one :func:`parallel.global_batch` makes."""
    getattr(train_iter, "start_prefetch", lambda: None)()
    size, n = run.source.image_size, run.config.num_inputs
    sharding = parallel.batch_sharding(run.mesh)
    batch = {"images": jax.ShapeDtypeStruct((run.config.batch_size, n, size, size, 3), np.uint8,
                                            sharding=sharding),
             "labels": jax.ShapeDtypeStruct((run.config.batch_size,), np.int32,
                                            sharding=sharding)}
    run.train_step.compile(state, batch, run.base_key)


def train_epoch(run: Run, state, loop: checkpointing.LoopState, train_iter):
    """The rest of the current epoch's steps (all of them unless resumed mid-epoch), with the
    NaN guard, the step scalars and the mid-epoch checkpoints; returns the new state and the
    seconds it took."""
    config, epoch = run.config, loop.epoch
    bar = tqdm(total=run.steps_per_epoch * config.batch_size,
               initial=loop.step_in_epoch * config.batch_size,
               desc=f"epoch {epoch + 1}/{config.num_epochs}", unit="samples",
               disable=not (config.progress and run.primary), leave=False)
    t0 = time.time()
    pending = []  # step metrics still on device
    stain_counts = [0, 0]  # images passed through unchanged, images seen (this process)
    step = int(state.step)  # host copy: no device sync per step
    while loop.step_in_epoch < run.steps_per_epoch:
        batch = parallel.global_batch(run.mesh, next(train_iter))
        batch = {"images": batch["images"], "labels": batch["labels"]}
        state, m = run.train_step(state, batch, run.base_key)
        pending.append(m)
        loop.step_in_epoch += 1
        step += 1
        bar.update(config.batch_size)
        last_of_epoch = loop.step_in_epoch == run.steps_per_epoch
        save_now = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                    and not last_of_epoch)
        if step % config.log_every_steps == 0 or last_of_epoch or save_now:
            loss = _log_steps(run, loop, jax.device_get(pending), step, stain_counts)
            pending.clear()
            bar.set_postfix(loss=f"{loss:.4f}")
        if save_now:
            save_latest(run, state, loop, train_iter)
    bar.close()
    train_seconds = time.time() - t0
    if run.stain is not None and stain_counts[1]:
        log.info("Stain normalisation, epoch %d: %d of %d training crops passed through "
                 "unchanged (too little tissue or an implausible stain estimate).",
                 epoch + 1, *stain_counts)
        run.write_scalars(int(state.step), {"train/stain_passthrough": stain_counts[0]},
                          epoch=epoch + 1)
    return state, train_seconds


def _log_steps(run: Run, loop: checkpointing.LoopState, host: list[dict], step: int,
               stain_counts: list[int]) -> float:
    """Fetched step metrics -> NaN guard, the epoch's sums, the step scalars; returns the last
    loss."""
    for k, hm in enumerate(host):
        if not np.isfinite(hm["loss"]):
            raise NonFiniteLossError(
                f"Non-finite training loss ({hm['loss']}) at step {step - len(host) + k + 1} "
                f"(epoch {loop.epoch + 1}). The last good checkpoint is kept in "
                f"{run.ckpt.latest.directory} (a rerun resumes from it). Lower "
                "--config.optimizer.learning_rate or check the input data.")
        loop.add_step(float(hm["loss"]), float(hm["accuracy"]))
        if "stain_passthrough" in hm:
            stain_counts[0] += int(hm["stain_passthrough"])
            stain_counts[1] += run.config.batch_size * run.config.num_inputs
    run.write_scalars(step, {"train/loss": host[-1]["loss"],
                             "train/grad_norm": host[-1]["grad_norm"],
                             "train/lr": float(run.lr_schedule(step - 1))},
                      epoch=loop.epoch + 1)
    return float(host[-1]["loss"])


def validate_epoch(run: Run, state, loop: checkpointing.LoopState, train_seconds: float) -> None:
    """Validation macro-F1 of the epoch just trained; the best weights; early stopping."""
    config, epoch = run.config, loop.epoch
    t0 = time.time()
    ev = evaluate_dataset(run.eval_step, state.params, state.batch_stats, run.val_loader,
                          run.mesh, progress=config.progress, desc="validation")
    val_time = time.time() - t0
    vm = classification_metrics(ev["labels"], ev["logits"], config.model.num_classes)
    val_loss = _weighted_ce_host(ev["logits"], ev["labels"], run.class_weights)
    n_steps = max(loop.summed_steps, 1)
    train_time = train_seconds
    row = {"epoch": epoch + 1, "train_loss": loop.loss_sum / n_steps,
           "train_accuracy": loop.accuracy_sum / n_steps, "val_loss": val_loss,
           "val_macro_f1": vm["macro_f1"], "val_accuracy": vm["accuracy"],
           "samples_per_s": run.steps_per_epoch * config.batch_size / max(train_time, 1e-9),
           "train_s": train_time, "val_s": val_time}
    loop.history.append(row)
    run.write_scalars(int(state.step), {f"epoch/{k}": v for k, v in row.items() if k != "epoch"},
                      epoch=epoch + 1)
    improved = vm["macro_f1"] > loop.best_f1
    if improved:
        loop.best_f1, loop.best_epoch, loop.bad_epochs = vm["macro_f1"], epoch + 1, 0
        run.ckpt.save_best(int(state.step),
                           {"params": state.params, "batch_stats": state.batch_stats},
                           {"epoch": epoch + 1, "val_macro_f1": vm["macro_f1"]})
    else:
        loop.bad_epochs += 1
    log.info("epoch %d: train loss %.4f | val loss %.4f, macro-F1 %.4f%s | %.1f samples/s",
             epoch + 1, row["train_loss"], val_loss, vm["macro_f1"], " (best)" if improved else "",
             row["samples_per_s"])
    loop.end_epoch()
    if loop.bad_epochs >= config.patience:
        loop.stopped_early = True
        log.info("Early stopping: no validation improvement for %d epochs.", config.patience)


def save_latest(run: Run, state, loop: checkpointing.LoopState, train_iter) -> None:
    """The latest checkpoint: train state, data stream, loop state (with the log's size)."""
    loop.metrics_bytes = os.path.getsize(run.metrics_path) if run.primary else 0
    run.ckpt.save_latest(int(state.step), state, train_iter, loop)


def test_best(run: Run, state, loop: checkpointing.LoopState) -> dict:
    """Tests the best weights; writes the predictions, pictures and (last) ``metrics.json``."""
    config, data_cfg = run.config, run.data_cfg
    best = run.ckpt.restore_best({"params": state.params, "batch_stats": state.batch_stats})
    weights_best = best[0]
    test_loader = pipeline.make_eval_loader(
        run.source, run.split["test"], global_batch_size=config.eval_batch_size, num_workers=0,
        **run.loader_kw)
    ev = evaluate_dataset(run.eval_step, weights_best["params"], weights_best["batch_stats"],
                          test_loader, run.mesh, progress=config.progress, desc="test")
    result = classification_metrics(ev["labels"], ev["logits"], config.model.num_classes)
    result.update(num_inputs=config.num_inputs, run=config.run, seed=config.seed,
                  best_epoch=loop.best_epoch, best_val_macro_f1=loop.best_f1,
                  epochs_trained=loop.epoch, stopped_early=loop.stopped_early,
                  scales=list(data_cfg.scales[:config.num_inputs]), data_dir=data_cfg.dir)
    run.write_scalars(int(state.step), {f"test/{k}": v for k, v in result.items()
                                        if isinstance(v, float)})
    with workdir_lib.writing("the metrics log", run.metrics_path):
        run.writer.close()
    done_file = os.path.join(run.workdir, METRICS_FILE)
    if run.primary:
        with workdir_lib.writing("the test outputs", run.workdir):
            _write_test_outputs(run.workdir, ev, run.source, data_cfg, result, loop.history)
        # Written last: its presence marks the run finished.
        workdir_lib.write_atomic(done_file, json.dumps(result, indent=2), "the test metrics")
    log.info("Test (best epoch %d): macro-F1 %.4f, accuracy %.4f, AUROC %.4f -> %s",
             loop.best_epoch, result["macro_f1"], result["accuracy"], result["auroc"], done_file)
    return result


def _write_test_outputs(workdir, ev, source, data_cfg, result, history) -> None:
    """Test predictions CSV and the pictures of the run."""
    probs = softmax(ev["logits"].astype(np.float64))
    names = list(data_cfg.class_names)
    n_in = ev["attention"].shape[1]
    scales = list(data_cfg.scales[:n_in])
    cols = (["filename", "num_id", "label", "predicted"] + [f"prob_{c}" for c in names]
            + [f"attn_{scales[i]}_to_{scales[j]}" for i in range(n_in) for j in range(n_in)])
    lines = [",".join(cols)]
    for k, idx in enumerate(ev["index"]):
        vals = [source.filenames[idx], source.num_ids[idx], str(int(ev["labels"][k])),
                names[int(probs[k].argmax())]]
        vals += [f"{p:.6f}" for p in probs[k]] + [f"{a:.6f}" for a in ev["attention"][k].ravel()]
        lines.append(",".join(vals))
    path = os.path.join(workdir, "test_predictions.csv")
    workdir_lib.write_atomic(path, "\n".join(lines) + "\n", "the test predictions")
    plots.training_curves(history, os.path.join(workdir, "training_curves.png"))
    plots.confusion_matrix(np.asarray(result["confusion_matrix"]), names,
                           os.path.join(workdir, "confusion_matrix.png"))
    if len(names) == 2 and len(np.unique(ev["labels"])) == 2:
        plots.roc_curve(ev["labels"], probs[:, 1], os.path.join(workdir, "roc_curve.png"))
