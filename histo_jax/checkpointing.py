"""Orbax checkpoints: the latest training state (for exact resume) and the best weights.

``<workdir>/checkpoints/<step>/`` holds ``state`` (params, batch stats, optimizer state,
step), ``data_iter`` (the Grain iterator, one file per process) and ``meta`` (the
trainer's :class:`LoopState`, JSON). ``<workdir>/best/<step>/`` holds ``weights`` (params
and batch stats of the best validation macro-F1) and ``meta``.

Orbax writes each step to a temporary folder and renames it when complete, so a process
killed mid-save leaves no half checkpoint behind (the temporary folder is ignored, and
removed when the workdir is opened again). A checkpoint that is complete but fails to
restore (a damaged file) is reported and the previous one is used instead; when none can
be restored, or one was written by an incompatible loop-state version, the error says so.
A save that fails (a full disk, an I/O error) raises :class:`~histo_jax.workdir.WriteFailedError`
and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, ClassVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from histo_jax.errors import describe
from histo_jax.workdir import WorkdirError, WriteFailedError, failure_reason

log = logging.getLogger(__name__)


class _OrbaxThreadErrors(logging.Filter):
    """Drops Orbax's log of an exception in its save thread (an ERROR with a traceback):
    the same exception reaches the waiting save, which reports it as one clear
    WriteFailedError. Attached only while a save runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


class CheckpointError(WorkdirError):
    """The workdir's saved training state cannot be used."""


class CorruptStateError(CheckpointError):
    """A saved loop state that is not one (missing, unknown or mistyped fields)."""


class IncompatibleStateError(CheckpointError):
    """A saved loop state of another version."""


# LoopState field annotations (strings under ``from __future__ import annotations``) -> JSON types.
_JSON_TYPES = {"int": int, "float": (int, float), "bool": bool, "list": list}


@dataclasses.dataclass
class LoopState:
    """The trainer's loop state, saved as JSON with every latest checkpoint.

    ``epoch`` counts completed epochs; ``loss_sum`` / ``accuracy_sum`` / ``summed_steps``
    are the running sums of the current epoch; ``data_start_step`` is the ``start_step``
    of the training loader whose Grain state is saved alongside; ``metrics_bytes`` is the
    size of ``metrics.jsonl`` at the save (a resumed run truncates the log to it).
    """

    # 2: the train state saved beside it holds the optimizer state flat (one vector per
    # moment, ``optim.make_optimizer``); version 1 held it tensor by tensor.
    VERSION: ClassVar[int] = 2

    epoch: int = 0
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    accuracy_sum: float = 0.0
    summed_steps: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)
    data_start_step: int = 0
    metrics_bytes: int = 0

    def add_step(self, loss: float, accuracy: float) -> None:
        self.loss_sum += loss
        self.accuracy_sum += accuracy
        self.summed_steps += 1

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sum, self.accuracy_sum, self.summed_steps = 0.0, 0.0, 0

    def to_json(self) -> dict:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "LoopState":
        """Parses a saved loop state.

        Raises:
          IncompatibleStateError: another version (or the unversioned dict of older code).
          CorruptStateError: not a loop state of this version (missing or mistyped fields).
        """
        if not isinstance(d, dict):
            raise CorruptStateError(f"{where}: the saved loop state is a {type(d).__name__}, "
                                    "not a JSON object.")
        version = d.get("version")
        if version != cls.VERSION:
            found = "no version (written before loop states were versioned)" if version is None \
                else f"version {version!r}"
            raise IncompatibleStateError(
                f"{where}: the saved loop state has {found}; this histo_jax reads version "
                f"{cls.VERSION}. Finish the run with the histo_jax that started it, or start "
                "afresh in a new --workdir.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = sorted(set(fields) - set(d))
        unknown = sorted(set(d) - set(fields) - {"version"})
        if missing or unknown:
            raise CorruptStateError(f"{where}: the saved loop state lacks {missing} / has unknown "
                                    f"fields {unknown}.")
        values = {}
        for name, f in fields.items():
            v = d[name]
            want = _JSON_TYPES[f.type]
            if not isinstance(v, want) or (f.type != "bool" and isinstance(v, bool)):
                raise CorruptStateError(f"{where}: loop-state field {name!r} is {v!r}, not a "
                                        f"{f.type}.")
            values[name] = float(v) if f.type == "float" else v
        if not all(isinstance(row, dict) for row in values["history"]):
            raise CorruptStateError(f"{where}: loop-state history holds non-object rows.")
        return cls(**values)


def _type_handlers():
    """Orbax's type handlers, with ``jax.Array`` written whole by its first replica. Orbax's
    default on CPU ("replica-parallel") splits each replicated array over the devices with
    a compiled slice per array shape: about 220 small compiles, 5 to 10 s, in every
    process's first save."""
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()), (jax.Array, th.ArrayHandler(use_replica_parallel=False)))


def _host_copies(tree: Any) -> Any:
    """``tree`` with its fully replicated ``jax.Array`` leaves as numpy copies (the trainer's
    state is replicated): Orbax's numpy handler writes them from process 0 in about half the
    time of its per-array ``jax.Array`` path (0.2 s against 0.5 s for the tiny model's 402
    arrays). Restores with a target give ``jax.Array`` leaves with the target's shardings
    either way; other leaves are saved as they are."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_replicated else x, tree)


def _manager(path: str, keep: int, arrays: str, *, data_iter: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
    """A manager of steps holding the pytree item ``arrays``, ``meta`` (JSON) and, with
    ``data_iter``, the Grain iterator."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    handlers = {arrays: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                "meta": ocp.JsonCheckpointHandler()}
    if data_iter:
        handlers["data_iter"] = grain.checkpoint.CheckpointHandler()
    return ocp.CheckpointManager(os.path.abspath(path), options=options, item_handlers=handlers)


def _restore_args(target):
    """Restore arguments of a pytree item: like ``target`` (shapes, dtypes, shardings), or
    as saved when None."""
    if target is None:
        return ocp.args.PyTreeRestore()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)


class Checkpoints:
    """The latest-state and best-weights checkpoints of one workdir."""

    def __init__(self, workdir: str, keep: int = 2):
        self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, "state", data_iter=True)
        # Two best steps: the one of a resumed state survives a newer one that is dropped.
        self.best = _manager(os.path.join(workdir, "best"), 2, "weights")

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _save(self, mngr: ocp.CheckpointManager, step: int, args, what: str) -> None:
        quiet = _OrbaxThreadErrors()
        absl_log = logging.getLogger("absl")
        absl_log.addFilter(quiet)
        try:
            if step in mngr.all_steps():  # Saved before a resume replayed it (or damaged).
                mngr.delete(step)
            mngr.save(step, args=args, force=True)
            mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
            raise WriteFailedError(f"Could not write the {what} checkpoint "
                                   f"{mngr.directory}/{step}: {failure_reason(e)}.") from e
        finally:
            absl_log.removeFilter(quiet)

    def save_latest(self, step: int, state: Any, data_iter: Any, loop: LoopState) -> None:
        self._save(self.latest, step, ocp.args.Composite(
            state=ocp.args.PyTreeSave(_host_copies(state)),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(loop.to_json())), "training state")

    def restore_latest(self, target_state: Any) -> tuple[int, Any, LoopState] | None:
        """``(step, state, loop_state)`` of the newest restorable checkpoint; None when there
        is none. ``target_state`` gives structure, shapes and shardings.

        Raises:
          CheckpointError: there are checkpoints but none can be restored, or one holds an
            incompatible loop state.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        failures = []
        for step in steps:
            where = f"{self.latest.directory}/{step}"
            try:
                # The loop state first: its version says whether the train state beside it
                # has this histo_jax's layout (a clear error, not a failed restore).
                meta = self.latest.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                loop = LoopState.from_json(meta, f"{where}/meta")
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=_restore_args(target_state)))
            except IncompatibleStateError:
                raise
            except Exception as e:  # noqa: BLE001 - any damage means: try the previous one
                failures.append(f"{where}: {describe(e)}")
                log.warning("Checkpoint %s cannot be restored (%s); falling back to the previous "
                            "one.", where, describe(e))
                continue
            return step, restored["state"], loop
        if failures:
            raise CheckpointError(
                "None of the checkpoints of this run can be restored:\n  " + "\n  ".join(failures)
                + f"\nThe run cannot resume. Move {os.path.dirname(str(self.latest.directory))} "
                "aside (or delete it) and run the command again, or use a new --workdir.")
        return None

    def restore_data_iter(self, step: int, data_iter: Any) -> bool:
        """Restores ``data_iter`` in place from checkpoint ``step``; False when it cannot be
        (saved with another worker or process count, or damaged)."""
        try:
            self.latest.restore(step, args=ocp.args.Composite(
                data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
        except Exception as e:  # noqa: BLE001
            log.info("The data iterator of %s/%d cannot be restored (%s).", self.latest.directory,
                     step, describe(e))
            return False
        return True

    def drop_best_after(self, step: int) -> None:
        """Deletes best-weight steps newer than ``step`` (saved after the resumed state)."""
        for s in self.best.all_steps():
            if s > step:
                self.best.delete(s)

    def save_best(self, step: int, weights: Any, meta: dict) -> None:
        self._save(self.best, step, ocp.args.Composite(
            weights=ocp.args.PyTreeSave(_host_copies(weights)), meta=ocp.args.JsonSave(meta)),
            "best-weights")

    def restore_best(self, target_weights: Any | None = None):
        """Returns ``(weights, meta)`` of the best checkpoint, or ``None`` when there is none."""
        return restore_best(self.best, target_weights)

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_best(manager_or_workdir, target_weights: Any | None = None):
    """Best weights of a run (``{'params', 'batch_stats'}`` as restored) and their meta."""
    mngr = manager_or_workdir
    if isinstance(mngr, (str, os.PathLike)):
        path = os.path.join(os.fspath(mngr), "best")
        if not os.path.isdir(path):
            return None
        mngr = _manager(path, 2, "weights", read_only=True)
    step = mngr.latest_step()
    if step is None:
        return None
    restored = mngr.restore(step, args=ocp.args.Composite(
        weights=_restore_args(target_weights), meta=ocp.args.JsonRestore()))
    return restored["weights"], restored["meta"]
