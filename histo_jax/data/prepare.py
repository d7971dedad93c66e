"""Prepared dataset: validate, then resize once into TFDS ArrayRecord, keyed by fingerprint.

``prepare_dataset(data_cfg)``:

1. structural scan of the folder (cheap: labels file, file presence; no decoding);
   structural errors raise ``DataValidationError`` at once;
2. fingerprint = SHA-256 of: sorted relative paths, sizes and mtimes of the used
   files (labelled samples x configured scales), SHA-256 of the labels file
   content, the scales (in order), the image size, ``num_classes``,
   ``on_bad_sample`` and the prepared format version;
3. if ``<root>/<fingerprint[:16]>/`` holds a completed preparation with that
   fingerprint it is REUSED (no decoding at all); otherwise
4. full validation (every image decoded, in a thread pool) — bad data is never
   prepared; with ``on_bad_sample='skip'`` the skipped samples are excluded and
   listed. Validation keeps each crop resized (PIL antialiased bilinear) in a
   temporary memory-mapped array inside the output folder, so every file is decoded
   ONCE; then the TFDS builder (``histo_jax.data.tfds_builder``) writes the records
   from it, the temporary array is deleted, and a metadata file
   ``histo_jax_prepared.json`` is written LAST, atomically (completion marker).

``<root>`` is ``data_cfg.prepared_dir`` if set, else ``$HISTO_JAX_CACHE/datasets``
(default ``$XDG_CACHE_HOME/histo_jax/datasets``, i.e. ``~/.cache/histo_jax/datasets``).
A changed source folder gets a new fingerprint, hence a new build; older builds are
left in place (delete the folder to reclaim space).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import numpy as np

from histo_jax.data.layout import (IMAGE_SUFFIX, DataValidationError, Sample, scan_folder,
                                   validate_dataset)
from histo_jax.errors import WriteFailedError, failure_reason, is_write_failure
from histo_jax.paths import cache_root

PREPARED_FORMAT = 1
META_FILE = "histo_jax_prepared.json"


def prepared_root(data_cfg) -> str:
    """Where prepared datasets live: ``data_cfg.prepared_dir`` or ``<cache_root>/datasets``."""
    explicit = data_cfg.get("prepared_dir", "") if hasattr(data_cfg, "get") else ""
    return os.path.expanduser(explicit) if explicit else os.path.join(cache_root(), "datasets")


def compute_fingerprint(data_cfg, data_dir: str, samples: list[Sample]) -> str:
    """SHA-256 over the used files' (relative path, size, mtime), labels content and config."""
    files = []
    for scale in data_cfg.scales:
        for s in samples:
            rel = f"{scale}/{s.filename}{IMAGE_SUFFIX}"
            st = os.stat(os.path.join(data_dir, rel))
            files.append((rel, st.st_size, st.st_mtime_ns))
    files.sort()
    labels_path = os.path.join(data_dir, data_cfg.labels_file)
    with open(labels_path, "rb") as f:
        labels_hash = hashlib.sha256(f.read()).hexdigest()
    payload = {
        "format": PREPARED_FORMAT,
        "scales": list(data_cfg.scales),
        "image_size": int(data_cfg.image_size),
        "num_classes": int(data_cfg.num_classes),
        "on_bad_sample": data_cfg.get("on_bad_sample", "error"),
        "labels_file": data_cfg.labels_file,
        "labels_sha256": labels_hash,
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A completed preparation: ``path`` is its folder (metadata + TFDS data dir)."""

    path: str
    fingerprint: str
    data_dir: str
    scales: tuple[str, ...]
    image_size: int
    samples: tuple[Sample, ...]
    skipped: dict
    reused: bool = False

    @property
    def tfds_data_dir(self) -> str:
        return os.path.join(self.path, "tfds")


def read_prepared(path: str, reused: bool = False) -> PreparedDataset:
    """Reads the metadata of a prepared dataset folder.

    Raises:
      FileNotFoundError: ``path`` holds no completed preparation.
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a completed prepared dataset ({META_FILE} "
                                f"missing); run 'python -m histo_jax.data prepare --data_dir DIR'")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{meta_path}: prepared format {meta.get('format')} is not "
                         f"{PREPARED_FORMAT}; delete {path} and prepare again")
    samples = tuple(Sample(f, n, int(lab)) for f, n, lab in meta["samples"])
    return PreparedDataset(path=path, fingerprint=meta["fingerprint"], data_dir=meta["data_dir"],
                           scales=tuple(meta["scales"]), image_size=int(meta["image_size"]),
                           samples=samples, skipped=meta.get("skipped", {}), reused=reused)


def prepare_dataset(data_cfg, data_dir: str | None = None, *,
                    log: Callable[[str], None] = print, progress: bool = True
                    ) -> PreparedDataset:
    """Validates and prepares (or reuses) the dataset of ``data_dir`` / ``data_cfg.dir``.

    Raises:
      DataValidationError: the folder has errors (full report in the message).
    """
    data_dir = os.path.abspath(os.path.expanduser(data_dir or data_cfg.dir))
    scan = scan_folder(data_cfg, data_dir)
    if not scan.ok:
        raise DataValidationError(scan)
    fingerprint = compute_fingerprint(data_cfg, data_dir, scan.samples)
    path = os.path.join(prepared_root(data_cfg), fingerprint[:16])
    if os.path.isfile(os.path.join(path, META_FILE)):
        prepared = read_prepared(path, reused=True)
        if prepared.fingerprint == fingerprint:
            log(f"Reusing prepared dataset {path} ({len(prepared.samples)} samples, unchanged "
                f"source {data_dir}).")
            return prepared
    kept = (f"Nothing was kept: the unfinished {path} was removed, and {data_dir} is "
            "untouched. Free space (or point data.prepared_dir or HISTO_JAX_CACHE at another "
            "disk) and run the command again.")
    try:
        return _prepare_into(data_cfg, data_dir, scan, fingerprint, path, log, progress)
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, Exception) and is_write_failure(e):
            raise WriteFailedError(f"Could not write the prepared dataset ({path}): "
                                   f"{failure_reason(e)}. {kept}") from e
        raise


def _reserve(path: str) -> None:
    """Allocates the whole file now: a memory-mapped write to a full disk kills the process
    (SIGBUS); a full disk here is an ordinary ENOSPC error instead."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # not supported here: skip
                raise


def _prepare_into(data_cfg, data_dir, scan, fingerprint, path, log, progress) -> PreparedDataset:
    """Validates and writes the prepared dataset into ``path`` (removed by the caller on
    failure); the completion marker (``meta.json``) is written last."""
    if os.path.exists(path):  # A crashed earlier build of ours: no completion marker.
        shutil.rmtree(path)
    os.makedirs(path)
    start = time.perf_counter()
    # Validation decodes every file once and keeps the resized crops in a temporary
    # memory-mapped array, so that the build itself decodes nothing again.
    size, num_scales = int(data_cfg.image_size), len(data_cfg.scales)
    resized_path = os.path.join(path, "resized.tmp.npy")
    resized = np.lib.format.open_memmap(resized_path, mode="w+", dtype=np.uint8,
                                        shape=(max(1, scan.num_candidates), num_scales,
                                               size, size, 3))
    _reserve(resized_path)
    rows: dict[str, int] = {}

    def keep(filename: str, k: int, image: np.ndarray) -> None:
        resized[rows.setdefault(filename, len(rows)), k] = image

    try:
        log(f"Validating {scan.num_candidates} samples x {num_scales} scales "
            f"(each image decoded once)")
        report = validate_dataset(data_cfg, data_dir, progress=progress, on_resized=keep)
        if not report.ok:
            raise DataValidationError(report)
        if report.warnings or report.skipped:
            log(report.format())
        log(f"Preparing {len(report.samples)} samples x {num_scales} scales at {size} px "
            f"into {path}")
        _build(data_cfg, report.samples, os.path.join(path, "tfds"), resized, rows, data_dir)
    finally:
        resized = None  # unmaps the file (the reference in `keep` goes with it)
    os.remove(resized_path)
    meta = {
        "format": PREPARED_FORMAT,
        "fingerprint": fingerprint,
        "data_dir": data_dir,
        "scales": list(report.scales),
        "image_size": int(data_cfg.image_size),
        "samples": [[s.filename, s.num_id, s.label] for s in report.samples],
        "skipped": report.skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(path, META_FILE))
    seconds = time.perf_counter() - start
    log(f"Prepared {len(report.samples)} samples in {seconds:.1f} s "
        f"({len(report.samples) / max(seconds, 1e-9):.1f} samples/s): {path}")
    return read_prepared(path)


def _build(data_cfg, samples: list[Sample], tfds_dir: str, resized: np.ndarray,
           rows: dict[str, int], data_dir: str) -> None:
    """Runs the TFDS builder (it shows its own progress bar, examples/s)."""
    import tensorflow_datasets as tfds

    from histo_jax.data.tfds_builder import HistoJaxDataset

    builder = HistoJaxDataset(scales=tuple(data_cfg.scales), image_size=int(data_cfg.image_size),
                              samples=samples, num_workers=int(data_cfg.get("num_workers", 2)),
                              preloaded=resized, preloaded_rows=rows,
                              data_dir=tfds_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
