"""Tissue detection on a low-resolution overview, CLAM-style.

The procedure of CLAM (Lu et al. 2021, ``WholeSlideImage.segmentTissue``), with its
parameters named and in physical pixel units:

1. read the slide at ``downsample`` level-0 px per mask pixel (default 32);
2. take the HSV saturation channel (glass and white background are unsaturated, stained
   tissue is not) and median-blur it with a ``median`` px kernel (default 7);
3. threshold it: saturation > ``saturation`` (0-255, default 8), or Otsu's threshold
   with ``saturation='otsu'``;
4. close small gaps (morphological closing with a ``close`` px square, default 4; 0: off);
5. holes (background enclosed by tissue) smaller than ``min_hole_area`` are filled, the
   others are excluded from the tissue; tissue pieces whose area (holes excluded) is below
   ``min_area`` are dropped as debris. Areas are in level-0 px² (defaults 1e6 px², a
   250 um square at 0.25 um/px, and 2.5e5 px²).

CLAM's own defaults are ``sthresh=8, mthresh=7, close=4, use_otsu=False`` at a level
near 64x, with areas in units of a 512 px reference patch (``a_t=100, a_h=16``). The
result is a :class:`TissueMask`; :meth:`TissueMask.fraction` gives the exact tissue
fraction of level-0 boxes (area overlap, from a summed-area table).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """Tissue detection parameters (module docstring)."""

    downsample: float = 32.0
    saturation: float | str = 8.0
    median: int = 7
    close: int = 4
    min_area: float = 1.0e6
    min_hole_area: float = 2.5e5

    def __post_init__(self):
        if isinstance(self.saturation, str) and self.saturation != "otsu":
            raise ValueError(f"tissue saturation threshold must be a number (0-255) or 'otsu', "
                             f"got {self.saturation!r}")
        if self.downsample < 1:
            raise ValueError(f"tissue detection downsample must be >= 1, got {self.downsample}")
        if self.median < 1 or self.median % 2 == 0:
            raise ValueError(f"the median blur kernel must be an odd number of px, got {self.median}")
        if self.close < 0 or self.min_area < 0 or self.min_hole_area < 0:
            raise ValueError("tissue close, min_area and min_hole_area must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TissueMask:
    """Boolean tissue mask of an overview with ``downsample`` = (x, y) level-0 px per pixel."""

    mask: np.ndarray
    downsample: tuple[float, float]
    threshold: float

    def __post_init__(self):
        sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1))
        sat[1:, 1:] = np.cumsum(np.cumsum(self.mask, 0, dtype=np.float64), 1)
        self._sat = sat

    def _area(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px) of [0, u) x [0, v): bilinear in the summed-area table, which
        is exact for a mask constant on each pixel."""
        h, w = self.mask.shape
        u, v = np.clip(u, 0, w), np.clip(v, 0, h)
        j, i = np.minimum(np.floor(u).astype(np.int64), w - 1), np.minimum(np.floor(v).astype(np.int64), h - 1)
        fu, fv = u - j, v - i
        s = self._sat
        return ((1 - fu) * (1 - fv) * s[i, j] + fu * (1 - fv) * s[i, j + 1]
                + (1 - fu) * fv * s[i + 1, j] + fu * fv * s[i + 1, j + 1])

    def fraction(self, boxes: np.ndarray) -> np.ndarray:
        """Tissue fraction of each level-0 box ``x0, y0, x1, y1`` (outside the slide: none)."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        dx, dy = self.downsample
        u0, v0, u1, v1 = b[:, 0] / dx, b[:, 1] / dy, b[:, 2] / dx, b[:, 3] / dy
        area = self._area(u1, v1) - self._area(u0, v1) - self._area(u1, v0) + self._area(u0, v0)
        return np.clip(area / np.maximum((u1 - u0) * (v1 - v0), 1e-12), 0.0, 1.0)

    def at(self, xy: np.ndarray) -> np.ndarray:
        """Whether each level-0 point lies on tissue."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        j = np.clip((xy[:, 0] / self.downsample[0]).astype(np.int64), 0, w - 1)
        i = np.clip((xy[:, 1] / self.downsample[1]).astype(np.int64), 0, h - 1)
        return self.mask[i, j]


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: maximises the between-class variance."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    w0 = np.cumsum(hist)
    m = np.cumsum(hist * np.arange(256))
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 / total - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # ties: the middle of the plateau
    return float(np.floor((best[0] + best[-1]) / 2))  # Tissue: values > threshold.


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255, uint8) of a uint8 RGB image (PIL's conversion, as OpenCV's)."""
    return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]


def detect_tissue(rgb: np.ndarray, downsample: tuple[float, float],
                  params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of an overview ``rgb`` (uint8, (h, w, 3)) taken at ``downsample``."""
    sat = ndimage.median_filter(saturation(rgb), size=params.median, mode="nearest")
    thr = otsu_threshold(sat) if params.saturation == "otsu" else float(params.saturation)
    fg = sat > thr
    if params.close > 0:
        k = int(params.close)
        fg = ndimage.binary_closing(np.pad(fg, k), np.ones((k, k), bool))[k:-k, k:-k]
    px_area = float(downsample[0] * downsample[1])  # level-0 px² per mask pixel
    # Holes: background components that do not touch the border.
    bg_labels, n_bg = ndimage.label(~fg)
    if n_bg:
        border = np.unique(np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]]))
        sizes = np.bincount(bg_labels.ravel(), minlength=n_bg + 1) * px_area
        small = sizes < params.min_hole_area
        small[border] = False
        small[0] = False
        fg = fg | small[bg_labels]
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        keep = areas >= params.min_area
        keep[0] = False
        fg = keep[labels]
    return TissueMask(mask=fg, downsample=(float(downsample[0]), float(downsample[1])), threshold=thr)
