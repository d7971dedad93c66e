"""Synthetic whole slides: pyramidal TIFFs OpenSlide reads, and the slide demo.

``write_pyramid_tiff(path, rgb, mpp)`` writes a generic pyramidal TIFF: every level
tiled 256 px and zlib-compressed, each reduced level (2x area average) marked
``subfiletype=1``, and the resolution tags carrying the mpp (pixels per centimetre), so
OpenSlide opens it as ``generic-tiff`` and reports ``openslide.mpp-x``.

``write_demo_slides(out)`` writes the slide demo (``python -m histo_jax.data demo
--slides OUT``), built from the demo tissue generator (``histo_jax/data/demo.py``: the
same follicles, nuclei, stroma and H&E colours, rendered at level 0, 0.25 um/px):

* ``train/``: slides for training, some with tumour and some without; ``new/``: slides
  with tumour, never used for training, to predict on;
* ``annotations/<slide>.geojson``: the tumour regions as QuPath-style annotations
  (class ``Tumor``; an empty FeatureCollection for a slide without tumour). They are
  the ground truth: the cues are drawn exactly inside them.

Every slide holds one tissue piece with a hole and a speck of debris (which tissue
detection must drop). A tumour slide has two regions whose cues sit at different fields
of view, as in the demo dataset: *atypia* (large, dark, irregular, crowded nuclei: fine
detail, seen in the small fields at high resolution) and *architecture* (crowded
micro-follicles and hypercellular stroma: coarse texture, seen in the large fields even
at low resolution).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from histo_jax.data import demo

DEMO_MPP = 0.25
TILE = 256
_FIELD_AREA = float(demo.FIELD) ** 2
_WINDOW = 512  # Render window (px) at level 0.


# ----------------------------------------------------------------------------- TIFF

def downsample2(img: np.ndarray) -> np.ndarray:
    """2x area average of a uint8 (h, w, 3) image (odd last row / column dropped)."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    s = img[:2 * h, :2 * w].reshape(h, 2, w, 2, img.shape[2]).sum((1, 3), dtype=np.uint16)
    return ((s + 2) // 4).astype(np.uint8)


def write_pyramid_tiff(path: str, rgb: np.ndarray, mpp: float | None = DEMO_MPP, *,
                       tile: int = TILE, compression: str = "zlib", level_arg: int = 1
                       ) -> list[tuple[int, int]]:
    """Writes ``rgb`` (uint8 (h, w, 3)) as a tiled pyramidal TIFF; returns the level sizes
    (width, height). Levels halve until the coarsest fits one tile; ``level_arg`` is the
    zlib compression level (1: fast)."""
    import tifffile  # noqa: PLC0415

    levels = [np.ascontiguousarray(rgb, np.uint8)]
    while max(levels[-1].shape[:2]) > tile and min(levels[-1].shape[:2]) >= 2:
        levels.append(downsample2(levels[-1]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            kw = {}
            if mpp:
                ppcm = 1e4 / (mpp * rgb.shape[1] / level.shape[1])
                kw = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tif.write(level, photometric="rgb", tile=(tile, tile), compression=compression,
                      compressionargs={"level": level_arg} if compression == "zlib" else None,
                      subfiletype=0 if i == 0 else 1, metadata=None, **kw)
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


def toy_slide(width: int = 3072, height: int = 2048, seed: int = 0, hole: float = 400
              ) -> np.ndarray:
    """A small, smooth test slide (uint8 RGB, for tests and benchmarks): white glass, one
    pink tissue ellipse (radii 0.36 x 0.34 of the slide) with a hole of radius ``hole`` px
    (400: excluded by the default tissue detection), a speck of debris (dropped), and
    smooth colour variation."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    cx, cy = width / 2, height / 2
    tissue = ((x - cx) / (0.36 * width)) ** 2 + ((y - cy) / (0.34 * height)) ** 2 < 1
    in_hole = (x - cx - 0.15 * width) ** 2 + (y - cy) ** 2 < hole ** 2
    speck = (x - 0.06 * width) ** 2 + (y - 0.08 * height) ** 2 < 40 ** 2
    on = ((tissue & ~in_hole) | speck)[..., None]
    img = np.where(on, np.float32(1), np.float32(0)) * np.array([-20, -93, -46], np.float32)
    img += np.array([245, 243, 246], np.float32)
    for k in range(3):  # sin(ax + by + p) = sin(ax) cos(by + p) + cos(ax) sin(by + p)
        a, b, p = 1 / (97 + 31 * k), 1 / (131 - 17 * k), rng.uniform(0, 2 * np.pi)
        wave = np.sin(a * x) * np.cos(b * y + p) + np.cos(a * x) * np.sin(b * y + p)
        img[..., k] += np.where(on[..., 0], 18, 1.5) * wave
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- shapes

def _blob(rng, cx, cy, rx, ry, wobble=0.08, harmonics=(2, 3, 4, 5)) -> dict:
    return {"c": (cx, cy), "r": (rx, ry), "angle": rng.uniform(0, np.pi),
            "h": [(k, rng.uniform(0, wobble), rng.uniform(0, 2 * np.pi)) for k in harmonics]}


def _in_blob(b: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test of a wobbly ellipse: radius 1 + sum_k a_k cos(k theta + p_k) (normalised)."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float32), np.asarray(y, np.float32))
    out = np.zeros(x.shape, bool)
    reach = max(b["r"]) * (1 + sum(a for _, a, _ in b["h"]))
    box = ((x > b["c"][0] - reach) & (x < b["c"][0] + reach)
           & (y > b["c"][1] - reach) & (y < b["c"][1] + reach))
    if not box.any():
        return out
    ca, sa = math.cos(b["angle"]), math.sin(b["angle"])
    dx, dy = x[box] - b["c"][0], y[box] - b["c"][1]
    u, v = (ca * dx + sa * dy) / b["r"][0], (-sa * dx + ca * dy) / b["r"][1]
    rho2 = u * u + v * v
    z = (u + 1j * v) / np.sqrt(np.maximum(rho2, 1e-12))  # e^{i theta}
    edge = np.ones(len(u), np.float32)
    zk, k_done = np.ones_like(z), 0
    for k, a, p in sorted(b["h"]):
        while k_done < k:
            zk, k_done = zk * z, k_done + 1
        edge += a * (zk * complex(math.cos(p), math.sin(p))).real  # a cos(k theta + p)
    out[box] = rho2 < edge * edge
    return out


def _region_polygon(rng, cx, cy, radius, n=24) -> np.ndarray:
    """A smooth star-shaped polygon (n vertices, level-0 px)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 5):
        r += rng.uniform(0, 0.12) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return np.column_stack([cx + radius * r * np.cos(t), cy + radius * r * np.sin(t)])


def _contains(poly: np.ndarray | None, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from matplotlib.path import Path  # noqa: PLC0415

    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    if poly is None:
        return np.zeros(x.shape, bool)
    return Path(poly).contains_points(np.column_stack([x.ravel(), y.ravel()])).reshape(x.shape)


def _raster(poly: np.ndarray | None, width: int, height: int, step: int) -> np.ndarray:
    """Region mask at 1/step resolution (nearest lookups for per-pixel stroma cellularity)."""
    img = Image.new("L", (-(-width // step), -(-height // step)), 0)
    if poly is not None:
        ImageDraw.Draw(img).polygon([tuple(p) for p in (poly / step)], fill=1)
    return np.asarray(img, bool)


# ----------------------------------------------------------------------------- scene

def slide_layout(seed: int, index: int, width: int, height: int, tumour: bool) -> dict:
    """Tissue shape, hole, debris, tumour regions and stain of one demo slide."""
    rng = np.random.default_rng([seed, index, 7919])
    tissue = _blob(rng, width / 2 + rng.uniform(-0.03, 0.03) * width,
                   height / 2 + rng.uniform(-0.03, 0.03) * height, 0.40 * width, 0.37 * height)
    a = rng.uniform(0, 2 * np.pi)
    hole = _blob(rng, tissue["c"][0] + 0.45 * tissue["r"][0] * math.cos(a),
                 tissue["c"][1] + 0.45 * tissue["r"][1] * math.sin(a),
                 rng.uniform(380, 460), rng.uniform(300, 360), wobble=0.05)
    corner = (rng.uniform(0.03, 0.06) * width, rng.uniform(0.04, 0.08) * height)
    debris = _blob(rng, corner[0] + 60, corner[1] + 60, 60, 45, wobble=0.1)
    regions = []
    if tumour:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, np.pi]) + rng.uniform(-0.5, 0.5, 2)
        for cue, ang in zip(rng.permutation(["atypia", "architecture"]), angles):
            d = rng.uniform(0.35, 0.5)
            cx = tissue["c"][0] + d * tissue["r"][0] * math.cos(ang)
            cy = tissue["c"][1] + d * tissue["r"][1] * math.sin(ang)
            radius = rng.uniform(0.16, 0.22) * min(width, height)
            regions.append({"cue": str(cue), "polygon": _region_polygon(rng, cx, cy, radius)})
    stain = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
    return {"tissue": tissue, "hole": hole, "debris": debris, "regions": regions,
            "stain": stain, "width": width, "height": height, "seed": [seed, index]}


def _in_tissue(layout: dict, x, y) -> np.ndarray:
    return ((_in_blob(layout["tissue"], x, y) & ~_in_blob(layout["hole"], x, y))
            | _in_blob(layout["debris"], x, y))


def _region(layout: dict, cue: str) -> np.ndarray | None:
    return next((r["polygon"] for r in layout["regions"] if r["cue"] == cue), None)


def make_slide_scene(layout: dict) -> dict:
    """Scene vectors of a whole slide, as ``demo._make_scene`` draws a 2048 px field, with
    the cues decided by region instead of by distance from the field's centre."""
    rng = np.random.default_rng(layout["seed"] + [104729])
    w, h = layout["width"], layout["height"]
    atypia, arch = _region(layout, "atypia"), _region(layout, "architecture")
    # Follicles: rejection sampling of non-overlapping discs (spatial hash of 512 px cells).
    n = int(w * h / _FIELD_AREA * 2500)
    cand = rng.uniform(0, 1, (n, 2)) * [w, h]
    in_arch = _contains(arch, cand[:, 0], cand[:, 1])
    keep = (in_arch | (rng.random(n) < 900 / 2500)) & _in_tissue(layout, cand[:, 0], cand[:, 1])
    radius = np.where(in_arch, rng.uniform(24, 55, n), rng.uniform(80, 200, n))
    cell: dict[tuple[int, int], list[int]] = {}
    centres, radii = [], []
    for (x, y), r in zip(cand[keep], radius[keep]):
        gap = 22 if r < 60 else 34
        ci, cj = int(x // 512), int(y // 512)
        ok = True
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                for k in cell.get((ci + di, cj + dj), ()):
                    if math.hypot(centres[k][0] - x, centres[k][1] - y) <= radii[k] + r + gap:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            cell.setdefault((ci, cj), []).append(len(centres))
            centres.append((x, y))
            radii.append(r)
    centres, radii = np.asarray(centres).reshape(-1, 2), np.asarray(radii)
    m = len(radii)
    fol = np.column_stack([centres, radii, rng.uniform(0.75, 1.0, m), rng.uniform(0, np.pi, m),
                           rng.uniform(0.22, 0.42, m), rng.random(m) < 0.45]).astype(np.float32)
    # Epithelial nuclei along every follicle wall (denser around atypical follicles).
    atypical_fol = _contains(atypia, centres[:, 0], centres[:, 1]) if m else np.zeros(0, bool)
    epi = []
    for (x, y, r, asp, ang, _, _), atyp in zip(fol, atypical_fol):
        spacing = 9.0 if atyp else (11.0 if r < 60 else 14.0)
        k = max(6, int(2 * np.pi * r / spacing))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
        rad = r + 8.0 + rng.normal(0, 1.2, k)
        lx, ly = rad * np.cos(t), rad * asp * np.sin(t)
        ca, sa = np.cos(ang), np.sin(ang)
        nx, ny = x + ca * lx - sa * ly, y + sa * lx + ca * ly
        epi.append(np.column_stack([nx, ny, np.arctan2(ny - y, nx - x)]))
    epi = np.vstack(epi) if epi else np.zeros((0, 3))
    q = len(epi)
    a = rng.uniform(4.5, 6.0, q)
    b = a * rng.uniform(0.8, 1.0, q)
    amp = rng.uniform(1.7, 2.2, q)
    irr = np.zeros(q)
    orient = epi[:, 2] + np.pi / 2
    z = _contains(atypia, epi[:, 0], epi[:, 1])
    nz = int(z.sum())
    a[z] = rng.uniform(7.5, 11.0, nz)
    b[z] = a[z] / rng.uniform(1.1, 1.7, nz)
    amp[z] = rng.uniform(2.2, 2.9, nz)
    irr[z] = rng.uniform(0.08, 0.2, nz)
    orient[z] = rng.uniform(0, np.pi, nz)
    # Spindle nuclei in the stroma, twice as dense in the architecture region.
    s = rng.uniform(0, 1, (int(w * h / _FIELD_AREA * 1400), 2)) * [w, h]
    s = s[(rng.random(len(s)) < 0.5) | _contains(arch, s[:, 0], s[:, 1])]
    s = s[_in_tissue(layout, s[:, 0], s[:, 1])]
    if m and len(s):
        from scipy.spatial import cKDTree  # noqa: PLC0415

        tree = cKDTree(s)
        drop = np.zeros(len(s), bool)
        for (x, y, r, *_rest) in fol:
            drop[tree.query_ball_point((x, y), r + 16)] = True
        s = s[~drop]
    k = len(s)
    sa_ = rng.uniform(6, 10, k)
    stroma = np.column_stack([s, sa_, sa_ / rng.uniform(2.5, 3.5, k), rng.uniform(0, np.pi, k),
                              rng.uniform(1.5, 2.0, k), np.zeros(k)])
    nuc = np.column_stack([epi[:, :2], a, b, orient, amp, irr])
    step = 8
    arch_mask = _raster(arch, w, h, step).astype(np.float32)

    def stroma_cells(ys, xs):  # 0.5, 0.62 in the architecture region (demo: cue B).
        return 0.5 + 0.12 * demo._sample_grid(arch_mask, ys - step / 2, xs - step / 2,
                                              (arch_mask.shape[0] * step - step,
                                               arch_mask.shape[1] * step - step))

    return {"follicles": fol, "nuclei": np.vstack([nuc, stroma]).astype(np.float32),
            "stroma_cells": stroma_cells, "extent": (h, w),
            "coarse": rng.normal(0, 1, (h // 128 + 2, w // 128 + 2)).astype(np.float32),
            "fine": rng.normal(0, 1, (h // 8 + 2, w // 8 + 2)).astype(np.float32)}


def render_slide(layout: dict) -> np.ndarray:
    """uint8 RGB level 0 of a demo slide (rendered in 512 px windows at 1 px resolution)."""
    scene = make_slide_scene(layout)
    w, h = layout["width"], layout["height"]
    rng = np.random.default_rng(layout["seed"] + [15485863])
    out = np.empty((h, w, 3), np.uint8)
    fol, nuc = scene["follicles"], scene["nuclei"]
    for y0 in range(0, h, _WINDOW):
        for x0 in range(0, w, _WINDOW):
            ny, nx = min(_WINDOW, h - y0), min(_WINDOW, w - x0)
            reach = fol[:, 2] + 16
            f = fol[(fol[:, 0] + reach > x0) & (fol[:, 0] - reach < x0 + nx)
                    & (fol[:, 1] + reach > y0) & (fol[:, 1] - reach < y0 + ny)]
            r = nuc[:, 2] + 2
            n = nuc[(nuc[:, 0] + r > x0) & (nuc[:, 0] - r < x0 + nx)
                    & (nuc[:, 1] + r > y0) & (nuc[:, 1] - r < y0 + ny)]
            sub = dict(scene, follicles=f, nuclei=n)
            haem, eosin = demo.render_window(sub, x0, y0, 1.0, (ny, nx), rng)
            ys = y0 + np.arange(ny) + 0.5
            xs = x0 + np.arange(nx) + 0.5
            t = _in_tissue(layout, xs[None, :], ys[:, None])
            glass = 0.012 + 0.004 * rng.normal(0, 1, (ny, nx)).astype(np.float32)
            haem = np.where(t, haem, 0.0)
            eosin = np.where(t, eosin, glass)
            out[y0:y0 + ny, x0:x0 + nx] = demo.stain_to_rgb(haem, eosin, layout["stain"])
    return out


def region_mask(layout: dict, xy: np.ndarray) -> np.ndarray:
    """Ground truth: whether each level-0 point lies in a tumour region."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    out = np.zeros(len(xy), bool)
    for r in layout["regions"]:
        out |= _contains(r["polygon"], xy[:, 0], xy[:, 1])
    return out


def geojson(layout: dict) -> dict:
    """The tumour regions as a QuPath-style GeoJSON FeatureCollection."""
    feats = []
    for i, r in enumerate(layout["regions"]):
        ring = np.round(r["polygon"], 1).tolist()
        feats.append({"type": "Feature", "id": f"region-{i}",
                      "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                      "properties": {"objectType": "annotation", "name": r["cue"],
                                     "classification": {"name": "Tumor", "color": [200, 0, 0]}}})
    return {"type": "FeatureCollection", "features": feats}


# ----------------------------------------------------------------------------- demo

def demo_slide_plan(seed: int = 0, num_train: int = 10, num_train_tumour: int = 6,
                    num_new: int = 2) -> list[tuple[str, str, bool]]:
    """(folder, slide name, has tumour) of every demo slide."""
    rng = np.random.default_rng([seed, 31337])
    tumour = np.array([i < num_train_tumour for i in range(num_train)])
    rng.shuffle(tumour)
    plan = [("train", f"train-{i + 1:02d}", bool(t)) for i, t in enumerate(tumour)]
    plan += [("new", f"new-{i + 1:02d}", True) for i in range(num_new)]
    return plan


def _write_demo_slide(job) -> dict:
    out_dir, seed, index, folder, name, tumour, width, height = job
    start = time.time()
    layout = slide_layout(seed, index, width, height, tumour)
    path = os.path.join(out_dir, folder, name + ".tiff")
    levels = write_pyramid_tiff(path, render_slide(layout), DEMO_MPP)
    ann = os.path.join(out_dir, "annotations", name + ".geojson")
    with open(ann, "w") as f:
        json.dump(geojson(layout), f)
    return {"slide": path, "annotations": ann, "tumour": tumour, "levels": levels,
            "regions": [r["cue"] for r in layout["regions"]], "seconds": round(time.time() - start, 2)}


def write_demo_slides(out_dir: str, *, seed: int = 0, num_train: int = 10, num_train_tumour: int = 6,
                      num_new: int = 2, width: int = 5120, height: int = 4096,
                      num_processes: int | None = None) -> dict:
    """Writes the slide demo into ``out_dir`` (module docstring); returns a summary.

    Refuses a folder that already holds any of the files it would write.
    """
    plan = demo_slide_plan(seed, num_train, num_train_tumour, num_new)
    targets = [os.path.join(out_dir, f, n + ".tiff") for f, n, _ in plan]
    targets += [os.path.join(out_dir, "annotations", n + ".geojson") for _, n, _ in plan]
    existing = [t for t in targets if os.path.exists(t)]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} of the demo's files do): "
                              "write the slide demo into a new or empty folder.")
    for sub in ("train", "new", "annotations"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    start = time.time()
    jobs = [(out_dir, seed, i, f, n, t, width, height) for i, (f, n, t) in enumerate(plan)]
    workers = num_processes or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # Safe when the caller has started threads.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            slides = list(pool.map(_write_demo_slide, jobs))
    else:
        slides = [_write_demo_slide(j) for j in jobs]
    return {"out_dir": out_dir, "mpp": DEMO_MPP, "size": [width, height], "slides": slides,
            "seconds": round(time.time() - start, 2)}
