"""Tests of histo_jax.data.pipeline: weighted sampler, resume, process slicing, eval padding."""
import itertools

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from histo_jax.data import pipeline as P


class TinySource:
    """In-memory source with the interface of histo_jax.data.sources (picklable)."""

    def __init__(self, labels, num_scales=3, size=4):
        self.labels = np.asarray(labels, np.int32)
        self.num_ids = np.arange(len(labels)) // 2
        self.filenames = [f"{i // 2}_{i}" for i in range(len(labels))]
        self.scales = tuple(f"high_mag_{s}" for s in (1024, 2048, 512, 256)[:num_scales])
        self.image_size = size
        self._k = num_scales

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        i = int(i)
        # Pixel value encodes (record, scale) so tests can check what was loaded.
        images = np.empty((self._k, self.image_size, self.image_size, 3), np.uint8)
        for k in range(self._k):
            images[k] = (i * 7 + k) % 256
        return {"images": images, "label": np.int32(self.labels[i]), "index": np.int32(i)}


LABELS = np.array([0] * 45 + [1] * 15)  # Imbalanced 3:1.


@pytest.fixture(scope="module")
def source():
    return TinySource(LABELS)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_balanced_class_weights_match_sklearn():
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=LABELS)
    np.testing.assert_allclose(P.balanced_class_weights(LABELS), expected)
    np.testing.assert_allclose(P.balanced_class_weights([1, 1], num_classes=2), [0.0, 1.0])
    with pytest.raises(ValueError, match="unlabelled"):
        P.balanced_class_weights([0, -1])


def test_sampler_deterministic_epochs_and_balanced():
    keys = np.arange(100, 160)
    s = P.WeightedReplacementSampler(LABELS, seed=3, record_keys=keys)
    t = P.WeightedReplacementSampler(LABELS, seed=3, record_keys=keys)
    first = [s[g].record_key for g in range(600)]
    assert first == [t[g].record_key for g in reversed(range(600))][::-1]  # Order-free, pure.
    assert set(first) <= set(keys.tolist())
    # Epoch = len(train) draws: epoch e uses its own draws.
    np.testing.assert_array_equal(np.array(first[60:120]) - 100, s.epoch_draws(1))
    assert not np.array_equal(s.epoch_draws(0), s.epoch_draws(1))
    other = P.WeightedReplacementSampler(LABELS, seed=4, record_keys=keys)
    assert first != [other[g].record_key for g in range(600)]
    # Balanced: ~50 % tumour although 25 % of the records are tumour (600 draws: sd ~2 %).
    tumour = np.mean(LABELS[np.array(first) - 100] == 1)
    assert 0.42 < tumour < 0.58
    bounded = P.WeightedReplacementSampler(LABELS, seed=3, num_epochs=2)
    assert len(bounded) == 120 and len(s) > 10**15
    with pytest.raises(IndexError):
        bounded[120]


def test_train_batches_content(source):
    it = iter(P.make_train_loader(source, np.arange(10, 60), global_batch_size=8, num_inputs=2, seed=0))
    batch = next(it)
    assert batch["images"].shape == (8, 2, 4, 4, 3) and batch["images"].dtype == np.uint8
    assert batch["labels"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert np.all((batch["index"] >= 10) & (batch["index"] < 60))
    np.testing.assert_array_equal(batch["labels"], LABELS[batch["index"]])
    np.testing.assert_array_equal(batch["images"][:, 1, 0, 0, 0], (batch["index"] * 7 + 1) % 256)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_resume_exact(source, num_workers):
    kwargs = dict(global_batch_size=6, num_inputs=3, seed=7)
    it = iter(P.make_train_loader(source, np.arange(60), num_workers=num_workers, **kwargs))
    head = _take(it, 5)
    state = it.get_state()
    tail = _take(it, 12)  # Crosses the epoch boundary (60 draws = 10 batches).
    del it
    resumed = iter(P.make_train_loader(source, np.arange(60), num_workers=num_workers, **kwargs))
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 12), tail)
    # The stream does not depend on the worker count; start_step starts at a global batch.
    _assert_batches_equal(_take(iter(P.make_train_loader(source, np.arange(60), **kwargs)), 17), head + tail)
    started = iter(P.make_train_loader(source, np.arange(60), start_step=5, **kwargs))
    _assert_batches_equal(_take(started, 3), tail[:3])


def test_two_process_slices_concatenate_to_global_batch(source):
    kwargs = dict(global_batch_size=8, num_inputs=2, seed=5)
    whole = _take(iter(P.make_train_loader(source, np.arange(60), **kwargs)), 9)
    parts = [_take(iter(P.make_train_loader(source, np.arange(60), process_index=p, process_count=2,
                                            **kwargs)), 9) for p in (0, 1)]
    for b in range(9):
        for key in whole[b]:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][b][key], parts[1][b][key]]), whole[b][key])
    with pytest.raises(ValueError, match="divisible by the process count"):
        P.make_train_loader(source, np.arange(60), global_batch_size=7, num_inputs=1, seed=0,
                            process_count=2)


@pytest.mark.parametrize("n,batch,processes", [(13, 4, 1), (13, 4, 2), (8, 4, 1), (3, 8, 2)])
def test_eval_covers_every_record_once(source, n, batch, processes):
    indices = np.arange(40, 40 + n)
    per_process = [list(P.make_eval_loader(source, indices, global_batch_size=batch, num_inputs=2,
                                           process_index=p, process_count=processes))
                   for p in range(processes)]
    loader = P.make_eval_loader(source, indices, global_batch_size=batch, num_inputs=2)
    assert len(loader) == -(-n // batch) and all(len(b) == len(loader) for b in per_process)
    seen, masks = [], []
    for step in range(len(loader)):
        for p in range(processes):
            b = per_process[p][step]
            assert b["images"].shape == (batch // processes, 2, 4, 4, 3) and b["mask"].dtype == bool
            seen += b["index"][b["mask"]].tolist()
            masks += b["mask"].tolist()
    assert seen == indices.tolist()  # Every record once, in order.
    assert masks == [True] * n + [False] * (len(loader) * batch - n)
    again = list(loader)  # Re-iterable.
    assert sum(int(b["mask"].sum()) for b in again) == n


def test_eval_with_workers(source):
    loader = P.make_eval_loader(source, np.arange(11), global_batch_size=4, num_inputs=1, num_workers=2)
    batches = list(itertools.islice(iter(loader), 10))
    assert len(batches) == 3
    np.testing.assert_array_equal(np.concatenate([b["index"][b["mask"]] for b in batches]), np.arange(11))


def test_errors_name_the_problem(source):
    with pytest.raises(ValueError, match="out of range"):
        P.make_train_loader(source, [0, 99], global_batch_size=2, num_inputs=1, seed=0)
    with pytest.raises(ValueError, match="scales"):
        next(iter(P.make_train_loader(source, np.arange(60), global_batch_size=2, num_inputs=4, seed=0)))
