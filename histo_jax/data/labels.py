"""Builds ``labels.csv`` from the class token at the end of the file names (docs/reference.md §1).

The class name of ``<num_id>_<...>_<class>.png`` is its LAST ``_``-separated token
(compared in lower case). The reference map sends ``normal`` to 0 and every tumour
sub-type to 1, and ignores embolus / psammoma / background crops; any other token
is reported as unknown and left out. File names come from the reference scale
folder (the first configured scale); a name missing from another used scale folder
is reported and left out, and names found only in other folders are reported too.
Optional balancing undersamples every class, at random (seeded), to the smallest
class. Nothing is ever deleted or modified; an existing labels file is only
replaced when explicitly asked.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from histo_jax.data.layout import list_images

REFERENCE_CLASS_MAP: dict[str, int] = {
    "normal": 0,
    "pap": 1, "fol": 1, "sol": 1, "pap+fol": 1, "pap+sol": 1, "pap+fol+sol": 1,
    "fol+sol": 1, "skler": 1,
}
REFERENCE_IGNORE: tuple[str, ...] = ("embol", "psamoma", "back", "background")


def class_token(filename: str) -> str:
    """The class name of a file name: its last ``_``-separated token, lower case."""
    stem = filename[:-4] if filename.endswith(".png") else filename
    return stem.rsplit("_", 1)[-1].lower()


def parse_class_map(text: str) -> dict[str, int]:
    """Parses ``'normal=0,pap=1,...'`` into a dict; raises ValueError on bad entries."""
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"class map entry {item!r} is not NAME=INT (e.g. normal=0,pap=1)")
        try:
            out[name.strip().lower()] = int(value)
        except ValueError:
            raise ValueError(f"class map entry {item!r}: {value!r} is not an integer") from None
    if not out:
        raise ValueError(f"empty class map {text!r}; expected NAME=INT,NAME=INT,...")
    return out


@dataclasses.dataclass
class LabelsResult:
    """What ``build_labels`` decided, for reporting."""

    rows: list[tuple[str, int]]
    unknown: dict[str, list[str]]                 # token -> file names
    ignored: dict[str, int]                       # token -> count
    missing_in: dict[str, list[str]]              # scale -> reference names absent there
    extra_in: dict[str, list[str]]                # scale -> names absent from the reference
    class_counts_before: dict[int, int]
    dropped_by_balance: int = 0

    def format(self, max_listed: int = 20) -> str:
        lines = []
        for token, names in sorted(self.unknown.items()):
            lines.append(f"UNKNOWN class '{token}': {len(names)} file(s) left out, e.g. "
                         + ", ".join(names[:3]) + " (add it with --class_map or --ignore)")
        for token, n in sorted(self.ignored.items()):
            lines.append(f"ignored class '{token}': {n} file(s)")
        for what, table in (("missing from", self.missing_in), ("only in (not in the reference)",
                                                                 self.extra_in)):
            for scale, names in table.items():
                lines.append(f"MISMATCH: {len(names)} file(s) {what} {scale}/ (left out): "
                             + ", ".join(f"{n}.png" for n in names[:max_listed])
                             + (f" ... and {len(names) - max_listed} more"
                                if len(names) > max_listed else ""))
        counts = collections.Counter(label for _, label in self.rows)
        lines.append("classes before balancing: " + ", ".join(
            f"{c}: {n}" for c, n in sorted(self.class_counts_before.items())))
        if self.dropped_by_balance:
            lines.append(f"balanced by undersampling: {self.dropped_by_balance} sample(s) dropped")
        lines.append(f"{len(self.rows)} labelled sample(s): " + ", ".join(
            f"{c}: {n}" for c, n in sorted(counts.items())))
        return "\n".join(lines)


def build_labels(data_dir: str, scales: Sequence[str],
                 class_map: Mapping[str, int] | None = None,
                 ignore: Sequence[str] | None = None,
                 balance: bool = False, seed: int = 42) -> LabelsResult:
    """Computes labels from the file names of ``data_dir/scales[0]`` (see module doc).

    Raises:
      FileNotFoundError: the reference scale folder does not exist.
    """
    class_map = {k.lower(): int(v) for k, v in (class_map or REFERENCE_CLASS_MAP).items()}
    ignore_set = {t.lower() for t in (REFERENCE_IGNORE if ignore is None else ignore)}
    ref_dir = os.path.join(data_dir, scales[0])
    if not os.path.isdir(ref_dir):
        raise FileNotFoundError(f"reference scale folder {ref_dir} does not exist; the first "
                                f"scale of --scales ({scales[0]}) gives the file names")
    ref = list_images(ref_dir)
    ref_set = set(ref)
    missing_in: dict[str, list[str]] = {}
    extra_in: dict[str, list[str]] = {}
    others: dict[str, set[str]] = {}
    for scale in scales[1:]:
        folder = os.path.join(data_dir, scale)
        names = set(list_images(folder)) if os.path.isdir(folder) else set()
        others[scale] = names
        if missing := [n for n in ref if n not in names]:
            missing_in[scale] = missing
        if extra := sorted(names - ref_set):
            extra_in[scale] = extra
    unknown: dict[str, list[str]] = collections.defaultdict(list)
    ignored: collections.Counter = collections.Counter()
    rows: list[tuple[str, int]] = []
    for name in ref:
        token = class_token(name)
        if token in ignore_set:
            ignored[token] += 1
        elif token not in class_map:
            unknown[token].append(name)
        elif all(name in others[s] for s in others):
            rows.append((name, class_map[token]))
    before = dict(collections.Counter(label for _, label in rows))
    dropped = 0
    if balance and rows:
        rows, dropped = balance_rows(rows, seed)
    return LabelsResult(rows, dict(unknown), dict(ignored), missing_in, extra_in, before, dropped)


def balance_rows(rows: Sequence[tuple[str, int]], seed: int
                 ) -> tuple[list[tuple[str, int]], int]:
    """Random undersampling of every class to the smallest one; keeps the row order."""
    by_class: dict[int, list[int]] = collections.defaultdict(list)
    for i, (_, label) in enumerate(rows):
        by_class[label].append(i)
    n_min = min(len(v) for v in by_class.values())
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for label in sorted(by_class):
        keep.update(rng.choice(by_class[label], size=n_min, replace=False).tolist())
    kept = [r for i, r in enumerate(rows) if i in keep]
    return kept, len(rows) - len(kept)


def write_labels(path: str, rows: Sequence[tuple[str, int]], overwrite: bool = False) -> None:
    """Writes a ``filename,label`` CSV atomically.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it "
                              f"(or --labels_file to write another file)")
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)
    os.replace(tmp, path)
