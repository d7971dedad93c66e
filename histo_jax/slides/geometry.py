"""Fields of view, their folders, and where crops sit on a slide (docs/reference.md §6).

The crop of field of view F (level-0 px, even) around the level-0 centre (x, y) covers
level-0 pixels ``[x - F/2, x + F/2)`` in both axes, so every crop of a sample shares its
centre and each is the centre quarter-area of the next larger one (docs/reference.md §1).

Fields of view are given in level-0 pixels (folders ``high_mag_<F>``, the reference's
names) or in micrometres (folders ``fov_<U>um``); a micrometre field becomes
``round(U / mpp)`` px rounded to the nearest even number, so that its centre is a pixel
corner.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

REFERENCE_FOVS = (256, 512, 1024, 2048)
_PX_FOLDER = re.compile(r"^high_mag_(\d+)$")
_UM_FOLDER = re.compile(r"^fov_(\d+(?:\.\d+)?)um$")


@dataclasses.dataclass(frozen=True)
class FieldOfView:
    """A square field of view: ``size`` in ``unit`` ('px' = level-0 pixels, or 'um')."""

    size: float
    unit: str = "px"

    def __post_init__(self):
        if self.unit not in ("px", "um"):
            raise ValueError(f"field of view unit must be 'px' or 'um', got {self.unit!r}")
        if not self.size > 0:
            raise ValueError(f"field of view must be positive, got {self.size:g} {self.unit}")
        if self.unit == "px" and (self.size != int(self.size) or int(self.size) % 2):
            raise ValueError(f"a field of view in pixels must be an even integer (its centre is "
                             f"a pixel corner), got {self.size:g}")

    @property
    def folder(self) -> str:
        """Scale folder name: ``high_mag_<F>`` (px) or ``fov_<U>um`` (um)."""
        return f"high_mag_{int(self.size)}" if self.unit == "px" else f"fov_{self.size:g}um"

    def pixels(self, mpp: float | None, slide: str = "the slide") -> int:
        """Level-0 px of this field on a slide of ``mpp`` micrometres per pixel."""
        if self.unit == "px":
            return int(self.size)
        if not mpp:
            raise ValueError(f"{slide}: the field of view {self.size:g} um needs the slide's "
                             "resolution (mpp), which its metadata does not give; pass --mpp "
                             "(micrometres per level-0 pixel) or give the fields in pixels (--fovs).")
        return max(2, 2 * int(round(self.size / mpp / 2)))

    def __str__(self) -> str:
        return f"{self.size:g} {self.unit}"


def parse_fovs(text: str | Sequence[float], unit: str = "px") -> tuple[FieldOfView, ...]:
    """``'256,512'`` (or a sequence) -> FieldOfView tuple, ascending, without duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"fields of view must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"no field of view given in {text!r}")
    fovs = tuple(FieldOfView(v, unit) for v in sorted(set(values)))
    return fovs


def fov_of_folder(name: str) -> FieldOfView:
    """The field of view a scale folder name stands for (``high_mag_1024``, ``fov_256um``)."""
    m = _PX_FOLDER.match(name)
    if m:
        return FieldOfView(int(m.group(1)), "px")
    m = _UM_FOLDER.match(name)
    if m:
        return FieldOfView(float(m.group(1)), "um")
    raise ValueError(f"scale folder {name!r} does not name a field of view: slide prediction "
                     "needs folders named high_mag_<pixels> or fov_<micrometres>um (the names "
                     "`python -m histo_jax.data extract` writes)")


def reference_order(folders: Sequence[str], sizes: Sequence[float]) -> tuple[str, ...]:
    """Folders in the reference input order, generalised: second largest, largest, then
    descending (256..2048 -> 1024, 2048, 512, 256)."""
    by_size = [f for _, f in sorted(zip(sizes, folders))]
    if len(by_size) <= 2:
        return tuple(by_size)
    return (by_size[-2], by_size[-1]) + tuple(reversed(by_size[:-2]))


def crop_boxes(xy: np.ndarray, fov: int) -> np.ndarray:
    """(n, 4) level-0 boxes ``x0, y0, x1, y1`` (end exclusive) of the crops of ``fov`` px."""
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    h = fov // 2
    return np.concatenate([xy - h, xy + h], axis=1)


def inside(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Whether each box lies wholly within the slide's level-0 area."""
    b = np.asarray(boxes)
    return (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= width) & (b[:, 3] <= height)


def grid_centres(width: int, height: int, fov: int, stride: int) -> np.ndarray:
    """(n, 2) level-0 centres, row-major: the ``fov`` px crops tile the slide from its
    origin with step ``stride`` (every centre's ``fov`` crop lies within the slide)."""
    if stride < 1:
        raise ValueError(f"the grid stride must be a positive number of level-0 px, got {stride}")
    h = fov // 2
    xs = np.arange(h, width - h + 1, stride, dtype=np.int64)
    ys = np.arange(h, height - h + 1, stride, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def read_plan(fov: int, out_size: int, downsamples: Sequence[float], pyramid: bool = True
              ) -> int:
    """Pyramid level to read a ``fov`` px field stored at ``out_size`` px from: the coarsest
    level whose downsample does not exceed ``fov / out_size`` (level 0 when not ``pyramid``)."""
    if not pyramid:
        return 0
    want = fov / out_size * (1 + 1e-3)  # Tolerance: scanners' downsamples are e.g. 4.0003.
    best = 0
    for level, ds in enumerate(downsamples):  # Ascending, as OpenSlide lists them.
        if ds <= want:
            best = level
    return best


def level_window(x0: int, y0: int, fov: int, ds: float) -> tuple[tuple[int, int], tuple[int, int],
                                                                  tuple[float, float, float, float]]:
    """Integer level window covering a level-0 box, and the box inside it.

    Returns (level-0 location of the window's corner, window size in level px, the box
    ``(left, top, right, bottom)`` in window px, fractional when ``ds`` does not divide).
    """
    lx0, ly0 = math.floor(x0 / ds), math.floor(y0 / ds)
    lx1, ly1 = math.ceil((x0 + fov) / ds - 1e-9), math.ceil((y0 + fov) / ds - 1e-9)
    box = (x0 / ds - lx0, y0 / ds - ly0, (x0 + fov) / ds - lx0, (y0 + fov) / ds - ly0)
    return (int(round(lx0 * ds)), int(round(ly0 * ds))), (lx1 - lx0, ly1 - ly0), box
