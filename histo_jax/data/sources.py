"""Random-access data sources consumed by the Grain pipeline and the trainer.

Both sources have ``__len__`` and ``__getitem__(i) -> dict(images=uint8 (K, S, S, 3)
in configured-scale order, label=np.int32 (-1 when unlabelled), index=np.int32(i))``
and the attributes ``labels`` (np.ndarray int32), ``num_ids``, ``filenames``,
``scales`` and ``image_size`` (metadata only: no image is decoded to get them).

- ``PreparedSource``: the TFDS ArrayRecord dataset of ``prepare.py``, opened with
  ``tfds.data_source``; cheap reads, picklable (reopens lazily in Grain workers).
- ``FolderSource``: decodes + resizes the raw PNG crops on every access, as the
  original does (benchmark, prediction on new folders where labels are optional).
  A bad image raises ``BadImageError`` naming the file; nothing is substituted.

``load_dataset(data_cfg)`` = validate -> prepare or reuse -> ``PreparedSource``.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
# Imported by tfds.data_source on first use, from whichever thread opens the source first
# (a reader thread, in a Grain worker): imported here instead (tests/test_threads.py).
import tensorflow_datasets.core.data_sources.base  # noqa: F401
import tree  # noqa: F401

from histo_jax.data.layout import (IMAGE_SUFFIX, DataValidationError, Sample, load_resized,
                                   scan_folder)
from histo_jax.data.prepare import PreparedDataset, prepare_dataset, read_prepared
from histo_jax.data.tfds_builder import SPLIT

__all__ = ["PreparedSource", "FolderSource", "load_dataset", "scan_folder",
           "DataValidationError"]


class _MetadataMixin:
    """Shared metadata attributes built from a list of samples."""

    def _set_samples(self, samples: Sequence[Sample], scales: Sequence[str], image_size: int):
        self.samples = tuple(samples)
        self.labels = np.asarray([s.label for s in self.samples], dtype=np.int32)
        self.num_ids = [s.num_id for s in self.samples]
        self.filenames = [s.filename for s in self.samples]
        self.scales = tuple(scales)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def _check_index(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self.samples):
            raise IndexError(f"record {i} out of range for {type(self).__name__} of "
                             f"{len(self.samples)} records")
        return i

    def _record(self, i: int, images: np.ndarray) -> dict:
        return {"images": images, "label": np.int32(self.labels[i]), "index": np.int32(i)}


class PreparedSource(_MetadataMixin):
    """The prepared ArrayRecord dataset of a ``prepare_dataset`` folder."""

    def __init__(self, prepared: PreparedDataset | str):
        if isinstance(prepared, str):
            prepared = read_prepared(prepared)
        self.prepared = prepared
        self._set_samples(prepared.samples, prepared.scales, prepared.image_size)
        self._ds = None

    def _open(self):
        if self._ds is None:
            ds = tfds.data_source(
                "histo_jax_dataset", split=SPLIT, data_dir=self.prepared.tfds_data_dir,
                download=False,
                builder_kwargs={"scales": self.scales, "image_size": self.image_size})
            if len(ds) != len(self.samples):
                raise ValueError(f"{self.prepared.path}: {len(ds)} records but {len(self.samples)} "
                                 f"samples in its metadata; delete the folder and prepare again")
            self._ds = ds
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # Reopened lazily (e.g. in a Grain worker process).
        return state

    def __getitem__(self, i) -> dict:
        i = self._check_index(i)
        rec = self._open()[i]
        return self._record(i, np.asarray(rec["images"], dtype=np.uint8))

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [self._check_index(i) for i in indices]
        recs = self._open().__getitems__(indices)
        return [self._record(i, np.asarray(r["images"], dtype=np.uint8))
                for i, r in zip(indices, recs)]

    def read_record(self, i) -> dict:
        """The full stored record (images, label, num_id, filename) of sample ``i``."""
        return self._open()[self._check_index(i)]

    def __repr__(self) -> str:
        return (f"PreparedSource({self.prepared.path!r}, {len(self)} records, scales="
                f"{list(self.scales)}, image_size={self.image_size})")


class FolderSource(_MetadataMixin):
    """Raw PNG folders: decode + resize every access (no preparation, labels optional)."""

    def __init__(self, data_cfg, data_dir: str | None = None, *, require_labels: bool = False,
                 samples: Sequence[Sample] | None = None):
        """Scans ``data_dir`` (structure only) unless ``samples`` are given.

        Raises:
          DataValidationError: structural problems (missing folders / files, bad labels).
        """
        self.data_dir = os.path.abspath(os.path.expanduser(data_dir or data_cfg.dir))
        if samples is None:
            report = scan_folder(data_cfg, self.data_dir, require_labels=require_labels)
            report.raise_if_errors()
            samples = report.samples
        self._set_samples(samples, data_cfg.scales, data_cfg.image_size)

    def __getitem__(self, i) -> dict:
        i = self._check_index(i)
        name = self.filenames[i] + IMAGE_SUFFIX
        images = np.stack([load_resized(os.path.join(self.data_dir, scale, name), self.image_size)
                           for scale in self.scales])
        return self._record(i, images)

    def __repr__(self) -> str:
        return (f"FolderSource({self.data_dir!r}, {len(self)} records, scales="
                f"{list(self.scales)}, image_size={self.image_size})")


def load_dataset(data_cfg, *, log: Callable[[str], None] = print) -> PreparedSource:
    """Validates ``data_cfg.dir`` (raising ``DataValidationError`` with the full report),
    prepares it or reuses an unchanged preparation, and opens it."""
    if not data_cfg.dir:
        raise ValueError("data_cfg.dir is empty; give the dataset folder (the trainer "
                         "substitutes the demo dataset when none is configured).")
    return PreparedSource(prepare_dataset(data_cfg, log=log))
