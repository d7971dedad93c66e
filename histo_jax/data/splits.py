"""Patient-level (``num_id``) train / val / test splits, as the reference (docs/reference.md §4).

The unique ``num_id`` values are taken in order of FIRST APPEARANCE in the records
(what ``pandas.Series.unique`` returns on the labels table), each one labelled by
its first record. scikit-learn ``train_test_split`` then holds out ``test_size`` of
them as test, stratified, with ``random_state = 42 + run``; the rest is split again
with ``val_size`` as validation (same stratification and random state): 60/20/20
of the ``num_id`` values with the defaults. Records follow their ``num_id``, so no
``num_id`` is ever in two splits.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

SPLIT_NAMES = ("train", "val", "test")


def unique_num_ids(num_ids: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Unique num_ids in order of first appearance, with the label of their first record."""
    first: dict[str, int] = {}
    for num_id, label in zip(num_ids, labels):
        first.setdefault(num_id, int(label))
    return list(first), list(first.values())


def make_splits(num_ids: Sequence[str], labels: Sequence[int], run: int,
                test_size: float = 0.2, val_size: float = 0.25) -> dict[str, np.ndarray]:
    """Returns sorted record indices (int64) for 'train', 'val' and 'test'.

    Raises:
      ValueError: lengths differ, or too few num_ids per class to stratify (the
        scikit-learn message is kept).
    """
    if len(num_ids) != len(labels):
        raise ValueError(f"make_splits: {len(num_ids)} num_ids but {len(labels)} labels")
    ids, id_labels = unique_num_ids(num_ids, labels)
    seed = 42 + int(run)
    trainval_ids, test_ids, trainval_labels, _ = train_test_split(
        ids, id_labels, test_size=test_size, stratify=id_labels, random_state=seed)
    train_ids, val_ids = train_test_split(
        trainval_ids, test_size=val_size, stratify=trainval_labels, random_state=seed)
    which = {i: "train" for i in train_ids}
    which.update({i: "val" for i in val_ids})
    which.update({i: "test" for i in test_ids})
    names = np.asarray([which[n] for n in num_ids])
    splits = {name: np.flatnonzero(names == name).astype(np.int64) for name in SPLIT_NAMES}
    check_no_leakage(splits, num_ids)
    return splits


def check_no_leakage(splits: dict[str, np.ndarray], num_ids: Sequence[str]) -> None:
    """Raises ``AssertionError`` naming the num_ids found in more than one split."""
    owner: dict[str, str] = {}
    shared: set[str] = set()
    for name, idx in splits.items():
        for i in np.asarray(idx).tolist():
            other = owner.setdefault(num_ids[i], name)
            if other != name:
                shared.add(num_ids[i])
    if shared:
        raise AssertionError(f"num_id leakage between splits: {sorted(shared)[:20]} "
                             f"({len(shared)} num_id(s) in more than one split)")


def save_splits(path: str, splits: dict[str, np.ndarray], num_ids: Sequence[str],
                filenames: Sequence[str]) -> None:
    """Writes the splits as JSON: file names, num_ids and indices per split.

    Raises:
      AssertionError: a num_id is in two splits (nothing is written).
    """
    check_no_leakage(splits, num_ids)
    payload = {
        name: {
            "filenames": [filenames[i] for i in np.asarray(idx).tolist()],
            "num_ids": sorted({num_ids[i] for i in np.asarray(idx).tolist()}),
            "indices": np.asarray(idx).tolist(),
        }
        for name, idx in splits.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
