"""Where samples sit on a slide: tissue grid, given points or annotated regions, then the
tissue and border filters. Shared by extraction and slide prediction.

* grid: centres every ``stride`` level-0 px, the smallest field of view tiling the slide
  from its origin (``geometry.grid_centres``); kept when the smallest field is at least
  ``min_tissue`` tissue (default 0.5);
* points: every given point, the tissue filter only when ``min_tissue`` is given; a point
  outside the slide is an error naming the points file and line;
* annotations: the grid, each location labelled by the region containing its centre
  (``outside_label`` elsewhere, or dropped); locations inside regions of different labels
  are dropped as ambiguous.

Fields that cross the slide border are dropped (``border='skip'``) or read with white
padding (``'pad'``); both are counted.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from histo_jax.slides import geometry
from histo_jax.slides.annotations import Annotations, Point
from histo_jax.slides.reader import InputError, Slide, SlideError
from histo_jax.slides.tissue import TissueMask, TissueParams, detect_tissue

DEFAULT_MIN_TISSUE = 0.5
BORDER_CHOICES = ("skip", "pad")


@dataclasses.dataclass
class Locations:
    """The samples of one slide: level-0 centres, labels (-1: none), tissue fraction of the
    smallest field, whether any field crosses the border (read padded), and the counts of
    what was dropped."""

    xy: np.ndarray
    labels: np.ndarray
    tissue_fraction: np.ndarray
    padded: np.ndarray
    mask: TissueMask
    overview: np.ndarray
    fovs_px: tuple[int, ...]
    dropped: dict[str, int]
    candidates: int

    def __len__(self) -> int:
        return len(self.xy)


def fov_pixels(slide: Slide, fovs: Sequence[geometry.FieldOfView]) -> tuple[int, ...]:
    """Level-0 px of each field on ``slide`` (raises SlideError when um needs a missing mpp)."""
    try:
        return tuple(f.pixels(slide.mpp, slide.path) for f in fovs)
    except ValueError as e:
        raise SlideError(slide.path, str(e).split(": ", 1)[1]) from None


def locate(slide: Slide, fovs_px: Sequence[int], *, stride: int | None = None,
           min_tissue: float | None = DEFAULT_MIN_TISSUE, border: str = "skip",
           tissue: TissueParams = TissueParams(), points: Sequence[Point] | None = None,
           points_file: str = "", annotations: Annotations | None = None,
           outside_label: int | None = None, overview_side: int = 1024) -> Locations:
    """Detects tissue and returns the slide's locations (module docstring)."""
    if border not in BORDER_CHOICES:
        raise ValueError(f"border must be one of {BORDER_CHOICES}, got {border!r}")
    fmin, fmax = min(fovs_px), max(fovs_px)
    rgb, ds = slide.thumbnail(tissue.downsample)
    mask = detect_tissue(rgb, ds, tissue)
    overview = rgb
    if max(rgb.shape[:2]) < overview_side and max(slide.width, slide.height) > max(rgb.shape[:2]):
        overview, _ = slide.thumbnail(max(slide.width, slide.height) / overview_side, overview_side)
    dropped: dict[str, int] = {}
    if points is not None:
        xy = np.array([(p.x, p.y) for p in points], np.int64).reshape(-1, 2)
        labels = np.array([p.label for p in points], np.int64)
        out = [p for p in points if not (0 <= p.x < slide.width and 0 <= p.y < slide.height)]
        if out:
            listing = ", ".join(f"line {p.line} ({p.x}, {p.y})" for p in out[:5])
            more = f" and {len(out) - 5} more" if len(out) > 5 else ""
            raise InputError(points_file or "points", f"{len(out)} point(s) of slide {slide.name} lie "
                             f"outside the slide ({slide.width} x {slide.height} level-0 px): "
                             f"{listing}{more}")
        xy, labels = _unique_points(xy, labels, points, points_file, slide.name, dropped)
    else:
        xy = geometry.grid_centres(slide.width, slide.height, fmin, stride or fmin)
        labels = np.full(len(xy), -1, np.int64)
        if min_tissue is None:
            min_tissue = DEFAULT_MIN_TISSUE
    candidates = len(xy)
    frac = mask.fraction(geometry.crop_boxes(xy, fmin))
    keep = np.ones(len(xy), bool)
    if min_tissue is not None:
        low = frac < min_tissue
        dropped["below_min_tissue"] = int(low.sum())
        keep &= ~low
    if annotations is not None:
        ann, ambiguous = annotations.labels(xy)
        dropped["ambiguous_regions"] = int((keep & ambiguous).sum())
        keep &= ~ambiguous
        outside = ann < 0
        if outside_label is None:
            dropped["outside_regions"] = int((keep & outside).sum())
            keep &= ~outside
        else:
            ann = np.where(outside, outside_label, ann)
        labels = np.where(labels >= 0, labels, ann)
    crosses = ~geometry.inside(geometry.crop_boxes(xy, fmax), slide.width, slide.height)
    if border == "skip":
        dropped["border_skipped"] = int((keep & crosses).sum())
        keep &= ~crosses
    return Locations(xy=xy[keep], labels=labels[keep], tissue_fraction=frac[keep],
                     padded=crosses[keep], mask=mask, overview=overview, fovs_px=tuple(fovs_px),
                     dropped=dropped, candidates=candidates)


def _unique_points(xy, labels, points, points_file, name, dropped):
    """One sample per distinct point; the same point given two labels is an error."""
    seen: dict[tuple[int, int], int] = {}
    keep = []
    for k, (p, (x, y)) in enumerate(zip(points, xy)):
        j = seen.get((x, y))
        if j is None:
            seen[(x, y)] = k
            keep.append(k)
        elif labels[j] != labels[k]:
            raise InputError(points_file or "points", f"slide {name}: point ({x}, {y}) is given "
                             f"twice with different labels (lines {points[j].line} and {p.line})")
    dropped["duplicate_points"] = len(points) - len(keep)
    return xy[keep], labels[keep]
