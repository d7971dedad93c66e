"""Slide pictures: extraction thumbnails (tissue and locations), probability heatmaps and
per-scale attention maps (matplotlib, as ``histo_jax/plots.py``)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from PIL import Image, ImageDraw
from scipy import ndimage

from histo_jax import plots
from histo_jax.slides.annotations import Annotations
from histo_jax.slides.tissue import TissueMask

plt = plots.plt
LABEL_COLOURS = {-1: (255, 140, 0), 0: (30, 90, 255), 1: (230, 0, 0)}  # unlabelled, normal, tumour


def mask_at(mask: TissueMask, shape: tuple[int, int]) -> np.ndarray:
    """The tissue mask resampled (nearest) to an overview of ``shape`` (h, w)."""
    img = Image.fromarray(mask.mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) > 127


def _scale(overview: np.ndarray, slide_size: tuple[int, int]) -> tuple[float, float]:
    return slide_size[0] / overview.shape[1], slide_size[1] / overview.shape[0]


def locations_thumbnail(path: str, overview: np.ndarray, slide_size: tuple[int, int],
                        mask: TissueMask, xy: np.ndarray, labels: np.ndarray, fov_px: int,
                        title: str, annotations: Annotations | None = None) -> str:
    """Overview with the tissue outline (green), annotated regions (dark red) and the
    smallest field of every kept location (square, coloured by label)."""
    sx, sy = _scale(overview, slide_size)
    tissue = mask_at(mask, overview.shape[:2])
    edge = tissue & ~ndimage.binary_erosion(tissue, iterations=1, border_value=0)
    edge = ndimage.binary_dilation(edge, iterations=1)
    img = overview.copy()
    img[edge] = (0, 170, 0)
    pad = 28
    canvas = Image.new("RGB", (img.shape[1], img.shape[0] + pad), "white")
    canvas.paste(Image.fromarray(img), (0, pad))
    draw = ImageDraw.Draw(canvas)
    if annotations is not None:
        for region in annotations.regions:
            for rings in region.polygons:
                for ring in rings:
                    pts = [(float(x / sx), float(y / sy + pad)) for x, y in ring]
                    draw.line(pts + pts[:1], fill=(120, 0, 0), width=2)
    hx, hy = fov_px / 2 / sx, fov_px / 2 / sy
    for (x, y), lab in zip(np.asarray(xy).reshape(-1, 2), labels):
        c = LABEL_COLOURS.get(int(lab), (200, 0, 200))
        cx, cy = x / sx, y / sy + pad
        if hx >= 1.5:
            draw.rectangle([cx - hx, cy - hy, cx + hx - 1, cy + hy - 1], outline=c)
        else:
            draw.point([(cx, cy)], fill=c)
    draw.text((4, 2), title, fill="black")
    draw.text((4, 14), f"green: tissue; squares: {fov_px} px fields (red 1, blue 0, orange "
              "unlabelled); dark red: annotations", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def accumulate(shape: tuple[int, int], scale: tuple[float, float], xy: np.ndarray, footprint: int,
               values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CLAM-style map: every location adds its value(s) over its ``footprint`` px square
    (overview px from level-0 ``scale``); returns (mean where covered, coverage count)."""
    h, w = shape
    values = np.asarray(values, np.float64).reshape(len(xy), -1)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    x0 = np.clip(np.floor((xy[:, 0] - footprint / 2) / scale[0]).astype(int), 0, w)
    x1 = np.clip(np.ceil((xy[:, 0] + footprint / 2) / scale[0]).astype(int), 0, w)
    y0 = np.clip(np.floor((xy[:, 1] - footprint / 2) / scale[1]).astype(int), 0, h)
    y1 = np.clip(np.ceil((xy[:, 1] + footprint / 2) / scale[1]).astype(int), 0, h)
    acc = np.zeros((h + 1, w + 1, values.shape[1] + 1))
    v = np.concatenate([values, np.ones((len(xy), 1))], 1)
    for (a, b, sign) in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(acc, (a, b), sign * v)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    count = acc[..., -1]
    mean = acc[..., :-1] / np.maximum(count, 1e-9)[..., None]
    return mean, np.rint(count)


def _scale_bar(ax, overview_w: int, scale_x: float, mpp: float | None) -> None:
    per_px = scale_x * (mpp or 1.0)  # um (or level-0 px) per overview pixel
    target = overview_w * per_px / 5
    steps = [k * 10 ** e for e in range(0, 7) for k in (1, 2, 5)]
    length = max([s for s in steps if s <= target] or [steps[0]])
    if mpp:
        label = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm"
    else:
        label = f"{length:g} px (level 0; no mpp)"
    bar = AnchoredSizeBar(ax.transData, length / per_px, label, "lower left", pad=0.4,
                          color="black", frameon=True, size_vertical=max(2, overview_w / 200))
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)


def _outline(ax, annotations: Annotations | None, scale: tuple[float, float]) -> None:
    if annotations is None:
        return
    for region in annotations.regions:
        for rings in region.polygons:
            ring = np.vstack([rings[0], rings[0][:1]])
            ax.plot(ring[:, 0] / scale[0], ring[:, 1] / scale[1], color="black", lw=1.2, ls="--")


def heatmap(path: str, overview: np.ndarray, slide_size: tuple[int, int], mask: TissueMask,
            xy: np.ndarray, prob: np.ndarray, footprint: int, mpp: float | None, title: str,
            label: str = "P(tumour)", annotations: Annotations | None = None) -> str:
    """Probability over the overview, tissue-masked, overlapping locations averaged; colour
    bar, scale bar, and annotated regions dashed when given."""
    scale = _scale(overview, slide_size)
    mean, count = accumulate(overview.shape[:2], scale, xy, footprint, prob)
    show = (count > 0) & mask_at(mask, overview.shape[:2])
    h, w = overview.shape[:2]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 8 * w / max(h, w)) + 1.2, 1 + 8 * h / max(h, w)))
    ax.imshow(overview)
    im = ax.imshow(np.ma.masked_where(~show, mean[..., 0]), cmap="jet", vmin=0, vmax=1, alpha=0.5,
                   interpolation="nearest")
    _outline(ax, annotations, scale)
    _scale_bar(ax, w, scale[0], mpp)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    cb.set_label(label)
    cb.solids.set_alpha(1)
    return plots._save(fig, path)


def attention_maps(path: str, overview: np.ndarray, slide_size: tuple[int, int], mask: TissueMask,
                   xy: np.ndarray, received: np.ndarray, footprint: int, scales: Sequence[str],
                   mpp: float | None, title: str) -> str:
    """One panel per scale: the attention that scale receives (mean over the queries), over
    the overview, tissue-masked."""
    scale = _scale(overview, slide_size)
    mean, count = accumulate(overview.shape[:2], scale, xy, footprint, received)
    show = (count > 0) & mask_at(mask, overview.shape[:2])
    n = len(scales)
    h, w = overview.shape[:2]
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows * h / w + 0.8), squeeze=False)
    im = None
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(overview)
        im = ax.imshow(np.ma.masked_where(~show, mean[..., k]), cmap="viridis", vmin=0, vmax=1,
                       alpha=0.65, interpolation="nearest")
        ax.set_title(f"attention to {scales[k]}", fontsize=9)
        if k == 0:
            _scale_bar(ax, w, scale[0], mpp)
    fig.suptitle(title, fontsize=10)
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        cb.set_label("mean attention received")
        cb.solids.set_alpha(1)
    return plots._save(fig, path)
