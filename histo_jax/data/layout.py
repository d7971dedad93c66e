"""Dataset folder layout: scanning, image decoding and validation.

Layout (docs/reference.md §1)::

    DATA_DIR/
      labels.csv            # columns filename,label (filename without .png)
      high_mag_1024/<num_id>_<rest>.png
      high_mag_2048/...     # the SAME file names in every scale folder
      ...

The scale folders used, and their order (input 0, 1, ...), come from
``data_cfg.scales``; the labels file name from ``data_cfg.labels_file``.
``num_id`` is the file name up to its first ``_`` (the whole name if it has none).
Only ``*.png`` files are considered; other files in a scale folder are ignored.

Validation reports EVERY problem in one pass (each kind listed up to
``MAX_LISTED`` times, all counted), with file names, before any training:

errors (fail):
  missing labels file or columns, labels that are not integers or are outside
  ``[0, num_classes)``, duplicate file names in the labels file, a missing scale
  folder, a labelled sample missing from a used scale folder, unreadable / corrupt /
  truncated images (each image is fully decoded), images that are not 8-bit RGB
  (see below), crops that are not square, crops whose size differs from the most
  common size of their scale folder, an empty dataset, a class with too few
  ``num_id`` values for a stratified train/val/test split.
warnings (reported, do not fail):
  image files with no label (ignored), label file names given with a ``.png``
  suffix (suffix stripped), images converted to RGB (below), ``num_id`` values
  whose samples carry different labels (splits stratify on the first one).

Image mode policy: 8-bit RGB is required. Two lossless cases are converted to RGB
with a warning: palette images (mode ``P``) without transparency and RGBA images
whose alpha channel is fully opaque. Everything else is refused as an error:
grayscale (``L``, ``LA``, ``1``), 16-bit or float images (any PNG with bit depth 16,
modes ``I``, ``I;16``, ``F``), CMYK, and images with real transparency — converting
those would silently change what the model sees.

With ``on_bad_sample='error'`` (default) any error fails. With
``on_bad_sample='skip'`` samples with a per-sample error are excluded, each one
listed with its reasons and counted; dataset-level errors still fail. Bad data is
never replaced by another sample, and no user file is ever modified or deleted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import os
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageFile  # noqa: F401 - ImageFile: see below
from tqdm import tqdm

from histo_jax.data.splits import make_splits

# PIL imports its plugins and helpers (ImageFile, PngImagePlugin, ...) on first use, from
# whichever thread gets there first; done here, at import time (tests/test_threads.py).
Image.init()

MAX_LISTED = 20
IMAGE_SUFFIX = ".png"

# kind -> (severity, title, per_sample). Per-sample errors can be skipped.
ISSUE_KINDS: dict[str, tuple[str, str, bool]] = {
    "missing_labels_file": ("error", "Labels file missing", False),
    "labels_format": ("error", "Labels file unreadable or without the required columns", False),
    "bad_label": ("error", "Label not an integer class", True),
    "duplicate_filename": ("error", "Duplicate file name in the labels file", True),
    "missing_data_dir": ("error", "Data folder missing", False),
    "missing_scale_folder": ("error", "Scale folder missing", False),
    "missing_file": ("error", "Labelled sample missing from a scale folder", True),
    "unreadable_image": ("error", "Unreadable, corrupt or truncated image", True),
    "unsupported_mode": ("error", "Image is not 8-bit RGB", True),
    "not_square": ("error", "Crop is not square", True),
    "size_mismatch": ("error", "Crop size differs from the rest of its scale folder", True),
    "empty_dataset": ("error", "Empty dataset", False),
    "too_few_num_ids": ("error", "Too few num_ids to stratify into train/val/test", False),
    "unlabelled_file": ("warning", "Image without a label (ignored)", False),
    "png_suffix_in_labels": ("warning", "Label file name with .png suffix (stripped)", False),
    "converted_mode": ("warning", "Image converted to RGB", False),
    "mixed_label_num_id": ("warning", "num_id with samples of different labels", False),
}


class DataValidationError(ValueError):
    """Raised when a dataset fails validation; ``str()`` is the full report."""

    def __init__(self, report: "ValidationReport"):
        self.report = report
        super().__init__(report.format())


class BadImageError(ValueError):
    """An image file that cannot be used (unreadable, truncated or not 8-bit RGB)."""

    def __init__(self, path: str, reason: str, kind: str = "unreadable_image"):
        self.path, self.reason, self.kind = path, reason, kind
        super().__init__(f"{path}: {reason}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One tissue location: its file name (no extension), num_id and label (-1: none)."""

    filename: str
    num_id: str
    label: int


@dataclasses.dataclass(frozen=True)
class Issue:
    """One problem found. ``filename`` names the sample for per-sample kinds."""

    kind: str
    message: str
    filename: str | None = None
    scale: str | None = None

    @property
    def severity(self) -> str:
        return ISSUE_KINDS[self.kind][0]


@dataclasses.dataclass
class ValidationReport:
    """Result of scanning / validating a data folder.

    ``samples`` are the usable samples in labels-file order (after skipping, when
    ``on_bad_sample='skip'``); ``skipped`` maps each skipped file name to its reasons.
    """

    data_dir: str
    scales: tuple[str, ...]
    labels_file: str
    on_bad_sample: str = "error"
    decoded: bool = False
    samples: list[Sample] = dataclasses.field(default_factory=list)
    issues: list[Issue] = dataclasses.field(default_factory=list)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    num_candidates: int = 0
    class_names: tuple[str, ...] = ()

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def kinds(self, severity: str | None = None) -> set[str]:
        return {i.kind for i in self.issues if severity is None or i.severity == severity}

    def raise_if_errors(self) -> None:
        if not self.ok:
            raise DataValidationError(self)

    def format(self, max_listed: int = MAX_LISTED) -> str:
        """Human-readable report: problems by kind (capped listing), skips, summary."""
        lines = [
            f"Data validation of {self.data_dir}",
            f"  scales (input order): {', '.join(self.scales)}; labels file: {self.labels_file}; "
            f"images {'decoded' if self.decoded else 'not decoded (structure only)'}",
        ]
        for severity in ("error", "warning"):
            issues = [i for i in self.issues if i.severity == severity]
            if not issues:
                continue
            by_kind: dict[str, list[Issue]] = collections.defaultdict(list)
            for issue in issues:
                by_kind[issue.kind].append(issue)
            lines.append(f"{severity.upper()}S: {len(issues)} in {len(by_kind)} kind(s)")
            for kind, items in by_kind.items():
                lines.append(f"  [{kind}] {ISSUE_KINDS[kind][1]}: {len(items)}")
                lines += [f"    - {i.message}" for i in items[:max_listed]]
                if len(items) > max_listed:
                    lines.append(f"    ... and {len(items) - max_listed} more")
        if self.skipped:
            lines.append(f"SKIPPED (on_bad_sample='skip'): {len(self.skipped)} sample(s)")
            for name, reasons in list(self.skipped.items())[:max_listed]:
                lines.append(f"    - {name}: {', '.join(reasons)}")
            if len(self.skipped) > max_listed:
                lines.append(f"    ... and {len(self.skipped) - max_listed} more")
        counts = collections.Counter(s.label for s in self.samples)
        ids = _num_ids_per_class(self.samples)
        per_class = ", ".join(
            f"{self._class_name(c)}: {counts[c]} samples / {len(ids[c])} num_ids"
            for c in sorted(counts))
        lines.append(
            f"SUMMARY: {self.num_candidates} candidate sample(s), {len(self.samples)} usable, "
            f"{len(self.skipped)} skipped, {len(self.errors)} error(s), "
            f"{len(self.warnings)} warning(s)" + (f"; {per_class}" if per_class else ""))
        if self.ok:
            lines.append("RESULT: OK" + (" (with warnings)" if self.warnings else ""))
        else:
            lines.append("RESULT: FAILED — fix the files listed above, or pass "
                         "on_bad_sample='skip' (--on_bad_sample=skip) to exclude bad samples "
                         "explicitly (dataset-level errors cannot be skipped).")
        return "\n".join(lines)

    def _class_name(self, c: int) -> str:
        if c < 0:
            return "unlabelled"
        return f"{c} ({self.class_names[c]})" if c < len(self.class_names) else str(c)


def num_id_of(filename: str) -> str:
    """The sample's num_id: the file name up to its first ``_``."""
    return filename.split("_", 1)[0]


def _num_ids_per_class(samples: Iterable[Sample]) -> dict[int, set[str]]:
    ids: dict[int, set[str]] = collections.defaultdict(set)
    for s in samples:
        ids[s.label].add(s.num_id)
    return ids


# ----------------------------------------------------------------------------- images

def _png_bit_depth(path: str) -> int | None:
    """Bit depth from a PNG IHDR chunk (Pillow silently reduces 16-bit RGB to 8)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _open_rgb(path: str) -> tuple[Image.Image, str | None]:
    """Fully decodes ``path`` as 8-bit RGB; returns (image, conversion warning or None).

    Raises:
      BadImageError: unreadable / truncated file, or a mode refused by the policy of
        the module docstring.
    """
    try:
        depth = _png_bit_depth(path)
        with Image.open(path) as im:
            im.load()  # Full decode: catches truncation that verify() misses.
            mode = im.mode
            if depth is not None and depth > 8:
                raise BadImageError(path, f"{depth}-bit PNG (mode {mode}); 8-bit RGB is required",
                                    "unsupported_mode")
            if mode == "RGB":
                return im.copy(), None
            if mode == "P" and "transparency" not in im.info:
                return im.convert("RGB"), "palette image converted to RGB"
            if mode == "RGBA":
                alpha_min, _ = im.getchannel("A").getextrema()
                if alpha_min == 255:
                    return im.convert("RGB"), "RGBA image with opaque alpha converted to RGB"
                raise BadImageError(path, "RGBA image with transparency; 8-bit RGB is required",
                                    "unsupported_mode")
            raise BadImageError(path, f"mode {mode}" + (" with transparency" if mode == "P" else "")
                                + "; 8-bit RGB is required (re-export the crop as RGB)",
                                "unsupported_mode")
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from e


def load_rgb(path: str) -> np.ndarray:
    """Decodes an image file as a uint8 (H, W, 3) array (policy: module docstring)."""
    im, _ = _open_rgb(path)
    return np.asarray(im, dtype=np.uint8)


def resize_rgb(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize to (size, size) with PIL; uint8 (size, size, 3)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def load_resized(path: str, size: int) -> np.ndarray:
    """Decodes ``path`` as RGB and resizes it to (size, size, 3) uint8."""
    im, _ = _open_rgb(path)
    return resize_rgb(im, size)


T = TypeVar("T")
R = TypeVar("R")


def ordered_imap(fn: Callable[[T], R], items: Iterable[T], num_workers: int,
                 window: int | None = None) -> Iterator[R]:
    """Maps ``fn`` over ``items`` in a thread pool, in order, with a bounded queue."""
    num_workers = max(1, int(num_workers))
    window = window or 4 * num_workers
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------- scanning

def _cfg_get(data_cfg, name: str, default):
    return data_cfg.get(name, default) if hasattr(data_cfg, "get") else getattr(
        data_cfg, name, default)


def list_images(folder: str) -> list[str]:
    """Sorted file names (without ``.png``) of the PNG images in ``folder``."""
    return sorted(e.name[: -len(IMAGE_SUFFIX)] for e in os.scandir(folder)
                  if e.is_file() and e.name.endswith(IMAGE_SUFFIX))


def read_labels_file(path: str, num_classes: int) -> tuple[list[tuple[str, int]], list[Issue]]:
    """Parses a ``filename,label`` CSV. Returns (rows with valid labels, issues).

    Rows whose label is invalid are reported (``bad_label``) and returned with label
    -1 so that they can be skipped explicitly; ``path`` must exist.
    """
    name = os.path.basename(path)
    issues: list[Issue] = []
    rows: list[tuple[str, int]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("filename", "label") if c not in fields]
            if missing:
                return [], [Issue("labels_format",
                                  f"{name}: missing column(s) {', '.join(missing)} (found: "
                                  f"{', '.join(fields) or 'nothing'}); the header must be "
                                  f"'filename,label'")]
            reader.fieldnames = fields
            for line_no, row in enumerate(reader, start=2):
                filename = (row.get("filename") or "").strip()
                raw = (row.get("label") or "").strip()
                if not filename and not raw:
                    continue
                if filename.endswith(IMAGE_SUFFIX):
                    issues.append(Issue("png_suffix_in_labels",
                                        f"{name} line {line_no}: '{filename}' -> '{filename[:-4]}'",
                                        filename[:-4]))
                    filename = filename[: -len(IMAGE_SUFFIX)]
                if not filename:
                    issues.append(Issue("labels_format", f"{name} line {line_no}: empty filename"))
                    continue
                try:
                    label = int(raw)
                except ValueError:
                    issues.append(Issue("bad_label", f"{name} line {line_no}: '{filename}' has "
                                        f"label '{raw}', not an integer", filename))
                    rows.append((filename, -1))
                    continue
                if not 0 <= label < num_classes:
                    issues.append(Issue("bad_label", f"{name} line {line_no}: '{filename}' has "
                                        f"label {label}, outside the classes "
                                        f"0..{num_classes - 1}", filename))
                    rows.append((filename, -1))
                    continue
                rows.append((filename, label))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], [Issue("labels_format", f"{name}: cannot read ({type(e).__name__}: {e})")]
    return rows, issues


def scan_folder(data_cfg, data_dir: str | None = None, require_labels: bool = True
                ) -> ValidationReport:
    """Structural scan of a data folder (no image decoding) -> report with samples.

    With ``require_labels=True`` samples are the labelled rows of the labels file.
    With ``require_labels=False`` (prediction) they are the images of the first scale
    folder; labels are taken from the labels file when it exists, else -1. The skip
    policy ``data_cfg.on_bad_sample`` is applied. Use ``report.raise_if_errors()``.
    """
    report = _scan(data_cfg, data_dir, require_labels)
    _apply_skip_policy(report, data_cfg, require_labels)
    return report


def _scan(data_cfg, data_dir: str | None, require_labels: bool) -> ValidationReport:
    """Structural checks only; the skip policy is not applied yet."""
    data_dir = os.fspath(data_dir if data_dir is not None else data_cfg.dir)
    if not data_dir:
        raise ValueError("data_cfg.dir is empty: give the dataset folder (--data_dir / "
                         "--config.data.dir).")
    scales = tuple(data_cfg.scales)
    labels_name = data_cfg.labels_file
    num_classes = int(data_cfg.num_classes)
    on_bad = _cfg_get(data_cfg, "on_bad_sample", "error")
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad!r}")
    report = ValidationReport(data_dir=data_dir, scales=scales, labels_file=labels_name,
                              on_bad_sample=on_bad,
                              class_names=tuple(_cfg_get(data_cfg, "class_names", ())))
    if not os.path.isdir(data_dir):
        report.issues.append(Issue("missing_data_dir", f"{data_dir}: data folder does not exist"))
        return report
    if not scales:
        raise ValueError("data_cfg.scales is empty: name at least one scale folder.")
    present: dict[str, set[str]] = {}
    for scale in scales:
        folder = os.path.join(data_dir, scale)
        if os.path.isdir(folder):
            present[scale] = set(list_images(folder))
        else:
            found = sorted(d for d in os.listdir(data_dir)
                           if os.path.isdir(os.path.join(data_dir, d)))
            report.issues.append(Issue(
                "missing_scale_folder", f"{scale}/: folder missing in {data_dir} (found folders: "
                f"{', '.join(found) or 'none'}); set data.scales to the folders you have",
                scale=scale))

    labels_path = os.path.join(data_dir, labels_name)
    rows: list[tuple[str, int]] | None = None
    if os.path.isfile(labels_path):
        rows, issues = read_labels_file(labels_path, num_classes)
        report.issues += issues
    elif require_labels:
        report.issues.append(Issue(
            "missing_labels_file", f"{labels_name}: not found in {data_dir}; create it with "
            f"'python -m histo_jax.data labels --data_dir {data_dir}' or set data.labels_file"))

    if rows is not None:
        counts = collections.Counter(f for f, _ in rows)
        seen: set[str] = set()
        unique_rows = []
        for filename, label in rows:
            if filename in seen:
                continue
            seen.add(filename)
            if counts[filename] > 1:
                report.issues.append(Issue("duplicate_filename", f"{labels_name}: '{filename}' "
                                           f"appears {counts[filename]} times", filename))
            unique_rows.append((filename, label))
        labelled = {f: lab for f, lab in unique_rows}
    else:
        labelled = {}

    if require_labels:
        names = [f for f, _ in unique_rows] if rows is not None else []
    else:
        ref = present.get(scales[0], set())
        names = sorted(ref)
    report.num_candidates = len(names)
    for scale in scales:
        if scale not in present:
            continue
        for filename in names:
            if filename not in present[scale]:
                where = f" is labelled in {labels_name}" if filename in labelled else ""
                report.issues.append(Issue(
                    "missing_file", f"{scale}/{filename}{IMAGE_SUFFIX}: missing (sample "
                    f"'{filename}'{where})", filename, scale))
    if require_labels:
        unlabelled: dict[str, list[str]] = collections.defaultdict(list)
        for scale in scales:
            for filename in sorted(present.get(scale, ())):
                if filename not in labelled:
                    unlabelled[filename].append(scale)
        for filename, in_scales in unlabelled.items():
            report.issues.append(Issue(
                "unlabelled_file", f"{filename}{IMAGE_SUFFIX} (in {', '.join(in_scales)}): "
                f"no label in {labels_name}, ignored", filename))
    report.samples = [Sample(f, num_id_of(f), labelled.get(f, -1)) for f in names]
    return report


def _apply_skip_policy(report: ValidationReport, data_cfg, require_labels: bool) -> None:
    """Moves per-sample errors to ``skipped`` (skip mode), then dataset-level checks."""
    if report.on_bad_sample == "skip":
        per_sample = [i for i in report.errors if ISSUE_KINDS[i.kind][2] and i.filename]
        for issue in per_sample:
            reasons = report.skipped.setdefault(issue.filename, [])
            if issue.kind not in reasons:
                reasons.append(issue.kind)
        report.issues = [i for i in report.issues if i not in per_sample]
        report.samples = [s for s in report.samples if s.filename not in report.skipped]
    if require_labels and not (report.kinds("error") & {"missing_labels_file", "labels_format"}):
        _check_dataset_level(report, data_cfg)


def _check_dataset_level(report: ValidationReport, data_cfg) -> None:
    samples = [s for s in report.samples if s.label >= 0]
    if not samples:
        report.issues.append(Issue("empty_dataset", f"no usable labelled sample in "
                                   f"{report.data_dir} ({report.num_candidates} candidate(s))"))
        return
    first_label: dict[str, int] = {}
    labels_of: dict[str, set[int]] = collections.defaultdict(set)
    for s in samples:
        first_label.setdefault(s.num_id, s.label)
        labels_of[s.num_id].add(s.label)
    for num_id, labs in labels_of.items():
        if len(labs) > 1:
            report.issues.append(Issue("mixed_label_num_id", f"num_id '{num_id}' has labels "
                                       f"{sorted(labs)}; splits stratify on its first row "
                                       f"(label {first_label[num_id]})"))
    per_class = collections.Counter(first_label.values())
    num_classes = int(data_cfg.num_classes)
    too_few = False
    for c in range(num_classes):
        if per_class[c] < 3:
            too_few = True
            report.issues.append(Issue(
                "too_few_num_ids", f"class {report._class_name(c)} has {per_class[c]} distinct "
                f"num_id(s) (by first row); stratified train/val/test splits on num_id need at "
                f"least 3 per class"))
    if too_few:
        return
    ids = list(first_label)
    labs = [first_label[i] for i in ids]
    test_size = float(_cfg_get(data_cfg, "test_size", 0.2))
    val_size = float(_cfg_get(data_cfg, "val_size", 0.25))
    for run in range(5):
        try:
            make_splits(ids, labs, run, test_size=test_size, val_size=val_size)
        except ValueError as e:
            counts = ", ".join(f"{report._class_name(c)}: {per_class[c]}"
                               for c in sorted(per_class))
            report.issues.append(Issue(
                "too_few_num_ids", f"stratified split (test_size={test_size}, val_size={val_size}, "
                f"run {run}) impossible with num_ids per class {{{counts}}}: {e}"))
            return


def _check_one(args: tuple[str, str, str, int | None]) -> tuple:
    """Decodes one file -> (scale, filename, size or None, issue or None, resized or None)."""
    data_dir, scale, filename, resize_to = args
    rel = f"{scale}/{filename}{IMAGE_SUFFIX}"
    try:
        im, warning = _open_rgb(os.path.join(data_dir, rel))
    except BadImageError as e:
        return scale, filename, None, Issue(e.kind, f"{rel}: {e.reason}", filename), None
    size = im.size
    if size[0] != size[1]:
        return scale, filename, size, Issue(
            "not_square", f"{rel}: {size[0]}x{size[1]} px is not square (it would be distorted "
            f"by the square resize)", filename), None
    resized = resize_rgb(im, resize_to) if resize_to else None
    issue = Issue("converted_mode", f"{rel}: {warning}", filename) if warning else None
    return scale, filename, size, issue, resized


def validate_dataset(data_cfg, data_dir: str | None = None, *, require_labels: bool = True,
                     decode: bool = True, progress: bool = False,
                     on_resized: Callable[[str, int, np.ndarray], None] | None = None
                     ) -> ValidationReport:
    """Full validation: structural scan, then (``decode``) every used image decoded.

    Images are decoded in a thread pool of ``data_cfg.num_workers`` threads. The skip
    policy of ``data_cfg.on_bad_sample`` is applied last. Never raises for bad data:
    inspect ``report.ok`` or call ``report.raise_if_errors()``.

    ``on_resized(filename, scale_position, image)``, when given, receives every good
    crop resized to ``data_cfg.image_size``, so that preparation decodes each file once.
    """
    report = _scan(data_cfg, data_dir, require_labels)
    if decode:
        report.decoded = True
        missing = {(i.filename, i.scale) for i in report.issues if i.kind == "missing_file"}
        missing_scales = {i.scale for i in report.issues if i.kind == "missing_scale_folder"}
        resize_to = int(data_cfg.image_size) if on_resized is not None else None
        scale_position = {scale: k for k, scale in enumerate(report.scales)}
        jobs = [(report.data_dir, scale, s.filename, resize_to)
                for s in report.samples for scale in report.scales
                if scale not in missing_scales and (s.filename, scale) not in missing]
        results = ordered_imap(_check_one, jobs, _cfg_get(data_cfg, "num_workers", 2))
        if progress:
            results = tqdm(results, total=len(jobs), desc="validating images", unit="img")
        sizes: dict[str, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
        for scale, filename, size, issue, resized in results:
            if issue is not None:
                report.issues.append(issue)
            if resized is not None:
                on_resized(filename, scale_position[scale], resized)
            if size is not None and size[0] == size[1]:
                sizes[scale][filename] = size
        for scale in report.scales:
            common = collections.Counter(sizes[scale].values()).most_common(1)
            if not common:
                continue
            ref = common[0][0]
            for filename, size in sizes[scale].items():
                if size != ref:
                    report.issues.append(Issue(
                        "size_mismatch", f"{scale}/{filename}{IMAGE_SUFFIX}: "
                        f"{size[0]}x{size[1]} px, while most crops of {scale} are "
                        f"{ref[0]}x{ref[1]} px", filename))
    _apply_skip_policy(report, data_cfg, require_labels)
    return report
