"""What a workdir guarantees: one run's identity, one process at a time, clear write failures.

Identity: ``<workdir>/identity.json`` records what the results are computed from: every
field of the resolved config except those of :data:`NOT_IN_IDENTITY` (which change no
number of a run), plus the prepared dataset's fingerprint (``histo_jax.data.prepare``:
the used files' paths, sizes and mtimes, the labels file's content, scales, image size).
It is written when the workdir is claimed, before ``config.json``; both are rewritten only
while the workdir holds no result (no checkpoint, best weights or ``metrics.json``). Once
it does, a command whose identity differs from the stored one is refused
(:class:`IdentityMismatchError` lists the fields, old -> new), unless it asks to discard the
old run, which is then moved, not deleted, to ``<workdir>.discarded-<time>/``.

Lock: ``<workdir>/run.lock`` is held with an exclusive ``flock`` for the whole run and
names its holder (pid, host, start time, command). The kernel drops the lock when its
process dies, so a lock left by a killed process is taken over (and reported); a live
holder makes a second process fail at once (:class:`WorkdirBusyError`). In a multi-host
run only process 0 takes the lock (all processes share the workdir).

Writes: :func:`writing` turns an ``OSError`` (a full disk, an I/O error) into a
:class:`WriteFailedError` that names the file; :func:`write_atomic` writes a file whole or
not at all.

This module imports neither JAX nor the data stack at import time.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from typing import Callable

from histo_jax.errors import (WorkdirError, WriteFailedError, failure_reason,  # noqa: F401
                              is_write_failure, write_atomic, writing)


class WorkdirBusyError(WorkdirError):
    """Another live process holds the workdir's lock."""


class IdentityMismatchError(WorkdirError):
    """The workdir holds a run of another configuration or data."""


log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
LOCK_FILE = "run.lock"
IDENTITY_FORMAT = 1

# Config fields that change no number a run produces (what is computed, in which order,
# from which data); they may differ when a run is resumed or a finished one is reported.
NOT_IN_IDENTITY = {
    "progress": "progress bars",
    "log_every_steps": "how often training scalars are logged",
    "compilation_cache_dir": "where compiled programs are cached",
    "xla_cpu_memory_scheduler": "the order XLA:CPU runs a step's operations in (peak memory)",
    "checkpoint_every_steps": "when the latest state is saved (resuming is exact)",
    "keep_checkpoints": "how many latest states are kept",
    "failure_timeout_s": "how soon the processes of a multi-host run stop when one fails",
    "model.trunk": "how the encoder is called in a step (the same numbers)",
    "model.eval_chunk": "how many crops an eval-mode encoder call takes (the same numbers)",
    "data.num_workers": "loader worker processes (the batches do not depend on them)",
    "data.dir": "where the source folder is (the data are identified by their fingerprint)",
    "data.demo_dir": "where the demo dataset is written (idem)",
    "data.prepared_dir": "where prepared datasets are cached",
    "grid.num_inputs": "the grid's extent (a cell is identified by its num_inputs, run, seed)",
    "grid.runs": "the grid's extent (idem)",
    "data.stain.file": "where the fitted stain normaliser is (it is identified by its numbers, "
                       "data.stain.fitted)",
}

# Fields added after runs were first recorded: a stored identity without one of them was
# computed with this value (the reference behaviour), so it still matches.
ADDED_FIELDS = {
    "data.stain.method": "none", "data.stain.where": "step", "data.stain.min_tissue": 0.02,
    "data.stain.max_angle": 30.0, "data.stain_augment.method": "none",
    "data.stain_augment.per_input": False, "data.stain_augment.prob": 1.0,
    "data.stain_augment.hed_alpha": 0.05, "data.stain_augment.hed_beta": 0.05,
    "data.stain_augment.lab_mean": [5.0, 3.0, 3.0], "data.stain_augment.lab_std": [0.1, 0.1, 0.1],
}


# ---- Identity -------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key in sorted(tree):
        value, name = tree[key], f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity_fields(config) -> dict:
    """The config's fields that determine results: flattened (``'optimizer.learning_rate'``),
    as JSON values, without :data:`NOT_IN_IDENTITY`."""
    flat = _flatten(json.loads(config.to_json_best_effort()))
    fields = {k: v for k, v in flat.items() if k not in NOT_IN_IDENTITY}
    if flat.get("data.stain.method", "none") in ("macenko", "reinhard"):
        # The normaliser's numbers, not its path (raises StainError naming a missing file).
        from histo_jax.stain.normalize import load  # noqa: PLC0415 - numpy only, no JAX
        fields["data.stain.fitted"] = load(os.path.expanduser(flat["data.stain.file"]),
                                           flat["data.stain.method"]).fingerprint()
    return fields


def data_fingerprint(data_cfg) -> str:
    """The fingerprint that ``prepare_dataset`` gives the data of ``data_cfg.dir``: a
    structural scan only (no decoding, nothing prepared).

    Raises:
      DataValidationError: the folder has structural errors (full report).
    """
    from histo_jax.data.layout import DataValidationError, scan_folder
    from histo_jax.data.prepare import compute_fingerprint

    data_dir = os.path.abspath(os.path.expanduser(data_cfg.dir))
    scan = scan_folder(data_cfg, data_dir)
    if not scan.ok:
        raise DataValidationError(scan)
    return compute_fingerprint(data_cfg, data_dir, scan.samples)


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a run's results are computed from: config fields and the data's fingerprint."""

    fields: dict
    data_fingerprint: str

    @classmethod
    def of(cls, config, data_fingerprint: str) -> "RunIdentity":
        return cls(identity_fields(config), data_fingerprint)

    @property
    def fingerprint(self) -> str:
        payload = json.dumps({"fields": self.fields, "data": self.data_fingerprint}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": IDENTITY_FORMAT, "fingerprint": self.fingerprint,
                "data_fingerprint": self.data_fingerprint, "fields": self.fields,
                "not_in_identity": sorted(NOT_IN_IDENTITY)}

    def differences(self, new: "RunIdentity") -> list[str]:
        """``'field: old -> new'`` for every difference from ``self`` (stored) to ``new``."""
        out = []
        for key in sorted(set(self.fields) | set(new.fields)):
            old_v = self.fields.get(key, ADDED_FIELDS.get(key, _MISSING))
            new_v = new.fields.get(key, ADDED_FIELDS.get(key, _MISSING))
            if old_v != new_v:
                out.append(f"{key}: {_show(old_v)} -> {_show(new_v)}")
        if self.data_fingerprint != new.data_fingerprint:
            out.append(f"data (prepared dataset fingerprint): {self.data_fingerprint[:12]} -> "
                       f"{new.data_fingerprint[:12]} (the data folder's files or labels are not "
                       "those the run was trained on)")
        return out


_MISSING = object()


def _show(value) -> str:
    return "(not recorded)" if value is _MISSING else json.dumps(value)


def read_identity(workdir: str) -> RunIdentity | None:
    """The stored identity of ``workdir``, or None when it has none.

    Raises:
      WorkdirError: ``identity.json`` is unreadable or of an unknown format.
    """
    path = os.path.join(workdir, IDENTITY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"format {d.get('format')!r}, this histo_jax reads {IDENTITY_FORMAT}")
        # Fields excluded since the run started are ignored (they change no number).
        fields = {k: v for k, v in dict(d["fields"]).items() if k not in NOT_IN_IDENTITY}
        identity = RunIdentity(fields, str(d["data_fingerprint"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WorkdirError(
            f"{path} cannot be read ({type(e).__name__}: {e}), so the run in {workdir} cannot be "
            "checked against this command. Use a new --workdir, or move the folder aside.") from e
    return identity


def has_results(workdir: str) -> bool:
    """Whether anything was computed in ``workdir``: a checkpoint, best weights or metrics.json."""
    if os.path.exists(os.path.join(workdir, "metrics.json")):
        return True
    for sub in ("checkpoints", "best"):
        path = os.path.join(workdir, sub)
        if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Why the run stored in ``workdir`` is not the run of this command."""

    workdir: str
    differences: list

    @property
    def finished(self) -> bool:
        return os.path.exists(os.path.join(self.workdir, "metrics.json"))


def compare(workdir: str, identity: RunIdentity) -> Mismatch | None:
    """None when ``workdir`` may hold the run of ``identity``: it holds that run, or no
    result of any run yet (a start that saved nothing); else the mismatch."""
    stored = read_identity(workdir)
    if stored is not None and stored.fingerprint == identity.fingerprint:
        return None
    if not has_results(workdir):
        return None
    if stored is None:
        return Mismatch(workdir, [f"{IDENTITY_FILE}: missing, although the folder holds results "
                                  "(written by a histo_jax without run identities, or by "
                                  "something else): what they come from cannot be checked"])
    diffs = stored.differences(identity)
    if not diffs and stored.data_fingerprint == identity.data_fingerprint:
        return None  # Equal up to fields added since, at the values the run was computed with.
    return Mismatch(workdir, diffs or ["(fingerprint differs)"])


DISCARD_HINT = ("To keep the old results, give this command another --workdir. To start afresh "
                "here instead, add --discard_old_run: the old files are moved (not deleted) to "
                "<workdir>.discarded-<time>/.")


def mismatch_error(mismatches: list[Mismatch]) -> IdentityMismatchError:
    """One error for one or more mismatching runs (grid cells): differences and what to do."""
    first = mismatches[0]
    state = "a finished run" if first.finished else "an unfinished run"
    lines = [f"{first.workdir} holds {state} of another configuration or data; refusing to "
             f"mix results (stored identity: {os.path.join(first.workdir, IDENTITY_FILE)}). "
             "Differences, stored -> this command:"]
    lines += [f"  {d}" for d in first.differences]
    if len(mismatches) > 1:
        lines.append(f"{len(mismatches) - 1} more run(s) differ as well: "
                     + ", ".join(m.workdir for m in mismatches[1:]))
    lines.append(DISCARD_HINT)
    return IdentityMismatchError("\n".join(lines))


def discarded_path(workdir: str, stamp: str | None = None) -> str:
    """``<workdir>.discarded-<time>`` (with a suffix when that exists already)."""
    base = f"{os.path.normpath(workdir)}.discarded-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while os.path.exists(path):
        path, k = f"{base}-{k}", k + 1
    return path


def move_aside(workdir: str, dest: str) -> list[str]:
    """Moves every entry of ``workdir`` except its lock into ``dest``; returns their names."""
    names = sorted(n for n in os.listdir(workdir) if n != LOCK_FILE)
    if names:
        with writing("the discarded run", dest):
            os.makedirs(dest, exist_ok=True)
            for name in names:
                os.replace(os.path.join(workdir, name), os.path.join(dest, name))
    return names


def claim(workdir: str, identity: RunIdentity, config_json: str, *,
          discard_old_run: bool = False) -> None:
    """Makes ``workdir`` the home of the run ``identity`` (call with the lock held).

    A new workdir gets ``identity.json``, then ``config.json``. A workdir holding this run
    is left as it is. One holding results of another run is refused, or with
    ``discard_old_run`` moved aside first. A start that saved no result yet (no checkpoint)
    is replaced, with a warning.

    Raises:
      IdentityMismatchError: results of another run, and ``discard_old_run`` is False.
    """
    mismatch = compare(workdir, identity)
    if mismatch is not None:
        if not discard_old_run:
            raise mismatch_error([mismatch])
        dest = discarded_path(workdir)
        move_aside(workdir, dest)
        log.warning("Moved the old run of %s to %s (%s).", workdir, dest,
                    "; ".join(mismatch.differences))
    stored = read_identity(workdir)
    cfg_path = os.path.join(workdir, "config.json")
    if stored is None or stored.fingerprint != identity.fingerprint:
        if stored is not None:
            log.warning("%s: replacing the identity of a start that saved no result (%s).",
                        workdir, "; ".join(stored.differences(identity)))
        write_atomic(os.path.join(workdir, IDENTITY_FILE), json.dumps(identity.to_json(), indent=2),
                     "the run identity")
        write_atomic(cfg_path, config_json, "the resolved config")
    elif not os.path.exists(cfg_path):
        write_atomic(cfg_path, config_json, "the resolved config")


# ---- Lock -----------------------------------------------------------------------------------


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500]}


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?", "command": "(unreadable lock file)"}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command')}")


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirLock:
    """An exclusive lock on ``<workdir>/run.lock`` for one process (see the module doc)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises :class:`WorkdirBusyError` naming the live holder."""
        with writing("the workdir lock", self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.workdir} is in use by another histo_jax process: {_describe(holder)}. "
                "Wait for it to finish (or stop it), or give this command another --workdir."
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            self._check_without_locks(fd)
        previous = _read_holder(fd)
        if previous:
            log.warning("%s: taking over the lock left by %s, which ended without releasing it "
                        "(killed or crashed).", self.workdir, _describe(previous))
        with writing("the workdir lock", self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        self._fd = fd
        return self

    def _check_without_locks(self, fd: int) -> None:
        """File systems without locks: refuse a live holder on this host; warn otherwise."""
        holder = _read_holder(fd)
        if holder and holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
            os.close(fd)
            raise WorkdirBusyError(f"{self.workdir} is in use by another histo_jax process: "
                                   f"{_describe(holder)}. Wait for it, or use another --workdir.")
        log.warning("%s: the file system does not support locks; a second run on this workdir "
                    "from another host would not be detected.", self.workdir)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # An empty lock file: released, not abandoned.
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def call_with_hint(fn: Callable, hint: Callable[[], str]):
    """Runs ``fn``; a :class:`WriteFailedError` gets ``hint()`` appended (what happens next)."""
    try:
        return fn()
    except WriteFailedError as e:
        raise WriteFailedError(f"{e} {hint()}") from e.__cause__
