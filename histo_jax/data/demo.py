"""Embedded synthetic demo dataset in the exact layout of the original project.

``write_demo_dataset(out_dir)`` writes ``high_mag_256/ high_mag_512/ high_mag_1024/
high_mag_2048/`` with the same file names ``<num_id>_<k>_<class>.png`` in every folder
(``<class>`` = ``normal`` or a tumour type such as ``pap``) and ``labels.csv``
(``filename,label``, file name without ``.png``), so the whole project (preparation,
splits on ``num_id``, training, prediction) runs on a fresh machine.

Design
------
* One tissue scene per sample, described as vectors in the coordinates of a 2048 px
  field: thyroid-like follicles (pale-pink colloid, sometimes retracted from the
  wall, lined by a band of cuboidal cells whose purple nuclei sit along the rim), pink
  stroma with scattered spindle nuclei. Colours come from Beer-Lambert optical
  densities of haematoxylin and eosin, with per-``num_id`` stain strength (a small
  "slide effect").
* Rendering is cheap yet nested-exact: the scene is rasterised four times at 256 x 256
  render pixels, once per field of view (2048, 1024, 512, 256 px windows about the
  centre), and the layers are upsampled and pasted into ONE 2048 px image (the finer
  layer overwrites the centre). Every file is a centre crop of that image, so each crop
  is exactly the centre of the next larger one, and each carries the detail a 224 px
  model input can see (its centre at ~1 px, its outer ring at ~2 px of the 224 px
  input). Layers are upsampled with NEAREST: blocky at full size, invisible after the
  antialiased resize to 224, and ~10x faster and smaller as PNG than smooth upsampling.
* The class is signalled by two NOISY cues living at different fields of view:
  - cue A, nuclear atypia (larger, darker, irregular, crowded nuclei) inside the central
    ~560 px: obvious in the 256 and 512 crops, a small speck in the 2048 crop;
  - cue B, architecture (crowded micro-follicles, hypercellular stroma) only outside the
    central 600 px square: visible in the 1024 and 2048 crops, absent from 256 / 512.
  Tumour samples show each cue with probability 0.6 (independently), normal samples
  with probability 0.1. A model that sees more fields of view can therefore do better
  than one that sees only the 1024 crop (input 0 of the reference order).
* Labels are per ``num_id`` (balanced: half the ids are tumour); samples are fully
  determined by ``(seed, sample number)``; generation runs in a process pool and writes
  PNGs with ``compress_level=1``.
* Sites (``write_demo_sites``, ``python -m histo_jax.data demo --sites 2``): the default
  dataset is site A. Site B holds the same kind of tissue from other patients (other
  ``num_id``s and scenes), stained and scanned elsewhere: its haematoxylin and eosin OD
  vectors are Macenko et al.'s (2009) reference stain matrix instead of vectors close to
  Ruifrok & Johnston's (2001) (7.7 and 12.5 degrees apart), with 1.3x the haematoxylin and
  0.75x the eosin, a darker, bluer slide, as sites differ.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import math
import multiprocessing
import os
import time
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

FIELD = 2048  # Coordinates of the scene (px of the largest crop).
RENDER = 256  # Render pixels per layer.
TUMOUR_TYPES = ("pap", "fol", "pap+fol", "sol")
CUE_PROB = {0: 0.1, 1: 0.6}  # P(cue) per class, for each cue independently.
_ATYPIA_RADIUS = 280.0  # Cue A lives within this distance of the centre.
_ARCH_HALF = 300.0  # Cue B lives outside this half-width square about the centre.
_HAEM = np.array([0.65, 0.72, 0.30], np.float32)  # Optical density per unit stain.
_EOSIN = np.array([0.12, 0.88, 0.38], np.float32)


@dataclasses.dataclass(frozen=True)
class Site:
    """How one hospital's slides look: stain OD vectors, stain amounts, its patients."""

    name: str
    haem: tuple[float, float, float] = tuple(float(v) for v in _HAEM)
    eosin: tuple[float, float, float] = tuple(float(v) for v in _EOSIN)
    strength: tuple[float, float] = (1.0, 1.0)   # multiplies every sample's stain amounts
    first_num_id: int = 101
    seed_offset: int = 0


SITES = {
    "a": Site("a"),
    # Macenko et al. 2009's reference H and E vectors (torchstain's HERef), more haematoxylin,
    # less eosin; other patients (num_ids 501..) and other scenes.
    "b": Site("b", haem=(0.5626, 0.7201, 0.4062), eosin=(0.2159, 0.8012, 0.5581),
              strength=(1.3, 0.75), first_num_id=501, seed_offset=1000),
}


# ----------------------------------------------------------------------------- scene

def _make_scene(rng: np.random.Generator, cue_a: bool, cue_b: bool) -> dict:
    """Follicles (cx, cy, r, aspect, angle, colloid, gap) and nuclei (x, y, a, b, angle, amp, irr)."""
    c = FIELD / 2
    r0 = rng.uniform(110, 190)
    phi = rng.uniform(0, 2 * np.pi)
    off = r0 + rng.uniform(-30, 15)  # Anchor follicle: its wall passes near the centre.
    tries = 2500 if cue_b else 900
    cand = rng.uniform(-60, FIELD + 60, (tries, 2))
    peripheral = np.max(np.abs(cand - c), axis=1) > _ARCH_HALF
    cand_r = np.where(cue_b & peripheral, rng.uniform(24, 55, tries), rng.uniform(80, 200, tries))
    centres = np.empty((tries + 1, 2))
    radii = np.empty(tries + 1)
    centres[0] = (c + off * np.cos(phi), c + off * np.sin(phi))
    radii[0] = r0
    n = 1
    for p, r in zip(cand, cand_r):  # Rejection sampling of non-overlapping follicles.
        gap = 22 if r < 60 else 34
        d = np.hypot(centres[:n, 0] - p[0], centres[:n, 1] - p[1])
        if np.all(d > radii[:n] + r + gap):
            centres[n], radii[n] = p, r
            n += 1
    centres, radii = centres[:n], radii[:n]
    n = len(radii)
    aspect = rng.uniform(0.75, 1.0, n)
    angle = rng.uniform(0, np.pi, n)
    colloid = rng.uniform(0.22, 0.42, n)
    retracted = rng.random(n) < 0.45
    fol = np.column_stack([centres, radii, aspect, angle, colloid, retracted]).astype(np.float32)

    nuclei = []
    # Epithelial nuclei along every follicle wall.
    for (x, y, r, asp, ang, _, _) in fol:
        atypical_zone = cue_a and math.hypot(x - c, y - c) < _ATYPIA_RADIUS + r
        spacing = 9.0 if atypical_zone else (11.0 if r < 60 else 14.0)
        k = max(6, int(2 * np.pi * r / spacing))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
        rad = r + 8.0 + rng.normal(0, 1.2, k)
        lx, ly = rad * np.cos(t), rad * asp * np.sin(t)
        ca, sa = np.cos(ang), np.sin(ang)
        nx, ny = x + ca * lx - sa * ly, y + sa * lx + ca * ly
        nuclei.append(np.column_stack([nx, ny, np.arctan2(ny - y, nx - x)]))
    epi = np.vstack(nuclei)
    m = len(epi)
    a = rng.uniform(4.5, 6.0, m)
    b = a * rng.uniform(0.8, 1.0, m)
    amp = rng.uniform(1.7, 2.2, m)
    irr = np.zeros(m)
    orient = epi[:, 2] + np.pi / 2  # Nuclei lie along the wall.
    if cue_a:
        z = np.hypot(epi[:, 0] - c, epi[:, 1] - c) < _ATYPIA_RADIUS
        nz = int(z.sum())
        a[z] = rng.uniform(7.5, 11.0, nz)
        b[z] = a[z] / rng.uniform(1.1, 1.7, nz)
        amp[z] = rng.uniform(2.2, 2.9, nz)
        irr[z] = rng.uniform(0.08, 0.2, nz)
        orient[z] = rng.uniform(0, np.pi, nz)
    # Spindle nuclei in the stroma (denser with cue B outside the centre).
    s = rng.uniform(0, FIELD, (1400 if cue_b else 700, 2))
    inside = np.zeros(len(s), bool)
    for (x, y, r, *_rest) in fol:
        inside |= np.hypot(s[:, 0] - x, s[:, 1] - y) < r + 16
    s = s[~inside]
    if cue_b:
        core = np.maximum(abs(s[:, 0] - c), abs(s[:, 1] - c)) <= _ARCH_HALF
        s = s[~core | (rng.random(len(s)) < 0.5)]
    k = len(s)
    sa_ = rng.uniform(6, 10, k)
    stroma = np.column_stack([s, sa_, sa_ / rng.uniform(2.5, 3.5, k), rng.uniform(0, np.pi, k),
                              rng.uniform(1.5, 2.0, k), np.zeros(k)])
    nuc = np.column_stack([epi[:, :2], a, b, orient, amp, irr])
    return {"follicles": fol, "nuclei": np.vstack([nuc, stroma]).astype(np.float32),
            "stroma_cells": 0.62 if cue_b else 0.5,
            "coarse": rng.normal(0, 1, (17, 17)).astype(np.float32),
            "fine": rng.normal(0, 1, (257, 257)).astype(np.float32)}


# ----------------------------------------------------------------------------- render

def _sample_grid(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray | None = None,
                 extent: tuple[float, float] = (FIELD, FIELD)) -> np.ndarray:
    """Bilinear sample of a noise grid spanning ``extent`` (height, width) px, at (rows x cols)
    scene coordinates (``cols`` defaults to ``rows``) -> world-consistent texture."""

    def index(coords, g, size):
        t = np.clip(coords / size * g, 0, g - 1e-4)
        i = t.astype(np.int64)
        return i, (t - i).astype(np.float32)

    i, f = index(rows, grid.shape[0] - 1, extent[0])
    j, h = (i, f) if cols is None else index(cols, grid.shape[1] - 1, extent[1])
    out = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return out[:, j] * (1 - h)[None, :] + out[:, j + 1] * h[None, :]


def _render(scene: dict, half: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin density maps (RENDER x RENDER) of the centred window of half-width ``half``."""
    x0 = FIELD / 2 - half
    return render_window(scene, x0, x0, 2 * half / RENDER, (RENDER, RENDER), rng)


def render_window(scene: dict, x0: float, y0: float, px: float, shape: tuple[int, int],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin density maps of shape (rows, cols) of a scene window.

    The window starts at scene coordinates (x0, y0) with ``px`` scene units per output
    pixel. ``scene`` is a dict of ``_make_scene`` (a 2048 px field) or a larger scene with
    the same keys (``histo_jax/slides/synthetic.py``): an optional ``extent`` (height,
    width) for its noise grids, and ``stroma_cells`` a number or a function
    ``(rows, cols) -> (len(rows), len(cols))`` of the scene coordinates.
    """
    ny, nx = shape
    ys = y0 + (np.arange(ny, dtype=np.float32) + 0.5) * px
    xs = x0 + (np.arange(nx, dtype=np.float32) + 0.5) * px
    extent = scene.get("extent", (FIELD, FIELD))
    texture = sum(w * _sample_grid(scene[name], ys, xs, extent)
                  for name, w in (("coarse", 0.15), ("fine", 0.1)))
    cells = scene["stroma_cells"]
    if callable(cells):
        cells = cells(ys, xs)
    eosin = cells * (1 + texture + 0.06 * rng.normal(0, 1, (ny, nx)))
    haem = np.full((ny, nx), 0.08, np.float32)

    # Follicles: cell band first, then colloid (optionally retracted from the wall).
    fol = scene["follicles"]
    for stage in ("band", "colloid"):
        for (x, y, r, asp, ang, colloid, retracted) in fol:
            reach = r + 16
            i0, i1 = np.searchsorted(ys, [y - reach, y + reach])
            j0, j1 = np.searchsorted(xs, [x - reach, x + reach])
            if i0 >= i1 or j0 >= j1:
                continue
            dy = ys[i0:i1, None] - y
            dx = xs[None, j0:j1] - x
            ca, sa = np.cos(ang), np.sin(ang)
            u, v = ca * dx + sa * dy, (-sa * dx + ca * dy) / asp
            q = np.sqrt(u * u + v * v) / r
            if stage == "band":
                band = q < 1 + 15.0 / r
                eosin[i0:i1, j0:j1][band] = 0.78
                haem[i0:i1, j0:j1][band] = 0.18
            else:
                inner = 1 - (6.0 / r if retracted else 0.0)
                region = eosin[i0:i1, j0:j1]
                region[q < 1] = 0.0  # Retraction gap (white) unless overwritten below.
                core = q < inner
                region[core] = colloid * (1 + 0.05 * rng.normal(0, 1, int(core.sum())))
                haem[i0:i1, j0:j1][q < 1] = 0.0

    # Nuclei: vectorised splats of soft irregular ellipses.
    nuc = scene["nuclei"]
    reach = nuc[:, 2] + 2 * px
    keep = ((nuc[:, 0] + reach > x0) & (nuc[:, 0] - reach < x0 + nx * px)
            & (nuc[:, 1] + reach > y0) & (nuc[:, 1] - reach < y0 + ny * px))
    nuc = nuc[keep]
    if len(nuc):
        size = int(np.ceil(2 * nuc[:, 2].max() / px)) + 3
        off = np.arange(size) - size // 2
        ci = np.floor((nuc[:, 1] - y0) / px).astype(np.int64)
        cj = np.floor((nuc[:, 0] - x0) / px).astype(np.int64)
        ii = ci[:, None, None] + off[None, :, None]
        jj = cj[:, None, None] + off[None, None, :]
        ii, jj = np.broadcast_arrays(ii, jj)
        dy = y0 + (ii + 0.5) * px - nuc[:, 1, None, None]
        dx = x0 + (jj + 0.5) * px - nuc[:, 0, None, None]
        ca, sa = np.cos(nuc[:, 4])[:, None, None], np.sin(nuc[:, 4])[:, None, None]
        u = (ca * dx + sa * dy) / nuc[:, 2, None, None]
        v = (-sa * dx + ca * dy) / nuc[:, 3, None, None]
        theta = np.arctan2(v, u)
        irr = nuc[:, 6, None, None]
        rho = np.sqrt(u * u + v * v) / (1 + irr * np.cos(3 * theta + nuc[:, 0, None, None]))
        soft = nuc[:, 3, None, None] / px
        cover = np.clip((1 - rho) * soft + 0.5, 0, 1)
        dens = nuc[:, 5, None, None] * cover * (0.85 + 0.3 * rng.random(cover.shape))
        ok = (ii >= 0) & (ii < ny) & (jj >= 0) & (jj < nx) & (cover > 0)
        np.add.at(haem, (ii[ok], jj[ok]), dens[ok])
    return np.clip(haem, 0, 3.5), np.clip(eosin, 0, 1.5)


def _to_rgb(haem: np.ndarray, eosin: np.ndarray, stain: np.ndarray,
            site: Site = SITES["a"]) -> np.ndarray:
    h_vec, e_vec = _HAEM, _EOSIN
    if site != SITES["a"]:
        h_vec = np.asarray(site.haem, np.float32) * np.float32(site.strength[0])
        e_vec = np.asarray(site.eosin, np.float32) * np.float32(site.strength[1])
    od = haem[..., None] * (h_vec * stain[0]) + eosin[..., None] * (e_vec * stain[1])
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def stain_to_rgb(haem: np.ndarray, eosin: np.ndarray, stain: Sequence[float]) -> np.ndarray:
    """uint8 RGB of haematoxylin / eosin density maps (Beer-Lambert), stain strengths (h, e)."""
    return _to_rgb(haem, eosin, np.asarray(stain, np.float32))


def sample_cues(seed: int, sample: int, label: int) -> tuple[bool, bool]:
    """(atypia, architecture) cue flags of a sample, without rendering it."""
    u = np.random.default_rng([seed, sample]).random(2)
    return bool(u[0] < CUE_PROB[label]), bool(u[1] < CUE_PROB[label])


def render_sample(seed: int, sample: int, label: int, stain: Sequence[float],
                  sizes: Sequence[int] = (256, 512, 1024, 2048), site: Site = SITES["a"]
                  ) -> tuple[dict[int, np.ndarray], bool, bool]:
    """Renders one sample: ({size: uint8 (size, size, 3) centre crop}, cue_a, cue_b), as
    ``site`` stains and scans it."""
    rng = np.random.default_rng([seed, sample])
    cue_a, cue_b = (bool(u < CUE_PROB[label]) for u in rng.random(2))  # As sample_cues().
    scene = _make_scene(rng, cue_a, cue_b)
    stain = np.asarray(stain, np.float32)
    canvas = None
    for window in (2048, 1024, 512, 256):  # Coarse to fine; finer layers overwrite the centre.
        layer = _to_rgb(*_render(scene, window / 2, rng), stain, site)
        img = Image.fromarray(layer)
        if window != RENDER:
            img = img.resize((window, window), Image.NEAREST)  # Cheap to encode; see docstring.
        if canvas is None:
            canvas = img
        else:
            corner = (FIELD - window) // 2
            canvas.paste(img, (corner, corner))
    full = np.asarray(canvas)
    crops = {}
    for s in sizes:
        o = (FIELD - s) // 2
        crops[s] = full[o:o + s, o:o + s]
    return crops, cue_a, cue_b


def _write_sample(args) -> tuple[str, bool, bool]:
    out_dir, seed, sample, name, label, stain, sizes, site = args
    crops, cue_a, cue_b = render_sample(seed, sample, label, stain, sizes, site)
    for s, crop in crops.items():
        Image.fromarray(crop).save(os.path.join(out_dir, f"high_mag_{s}", name + ".png"), compress_level=1)
    return name, cue_a, cue_b


def demo_plan(seed: int, num_ids: int, samples_per_id: int, first_num_id: int = 101
              ) -> list[tuple[str, int, tuple[float, float]]]:
    """(file stem, label, stain strengths) of every sample; labels balanced over num_ids."""
    rng = np.random.default_rng([seed, 2**31])
    labels = np.array([i % 2 for i in range(num_ids)])
    rng.shuffle(labels)
    plan = []
    for i, label in enumerate(labels):
        num_id = first_num_id + i
        token = "normal" if label == 0 else TUMOUR_TYPES[rng.integers(len(TUMOUR_TYPES))]
        stain = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
        for k in range(samples_per_id):
            plan.append((f"{num_id}_{k}_{token}", int(label), stain))
    return plan


def write_demo_dataset(out_dir: str, *, seed: int = 0, num_ids: int = 40, samples_per_id: int = 6,
                       sizes: Sequence[int] = (256, 512, 1024, 2048), labels_file: str = "labels.csv",
                       num_processes: int | None = None, site: str = "a") -> dict:
    """Writes the synthetic demo dataset (layout of the original project) into ``out_dir``,
    as ``site`` ('a': the default dataset, 'b': other patients and staining; see SITES).

    Returns a summary: out_dir, num_samples, num_ids, class counts, per-sample cue flags
    and the generation time. Refuses to write into a folder that already holds a
    different dataset (an existing ``labels_file``).
    """
    bad = [s for s in sizes if s not in (256, 512, 1024, 2048)]
    if bad:
        raise ValueError(f"write_demo_dataset: sizes must be among 256, 512, 1024, 2048; got {bad}.")
    if num_ids < 2 or samples_per_id < 1:
        raise ValueError("write_demo_dataset: need num_ids >= 2 (both classes) and samples_per_id >= 1.")
    labels_path = os.path.join(out_dir, labels_file)
    if os.path.exists(labels_path):
        raise FileExistsError(
            f"{labels_path} already exists: write the demo dataset into a new or empty folder "
            "(refusing to mix it with existing data).")
    start = time.time()
    for s in sizes:
        os.makedirs(os.path.join(out_dir, f"high_mag_{s}"), exist_ok=True)
    if site not in SITES:
        raise ValueError(f"write_demo_dataset: site must be one of {sorted(SITES)}; got {site!r}.")
    st = SITES[site]
    seed = seed + st.seed_offset
    plan = demo_plan(seed, num_ids, samples_per_id, st.first_num_id)
    jobs = [(out_dir, seed, i, name, label, stain, tuple(sizes), st)
            for i, (name, label, stain) in enumerate(plan)]
    workers = num_processes or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # Safe when the caller has started JAX threads.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_write_sample, jobs, chunksize=4))
    else:
        results = [_write_sample(job) for job in jobs]
    with open(labels_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        for name, label, _ in plan:
            writer.writerow([name, label])
    labels = np.array([label for _, label, _ in plan])
    return {
        "out_dir": out_dir,
        "num_samples": len(plan),
        "num_ids": num_ids,
        "site": site,
        "class_counts": {"normal": int((labels == 0).sum()), "tumour": int((labels == 1).sum())},
        "cues": {name: {"atypia": a, "architecture": b} for name, a, b in results},
        "seconds": round(time.time() - start, 2),
    }


def write_demo_sites(out_dir: str, num_sites: int = 2, **kwargs) -> dict:
    """Writes sites a, b, ... of the demo dataset into ``out_dir/site_a``, ``out_dir/site_b``."""
    names = sorted(SITES)[:num_sites]
    if not 1 <= num_sites <= len(SITES):
        raise ValueError(f"write_demo_sites: num_sites must be 1..{len(SITES)}; got {num_sites}.")
    return {n: write_demo_dataset(os.path.join(out_dir, f"site_{n}"), site=n, **kwargs)
            for n in names}


def save_preview(path: str, *, seed: int = 0, tile: int = 224) -> None:
    """Saves the 4 crops (256 -> 2048) of a normal sample without cues and a tumour sample
    with both cues, from the default demo dataset of ``seed``."""
    rows = []
    plan = demo_plan(seed, 40, 6)
    cues = [sample_cues(seed, i, label) for i, (_, label, _) in enumerate(plan)]
    for want, want_cues in ((0, (False, False)), (1, (True, True))):
        sample = next(i for i, (_, label, _) in enumerate(plan) if label == want and cues[i] == want_cues)
        name, label, stain = plan[sample]
        crops, a, b = render_sample(seed, sample, label, stain)
        rows.append((f"{name}  (label {label}; atypia={a}, architecture={b})", crops))
    pad, head = 8, 22
    canvas = Image.new("RGB", (4 * tile + 5 * pad, 2 * (tile + head) + 3 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, crops) in enumerate(rows):
        y = pad + r * (tile + head + pad)
        draw.text((pad, y + 4), title, fill="black")
        for c, s in enumerate((256, 512, 1024, 2048)):
            img = Image.fromarray(crops[s]).resize((tile, tile), Image.BILINEAR)
            canvas.paste(img, (pad + c * (tile + pad), y + head))
            draw.text((pad + c * (tile + pad) + 4, y + head + 4), f"{s} px", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
