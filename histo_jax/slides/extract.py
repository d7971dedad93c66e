"""Nested multi-field-of-view crops from whole slides, in the layout of docs/reference.md §1.

``extract(slides, out_dir, ExtractConfig(...))`` (``python -m histo_jax.data extract``):
for every slide, detect tissue, choose locations (``locate.py``: tissue grid, points, or
annotated regions), read every field of view around each location from the pyramid level
that fits it (``reader.Slide.read_field``) and write::

    OUT/high_mag_<F>/<num_id>_x<X>_y<Y>.png   (or fov_<U>um/ for --fovs_um)
    OUT/labels.csv       filename,label   when labels are known
    OUT/locations.csv    filename,slide,num_id,x,y,label,mpp,tissue_fraction,padded,level_<folder>...
    OUT/thumbnails/<slide>.png   tissue outline and kept locations, to check at a glance
    OUT/extract.json     the settings and per-slide counts (makes reruns safe)

File names: ``num_id`` is the slide name, or its patient (``--patients``), with ``_`` and
path characters replaced by ``-`` (``num_id`` ends at the first ``_``); the slide name
follows when it differs from ``num_id``; ``x``, ``y`` are the level-0 centre. labels.csv
lists each num_id's rows highest label first, so the splits (stratified on each
num_id's first row, docs/reference.md §4) stratify on whether a slide / patient holds that class.

Stored size: ``size=None`` (default) keeps the layout's convention, every crop at level-0
resolution (F px for a field of F px). ``size=N`` stores every field at N px, read from
the coarsest pyramid level not coarser than F / N: far fewer pixels read, decoded and
written, at the price of fixing the resolution (train at ``image_size <= N``).

Safety: files are written atomically; rerunning skips crops already there (and
rewrites only the CSVs, thumbnails and manifest it wrote itself); a folder that holds
anything but a previous extraction with the same settings is refused. Nothing is ever
deleted.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from histo_jax.data.layout import ordered_imap
from histo_jax.errors import WriteFailedError, failure_reason, is_write_failure, writing
from histo_jax.slides import annotations as ann_lib
from histo_jax.slides import geometry, pictures
from histo_jax.slides.locate import BORDER_CHOICES, fov_pixels, locate
from histo_jax.slides.reader import (InputError, IsolatedProbe, SlideError, check_unique_names,
                                     find_slides, open_slide)
from histo_jax.slides.tissue import TissueParams
from histo_jax.stain.normalize import StainNormalizer, apply_uint8, load as load_stain

MANIFEST = "extract.json"
LOCATIONS = "locations.csv"
THUMBNAILS = "thumbnails"
PNG_COMPRESS_LEVEL = 1  # Fast; 6 (PIL's default) saves ~15 % disk at ~4x the encode time.


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how (see the module docstring and ``locate.py``)."""

    fovs: tuple[geometry.FieldOfView, ...] = geometry.parse_fovs(geometry.REFERENCE_FOVS)
    size: int | None = None
    stride: int | None = None
    min_tissue: float | None = None
    border: str = "skip"
    tissue: TissueParams = TissueParams()
    mpp: float | None = None
    pyramid: bool = True
    points: str | None = None
    annotations: str | None = None
    class_map: tuple[tuple[str, int | None], ...] = ()
    outside_label: int | None = None
    patients: str | None = None
    labels_file: str = "labels.csv"
    workers: int = 4
    stain: str | None = None  # a fitted stain.json: crops are written normalised
    # Each slide is first opened and sampled in a separate process (reader.IsolatedProbe):
    # a file that crashes OpenSlide costs that slide, not the extraction.
    isolate: bool = True

    def __post_init__(self):
        if self.border not in BORDER_CHOICES:
            raise ValueError(f"border must be one of {BORDER_CHOICES}, got {self.border!r}")
        if self.points and self.annotations:
            raise ValueError("give --points or --annotations, not both")
        if self.size is not None and self.size < 1:
            raise ValueError(f"the stored size must be a positive number of px, got {self.size}")
        if self.min_tissue is not None and not 0 <= self.min_tissue <= 1:
            raise ValueError(f"min_tissue is a fraction in [0, 1], got {self.min_tissue}")
        units = {f.unit for f in self.fovs}
        if len(units) != 1:
            raise ValueError("fields of view must all be in pixels or all in micrometres")

    @property
    def mode(self) -> str:
        return "points" if self.points else ("annotations" if self.annotations else "grid")

    def settings(self) -> dict:
        """What determines the crops and their locations (compared on reruns)."""
        return {"fovs": [[f.size, f.unit] for f in self.fovs], "size": self.size,
                "stride": self.stride, "min_tissue": self.min_tissue, "border": self.border,
                "tissue": self.tissue.to_dict(), "mpp": self.mpp, "pyramid": self.pyramid,
                "mode": self.mode, "class_map": [list(c) for c in self.class_map],
                "outside_label": self.outside_label, "patients": bool(self.patients),
                "labels_file": self.labels_file, **self._stain_setting()}

    def _stain_setting(self) -> dict:
        if not self.stain:
            return {}  # (absent, so extractions made before stain handling still match)
        return {"stain": load_stain(self.stain).fingerprint()}

    def normalizer(self):
        """The numpy stain normaliser of ``stain`` (None without one)."""
        return StainNormalizer(load_stain(self.stain)) if self.stain else None


@dataclasses.dataclass
class ExtractResult:
    out_dir: str
    slides: dict[str, dict]
    failures: list[tuple[str, str]]
    scales: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = []
        total = {k: sum(s[k] for s in self.slides.values()) for k in ("locations", "written", "existing")}
        for name, s in self.slides.items():
            drops = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["dropped"].items() if v)
            lab = ", ".join(f"label {k}: {v}" for k, v in sorted(s["label_counts"].items()))
            lines.append(f"  {name}: {s['locations']} locations ({lab or 'unlabelled'}); "
                         f"{s['padded']} padded at the border" + (f"; dropped: {drops}" if drops else ""))
        head = (f"Extracted {len(self.slides)} slide(s) into {self.out_dir} in {self.seconds:.1f} s: "
                f"{total['locations']} locations, {total['written']} crops written, "
                f"{total['existing']} already there (skipped)")
        lines.insert(0, head)
        if self.failures:
            lines.append(f"FAILED: {len(self.failures)} slide(s) or input file(s):")
            lines += [f"  {p}: {r}" for p, r in self.failures]
        return "\n".join(lines)


def _check_out_dir(out_dir: str, settings: dict) -> dict | None:
    """The previous manifest (same settings) or None for a new / empty folder; refuses a
    folder holding anything else."""
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{manifest}: unreadable ({e}); extract into a new folder") from None
        old = previous.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out_dir} holds an extraction with other settings ({detail}); "
                             "extract into a new folder (--out), or rerun with the same options "
                             "to resume it")
        return previous
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty and holds no {MANIFEST}: extract into a new "
                              "or empty folder (nothing there is overwritten or deleted)")
    return None


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_png(path: str, crop: np.ndarray) -> None:
    tmp = path + ".tmp"
    Image.fromarray(crop).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    os.replace(tmp, path)


def sample_names(num_id: str, slide_token: str, xy: np.ndarray) -> list[str]:
    stem = num_id if num_id == slide_token else f"{num_id}_{slide_token}"
    return [f"{stem}_x{int(x)}_y{int(y)}" for x, y in np.asarray(xy).reshape(-1, 2)]


def extract(slide_paths: Sequence[str], out_dir: str, cfg: ExtractConfig, *, progress: bool = True,
            log: Callable[[str], None] = print) -> ExtractResult:
    """Extracts every slide (module docstring). Bad slides and bad per-slide inputs are
    reported in ``result.failures`` and do not stop the others; problems with the
    command's own inputs (points / patients CSV, output folder) raise."""
    start = time.time()
    paths, failures = find_slides(slide_paths)
    failures = [(e.path, e.reason) for e in failures]
    check_unique_names(paths)
    points = ann_lib.read_points(cfg.points) if cfg.points else None
    patients = ann_lib.read_patients(cfg.patients) if cfg.patients else None
    if cfg.annotations and not os.path.isdir(cfg.annotations):
        raise FileNotFoundError(f"{cfg.annotations}: annotations folder not found")
    if points is not None:
        names = {os.path.splitext(os.path.basename(p))[0] for p in paths}
        unknown = sorted(set(points) - names)
        if unknown:
            failures.append((cfg.points, f"points given for slide(s) not among the slides: "
                             f"{', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else "")))
    settings = cfg.settings()
    previous = _check_out_dir(out_dir, settings)
    folders = tuple(f.folder for f in cfg.fovs)
    stored = dict((previous or {}).get("stored_sizes", {}))
    for d in folders + (THUMBNAILS,):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    rows_by_slide: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = dict((previous or {}).get("slides", {}))
    class_map = dict(cfg.class_map) or ann_lib.parse_class_map(ann_lib.DEFAULT_CLASS_MAP)
    normalizer = cfg.normalizer()

    def finish():  # the tables and the manifest of the slides extracted so far
        _write_tables(out_dir, cfg, rows_by_slide, previous is not None)
        manifest = {"histo_jax_extract": 1, "settings": settings, "stored_sizes": stored,
                    "stain": ({"file": os.path.abspath(cfg.stain),
                               **load_stain(cfg.stain).params()} if cfg.stain else None),
                    "slides": summaries, "failures": [list(f) for f in failures]}
        _atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2))

    probe = IsolatedProbe() if cfg.isolate else None
    try:
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            reason = probe(path) if probe is not None else None
            if reason is not None:
                failures.append((path, reason))
                log(f"FAILED {path}: {reason}")
                continue
            try:
                rows, summary = _extract_slide(path, out_dir, cfg, folders, stored, points,
                                               patients, class_map, progress, normalizer)
            except InputError as e:
                failures.append((e.path, e.reason))
                log(f"FAILED {e}")
                continue
            except Exception as e:
                if not is_write_failure(e):
                    raise
                kept = _kept_after_failure(finish, out_dir, rows_by_slide)
                raise WriteFailedError(f"Could not write the crops of slide {name} ({out_dir}): "
                                       f"{failure_reason(e)}. {kept}") from e
            rows_by_slide[name] = rows
            summaries[name] = summary
    finally:
        if probe is not None:
            probe.close()
    with writing("the extraction's tables", out_dir,
                 kept="The crops written are kept; once the problem is fixed, the same command "
                      "finishes the extraction (crops on disk are not read again)."):
        finish()
    done = {k: v for k, v in summaries.items() if k in rows_by_slide}
    return ExtractResult(out_dir, done, failures, folders, time.time() - start)


def _kept_after_failure(finish: Callable[[], None], out_dir: str, done: dict) -> str:
    """After a failed crop write: records the finished slides if it can; says what is kept."""
    try:
        finish()
    except Exception as e:  # noqa: BLE001 - the disk is likely still full; said below
        return (f"The crops written so far are kept, but {MANIFEST} could not be updated "
                f"({failure_reason(e)}): once space is freed, extract into a new folder, or "
                f"delete {out_dir} and run the same command again.")
    return (f"Kept: the {len(done)} slide(s) finished before it, in {LOCATIONS} and "
            f"{MANIFEST}, and every crop written. Once the problem is fixed (e.g. space freed), "
            "the same command resumes (crops already on disk are not read again).")


def _extract_slide(path, out_dir, cfg, folders, stored, points, patients, class_map, progress,
                   normalizer=None):
    slide = open_slide(path, cfg.mpp)
    try:
        fovs_px = fov_pixels(slide, cfg.fovs)
        sizes = [cfg.size or f for f in fovs_px]
        for folder, size, fpx in zip(folders, sizes, fovs_px):
            if stored.get(folder, size) != size:
                raise SlideError(path, f"its crops for {folder} would be {size} px ({fpx} level-0 px "
                                 f"at {slide.mpp:g} um/px) but {out_dir}/{folder} holds {stored[folder]} px "
                                 "crops (slides of different mpp): pass --size N to store every "
                                 "field at N px")
        ann = None
        if cfg.annotations:
            ann = ann_lib.read_annotations(ann_lib.annotation_file(cfg.annotations, slide.name), class_map)
        slide_points = None
        if points is not None:
            slide_points = points.get(slide.name, [])
        loc = locate(slide, fovs_px, stride=cfg.stride, min_tissue=cfg.min_tissue, border=cfg.border,
                     tissue=cfg.tissue, points=slide_points, points_file=cfg.points or "",
                     annotations=ann, outside_label=cfg.outside_label)
        token = ann_lib.safe_token(slide.name)
        if patients is not None:
            if slide.name not in patients:
                raise InputError(cfg.patients, f"no patient given for slide {slide.name}")
            num_id = ann_lib.safe_token(patients[slide.name])
        else:
            num_id = token
        names = sample_names(num_id, token, loc.xy)
        levels = [slide.field_level(f, s if cfg.size else None, cfg.pyramid) for f, s in zip(fovs_px, sizes)]
        written, existing, passthrough = _write_crops(slide, out_dir, folders, fovs_px, cfg, names,
                                                      loc.xy, cfg.workers, progress, normalizer)
        slide.check_unchanged()
        for folder, size in zip(folders, sizes):
            stored.setdefault(folder, size)
        pictures.locations_thumbnail(
            os.path.join(out_dir, THUMBNAILS, slide.name + ".png"), loc.overview,
            (slide.width, slide.height), loc.mask, loc.xy, loc.labels, min(fovs_px),
            f"{slide.name}: {len(loc)} locations of {loc.candidates} candidates "
            f"({slide.width} x {slide.height} px, mpp {slide.mpp or 'unknown'})", ann)
        rows = []
        for k, fname in enumerate(names):
            row = {"filename": fname, "slide": slide.name, "num_id": num_id,
                   "x": int(loc.xy[k, 0]), "y": int(loc.xy[k, 1]),
                   "label": int(loc.labels[k]) if loc.labels[k] >= 0 else "",
                   "mpp": f"{slide.mpp:g}" if slide.mpp else "",
                   "tissue_fraction": f"{loc.tissue_fraction[k]:.4f}", "padded": int(loc.padded[k])}
            row.update({f"level_{f}": lv for f, lv in zip(folders, levels)})
            rows.append(row)
        labels, counts = loc.labels[loc.labels >= 0], {}
        for v in np.unique(labels):
            counts[int(v)] = int((labels == v).sum())
        summary = {"path": os.path.abspath(path), "locations": len(loc), "candidates": loc.candidates,
                   "written": written, "existing": existing, "padded": int(loc.padded.sum()),
                   "stain_passthrough": passthrough,
                   "dropped": loc.dropped, "label_counts": counts, "fovs_px": list(fovs_px),
                   "levels": levels, "mpp": slide.mpp, "mpp_source": slide.mpp_source,
                   "size": [slide.width, slide.height], "num_id": num_id}
        return rows, summary
    finally:
        slide.close()


def _write_crops(slide, out_dir, folders, fovs_px, cfg, names, xy, workers, progress,
                 normalizer=None):
    """Reads and writes every missing crop in a thread pool, stain-normalised with
    ``normalizer``; returns (written, existing, crops passed through unnormalised)."""
    lock = threading.Lock()
    counts = {"written": 0, "existing": 0, "passthrough": 0}

    def job(k):
        todo = [(folder, fpx) for folder, fpx in zip(folders, fovs_px)
                if not os.path.exists(os.path.join(out_dir, folder, names[k] + ".png"))]
        passed = 0
        for folder, fpx in todo:
            crop = slide.read_field(int(xy[k, 0]), int(xy[k, 1]), fpx, cfg.size, cfg.pyramid)
            if normalizer is not None:
                crop, ok = apply_uint8(normalizer, crop)
                passed += not ok
            _save_png(os.path.join(out_dir, folder, names[k] + ".png"), crop)
        with lock:
            counts["passthrough"] += passed
            counts["written"] += len(todo)
            counts["existing"] += len(folders) - len(todo)

    bar = tqdm(total=len(names), desc=slide.name, unit="loc", disable=not progress, leave=False,
               file=sys.stderr)
    for _ in ordered_imap(job, range(len(names)), workers):
        bar.update(1)
    bar.close()
    return counts["written"], counts["existing"], counts["passthrough"]


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_tables(out_dir: str, cfg: ExtractConfig, rows_by_slide: dict[str, list[dict]],
                  resumed: bool) -> None:
    """locations.csv (previous rows of the slides not redone, then this run's) and the labels
    file (each num_id's rows highest label first)."""
    path = os.path.join(out_dir, LOCATIONS)
    rows = [r for r in _read_rows(path) if r["slide"] not in rows_by_slide] if resumed else []
    for slide_rows in rows_by_slide.values():
        rows += [{k: str(v) for k, v in r.items()} for r in slide_rows]
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(path, buf.getvalue())
    labelled = [r for r in rows if r.get("label", "") != ""]
    if not labelled:
        return
    order: dict[str, list[dict]] = {}
    for r in labelled:
        order.setdefault(r["num_id"], []).append(r)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "label"])
    for group in order.values():
        for r in sorted(group, key=lambda r: -int(r["label"])):
            writer.writerow([r["filename"], r["label"]])
    _atomic_write_text(os.path.join(out_dir, cfg.labels_file), buf.getvalue())


def training_scales(folders: Sequence[str], fovs: Sequence[geometry.FieldOfView]) -> tuple[str, ...]:
    """``config.data.scales`` for these folders, in the reference's order of sizes."""
    return geometry.reference_order(folders, [f.size for f in fovs])
