"""Orbax checkpoints: the latest training state (for exact resume) and the best weights.

``<workdir>/checkpoints/<step>/`` holds ``state`` (params, batch stats, optimizer state,
step), ``data_iter`` (the Grain iterator, one file per process) and ``meta`` (epoch,
early-stopping state, running sums: JSON). ``<workdir>/best/<step>/`` holds ``weights``
(params and batch stats of the best validation macro-F1) and ``meta``.

Orbax writes each step to a temporary folder and renames it when complete, so a process
killed mid-save leaves no half checkpoint behind. A checkpoint that is complete but fails
to restore (a damaged file) is reported and the previous one is used instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(path: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(path), options=options)


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The latest-state and best-weights checkpoints of one workdir."""

    def __init__(self, workdir: str, keep: int = 2):
        self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
        self.best = _manager(os.path.join(workdir, "best"), 1)

    def save_latest(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.latest.wait_until_finished()

    def restore_latest(self, target_state: Any, data_iter: Any):
        """Returns ``(state, meta)`` of the newest restorable checkpoint, or ``None``.

        ``target_state`` gives structure, shapes and shardings; ``data_iter`` is restored
        in place.
        """
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(target_state)),
                    data_iter=grain.checkpoint.CheckpointRestore(data_iter),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any damage means: try the previous one
                log.warning("Checkpoint %s/%d cannot be restored (%s: %s); falling back to the "
                            "previous one.", self.latest.directory, step, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                continue
            return restored["state"], restored["meta"]
        return None

    def save_best(self, step: int, weights: Any, meta: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(
            weights=ocp.args.StandardSave(weights), meta=ocp.args.JsonSave(meta)), force=True)
        self.best.wait_until_finished()

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
        mngr = ocp.CheckpointManager(os.path.abspath(path))
    step = mngr.latest_step()
    if step is None:
        return None
    weights_args = (ocp.args.StandardRestore(_abstract(target_weights))
                    if target_weights is not None else ocp.args.StandardRestore())
    restored = mngr.restore(step, args=ocp.args.Composite(
        weights=weights_args, meta=ocp.args.JsonRestore()))
    return restored["weights"], restored["meta"]
