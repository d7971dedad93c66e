"""Patient-level splits: equal to a direct scikit-learn computation, leakage-free."""
import json

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from histo_jax.data import splits


def _records(num_groups=30, seed=0):
    """Records in a shuffled, non-sorted num_id order, 1..3 records per num_id."""
    rng = np.random.default_rng(seed)
    ids = [str(i) for i in rng.permutation(np.arange(100, 100 + num_groups))]
    num_ids, labels = [], []
    for k, num_id in enumerate(ids):
        for _ in range(1 + k % 3):
            num_ids.append(num_id)
            labels.append(int(int(num_id) % 3 == 0))
    order = rng.permutation(len(num_ids))
    return [num_ids[i] for i in order], [labels[i] for i in order]


@pytest.mark.parametrize("run", [0, 3])
def test_equal_to_direct_sklearn(run):
    num_ids, labels = _records()
    got = splits.make_splits(num_ids, labels, run)
    # Direct computation: unique num_ids in order of first appearance, first-row label.
    uniq, first = [], {}
    for n, lab in zip(num_ids, labels):
        if n not in first:
            first[n] = lab
            uniq.append(n)
    ul = [first[n] for n in uniq]
    tv, test, tvl, _ = train_test_split(uniq, ul, test_size=0.2, stratify=ul,
                                        random_state=42 + run)
    train, val = train_test_split(tv, test_size=0.25, stratify=tvl, random_state=42 + run)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        expected = [i for i, n in enumerate(num_ids) if n in set(ids)]
        np.testing.assert_array_equal(got[name], expected)


def test_partition_leakage_free_and_sorted():
    num_ids, labels = _records()
    got = splits.make_splits(num_ids, labels, run=1)
    all_idx = np.concatenate([got[k] for k in splits.SPLIT_NAMES])
    assert sorted(all_idx.tolist()) == list(range(len(num_ids)))
    groups = {k: {num_ids[i] for i in got[k]} for k in got}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    for k in got:
        assert np.all(np.diff(got[k]) > 0)
    n = len(set(num_ids))
    assert (len(groups["train"]), len(groups["val"]), len(groups["test"])) == (18, 6, 6) == (
        round(0.6 * n), round(0.2 * n), round(0.2 * n))
    # Stratified by num_id label: each split has both classes.
    for k in got:
        assert set(np.asarray(labels)[got[k]]) == {0, 1}


def test_runs_differ_and_are_deterministic():
    num_ids, labels = _records()
    a = splits.make_splits(num_ids, labels, 0)
    b = splits.make_splits(num_ids, labels, 0)
    c = splits.make_splits(num_ids, labels, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_first_row_label_is_used():
    num_ids = ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    uniq, first = splits.unique_num_ids(num_ids, labels)
    assert uniq[0] == "a" and first[0] == 0 and len(uniq) == 10


def test_too_few_ids_raises_value_error():
    with pytest.raises(ValueError):
        splits.make_splits(["a", "b", "c", "d"], [0, 0, 0, 1], 0)


def test_save_splits_json_and_leakage_assertion(tmp_path):
    num_ids, labels = _records()
    names = [f"{n}_{i}_x" for i, n in enumerate(num_ids)]
    got = splits.make_splits(num_ids, labels, 0)
    path = tmp_path / "out" / "splits.json"
    splits.save_splits(str(path), got, num_ids, names)
    data = json.loads(path.read_text())
    assert data["test"]["filenames"] == [names[i] for i in got["test"]]
    assert data["val"]["indices"] == got["val"].tolist()
    leaky = dict(got, test=np.concatenate([got["test"], got["train"][:1]]))
    with pytest.raises(AssertionError, match="leakage"):
        splits.save_splits(str(tmp_path / "bad.json"), leaky, num_ids, names)
    assert not (tmp_path / "bad.json").exists()
