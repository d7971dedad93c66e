"""Grain input pipelines: class-balanced sampling with replacement, train and eval loaders.

Sources (``histo_jax.data.sources``) are random-access: ``source[i]`` is a dict with
``images`` uint8 (K, S, S, 3) in configured-scale order, ``label`` and ``index``; they
expose ``labels``. The loaders deliver uint8 batches; augmentation and scaling run on
the accelerator (``histo_jax.data.augment``).

Determinism and multi-host semantics
------------------------------------
The training stream is ONE global sequence of draws, independent of the number of
processes and workers: draw ``g`` belongs to epoch ``g // n`` (``n`` = number of training
records, one epoch = ``n`` draws as the reference's ``WeightedRandomSampler``) and is the
``g % n``-th of that epoch's ``n`` i.i.d. draws from ``Philox(key=[seed, epoch])`` with
probabilities proportional to the balanced class weight of each record's label. Global
batch ``b`` = draws ``[b*B, (b+1)*B)``; process ``p`` of ``P`` loads the contiguous slice
``[b*B + p*B/P, b*B + (p+1)*B/P)``. Grain records are whole per-process batches, so every
Grain worker assembles complete batches and the output does not depend on
``num_workers`` either. Iterator state (``get_state``/``set_state``) is the batch
counter, so resuming is exact.

Evaluation visits every record once, in order; the last global batch is padded with
copies of the first record and ``mask`` is False on padding (nothing is dropped).
"""
from __future__ import annotations

import math
# Grain starts its worker processes from a prefetch thread; what that imports on first use
# is imported here, in the main thread, instead (tests/test_threads.py).
import multiprocessing.dummy.connection  # noqa: F401
import multiprocessing.popen_fork  # noqa: F401
import multiprocessing.popen_spawn_posix  # noqa: F401
import sys
import zlib
from typing import Sequence

import grain
import numpy as np
from absl import flags

_INFINITE = sys.maxsize


def balanced_class_weights(labels: Sequence[int], num_classes: int | None = None) -> np.ndarray:
    """Per-class weight ``n / (n_present_classes * count_c)`` (sklearn 'balanced').

    Returns an array of length ``num_classes`` (default ``max(label) + 1``); classes absent
    from ``labels`` get weight 0.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("balanced_class_weights: no labels given (empty training set?).")
    if labels.min() < 0:
        raise ValueError(
            "balanced_class_weights: found unlabelled records (label -1); training and "
            "evaluation need labelled records (check the labels file).")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if counts.size > num_classes:
        raise ValueError(f"balanced_class_weights: label {labels.max()} >= num_classes={num_classes}.")
    present = counts > 0
    weights = np.zeros(num_classes, np.float64)
    weights[present] = labels.size / (present.sum() * counts[present])
    return weights


class WeightedReplacementSampler:
    """Grain sampler: i.i.d. draws WITH replacement, balanced by class (global stream).

    ``sampler[g]`` -> ``RecordMetadata(index=g, record_key=record_keys[draw])``, a pure
    function of ``(seed, g)``. One epoch = ``len(labels)`` draws; ``num_epochs=None``
    makes the sampler infinite.

    Args:
      labels: label of each candidate record (the training subset).
      seed: non-negative integer seed.
      record_keys: source index of each candidate (default ``range(len(labels))``).
      num_epochs: number of epochs, or None for an infinite stream.
    """

    def __init__(self, labels: Sequence[int], *, seed: int, record_keys: Sequence[int] | None = None,
                 num_epochs: int | None = None):
        labels = np.asarray(labels, np.int64)
        self._n = len(labels)
        if self._n == 0:
            raise ValueError("WeightedReplacementSampler: no training records.")
        if seed < 0:
            raise ValueError(f"WeightedReplacementSampler: seed must be >= 0; got {seed}.")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"WeightedReplacementSampler: num_epochs must be > 0 or None; got {num_epochs}.")
        keys = np.arange(self._n) if record_keys is None else np.asarray(record_keys, np.int64)
        if keys.shape != labels.shape:
            raise ValueError(
                f"WeightedReplacementSampler: {len(keys)} record_keys for {self._n} labels.")
        self.class_weights = balanced_class_weights(labels)
        weights = self.class_weights[labels]
        self._probs = weights / weights.sum()
        self._keys = keys
        self._seed = int(seed)
        self._num_epochs = num_epochs
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return _INFINITE if self._num_epochs is None else self._num_epochs * self._n

    def __repr__(self) -> str:  # Grain validates restored states against repr(sampler).
        return (f"WeightedReplacementSampler(num_records={self._n}, seed={self._seed}, "
                f"num_epochs={self._num_epochs}, keys_crc={zlib.crc32(self._keys.tobytes())})")

    @property
    def num_records(self) -> int:
        return self._n

    def epoch_draws(self, epoch: int) -> np.ndarray:
        """Positions (into ``labels``) of the ``n`` draws of ``epoch`` (cached)."""
        draws = self._cache.get(epoch)
        if draws is None:
            rng = np.random.Generator(np.random.Philox(key=[self._seed, epoch]))
            draws = rng.choice(self._n, size=self._n, replace=True, p=self._probs)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = draws
        return draws

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or index >= len(self):
            raise IndexError(f"WeightedReplacementSampler: draw {index} out of range [0, {len(self)}).")
        epoch, position = divmod(int(index), self._n)
        key = int(self._keys[self.epoch_draws(epoch)[position]])
        return grain.RecordMetadata(index=int(index), record_key=key)


class _IndexSampler:
    """Grain sampler mapping draw i -> record i, for i < n.

    Used for the evaluation stream (positions >= the sample count are padding) and, over
    batches, for the loaders' own index (``description``: repr of the batch source, kept in
    the iterator state for validation).
    """

    def __init__(self, n: int, description: str = ""):
        self._n = n
        self._description = description

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"_IndexSampler({self._n}, {self._description})"

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._n:
            raise IndexError(f"_IndexSampler: {index} out of range [0, {self._n}).")
        return grain.RecordMetadata(index=int(index), record_key=int(index))


def _check_batching(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0; got {global_batch_size}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}: choose a batch size that is a multiple of the number of JAX "
            "processes (config field 'batch_size').")
    return global_batch_size // process_count


class _GlobalBatchSource:
    """Random-access source of this process's slices of global batches.

    Item j = global batch ``start_step + j``: the draws ``[b*B + p*Bl, b*B + (p+1)*Bl)`` of
    ``sampler`` (record keys into ``source``), stacked. With ``num_valid`` set (eval), a
    draw ``g >= num_valid`` is padding: it loads ``record_keys[0]`` and gets mask False.
    """

    def __init__(self, source, sampler, *, global_batch_size: int, num_inputs: int,
                 process_index: int, process_count: int, start_step: int = 0,
                 record_keys: np.ndarray | None = None, num_valid: int | None = None):
        self._source = source
        self._sampler = sampler
        self._local = _check_batching(global_batch_size, process_index, process_count)
        self._global = global_batch_size
        self._offset = process_index * self._local
        self._num_inputs = num_inputs
        self._start = start_step
        self._keys = record_keys
        self._num_valid = num_valid
        total = len(sampler)
        self._num_batches = _INFINITE if total == _INFINITE else total // global_batch_size - start_step
        if self._num_batches <= 0:
            raise ValueError(f"start_step={start_step} is past the end of the stream "
                             f"({total // global_batch_size} global batches).")

    def __len__(self) -> int:
        return self._num_batches

    def __repr__(self) -> str:  # Grain validates restored states against repr(source).
        keys = "" if self._keys is None else f" keys_crc={zlib.crc32(self._keys.tobytes())}"
        return (f"_GlobalBatchSource({type(self._source).__name__}[{len(self._source)}], "
                f"{self._sampler!r}, B={self._global}, N={self._num_inputs}, "
                f"process_offset={self._offset}, start_step={self._start}{keys})")

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        first = (self._start + int(j)) * self._global + self._offset
        draws = range(first, first + self._local)
        if self._num_valid is None:
            keys = [self._sampler[g].record_key for g in draws]
            mask = None
        else:
            mask = np.array([g < self._num_valid for g in draws])
            keys = [int(self._keys[g if g < self._num_valid else 0]) for g in draws]
        if hasattr(self._source, "__getitems__"):  # Batched read (ArrayRecord).
            records = self._source.__getitems__(keys)
        else:
            records = [self._source[k] for k in keys]
        images = np.stack([_first_inputs(r["images"], self._num_inputs, k) for r, k in zip(records, keys)])
        batch = {
            "images": images,
            "labels": np.array([r["label"] for r in records], np.int32),
            "index": np.array([r["index"] for r in records], np.int32),
        }
        if mask is not None:
            batch["mask"] = mask
        return batch


def _first_inputs(images: np.ndarray, num_inputs: int, key: int) -> np.ndarray:
    if images.ndim != 4 or images.shape[0] < num_inputs or images.dtype != np.uint8:
        raise ValueError(
            f"record {key}: expected uint8 images (K >= {num_inputs}, S, S, 3); got "
            f"{images.dtype} {images.shape}. Prepare the dataset with at least {num_inputs} scales.")
    return images[:num_inputs]


def _ensure_absl_flags_parsed(num_workers: int) -> None:
    """Grain worker processes read absl flags; mark them parsed outside absl.app."""
    if num_workers > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _data_loader(batch_source: _GlobalBatchSource, num_workers: int, read_threads: int,
                 prefetch_batches: int) -> grain.DataLoader:
    if num_workers < 0 or read_threads < 0 or prefetch_batches < 1:
        raise ValueError("need num_workers >= 0, read_threads >= 0 and prefetch_batches >= 1; got "
                         f"{num_workers}, {read_threads}, {prefetch_batches}.")
    _ensure_absl_flags_parsed(num_workers)
    return grain.DataLoader(
        data_source=batch_source,
        sampler=_IndexSampler(len(batch_source), repr(batch_source)),
        worker_count=num_workers,
        worker_buffer_size=prefetch_batches,
        shard_options=grain.sharding.NoSharding(),  # Process slicing is done by the source.
        # Grain's defaults (16 threads, 500 prefetched elements) are meant for ~KiB records;
        # ours are whole batches of ~15 MB.
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches),
    )


def _labels_of(source, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError("indices must be a non-empty 1-D sequence of record indices.")
    if indices.min() < 0 or indices.max() >= len(source):
        raise ValueError(f"indices out of range for a source of {len(source)} records.")
    return np.asarray(source.labels)[indices]


def make_train_loader(source, train_indices: Sequence[int], *, global_batch_size: int, num_inputs: int,
                      seed: int, num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                      start_step: int = 0, num_epochs: int | None = None, read_threads: int = 2,
                      prefetch_batches: int = 2) -> grain.DataLoader:
    """Infinite (or ``num_epochs``-bounded) class-balanced training loader.

    ``iter(loader)`` yields ``{'images': uint8 (B/P, N, S, S, 3), 'labels': int32 (B/P,),
    'index': int32 (B/P,)}`` and supports ``get_state()`` / ``set_state()``.
    ``start_step`` is the first global batch of a fresh iterator (to resume without a
    saved iterator state); a saved state is relative to the ``start_step`` it was made with
    and can only be restored with the same ``num_workers`` (a Grain rule).
    ``read_threads`` batches are read concurrently per process (per worker with
    ``num_workers`` > 0), up to ``prefetch_batches`` ahead.
    """
    indices = np.asarray(train_indices, np.int64)
    labels = _labels_of(source, indices)
    sampler = WeightedReplacementSampler(labels, seed=seed, record_keys=indices, num_epochs=num_epochs)
    batches = _GlobalBatchSource(source, sampler, global_batch_size=global_batch_size,
                                 num_inputs=num_inputs, process_index=process_index,
                                 process_count=process_count, start_step=start_step)
    return _data_loader(batches, num_workers, read_threads, prefetch_batches)


class EvalLoader:
    """Re-iterable evaluation batches (see :func:`make_eval_loader`)."""

    def __init__(self, loader: grain.DataLoader, num_batches: int, num_samples: int):
        self._loader = loader
        self.num_batches = num_batches
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return iter(self._loader)


def make_eval_loader(source, indices: Sequence[int], *, global_batch_size: int, num_inputs: int,
                     num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                     read_threads: int = 2, prefetch_batches: int = 2) -> EvalLoader:
    """Every record of ``indices`` exactly once, in order; last batch padded and masked.

    Batches: ``images`` uint8 (B/P, N, S, S, 3), ``labels`` int32, ``index`` int32 and
    ``mask`` bool (False on padding). Same global-batch slicing per process as training.
    """
    indices = np.asarray(indices, np.int64)
    _labels_of(source, indices)
    num_batches = math.ceil(len(indices) / global_batch_size)
    sampler = _IndexSampler(num_batches * global_batch_size)
    batches = _GlobalBatchSource(source, sampler, global_batch_size=global_batch_size,
                                 num_inputs=num_inputs, process_index=process_index,
                                 process_count=process_count, record_keys=indices,
                                 num_valid=len(indices))
    return EvalLoader(_data_loader(batches, num_workers, read_threads, prefetch_batches), num_batches,
                      len(indices))


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """Batches per epoch of ``num_train`` draws (the reference keeps the last partial batch)."""
    return math.ceil(num_train / global_batch_size)

