"""Whole-slide reading with OpenSlide (the ``openslide-python`` + ``openslide-bin`` wheels).

``open_slide(path)`` returns a :class:`Slide`; every failure is a :class:`SlideError`
naming the file and saying what is wrong (missing, unsupported format, unreadable or
truncated, no resolution when one is needed). ``Slide.read_field`` reads one square
field of view around a level-0 centre (docs/reference.md §6) from the pyramid level that fits the
stored size, and resizes it (antialiased bilinear, as the training pipeline resizes).

Formats are OpenSlide's: Aperio ``.svs``, Hamamatsu ``.ndpi`` / ``.vms`` / ``.vmu``,
Leica ``.scn``, MIRAX ``.mrxs``, Philips ``.tiff``, Sakura ``.svslide``, Ventana
``.bif``, DICOM ``.dcm``, and generic tiled pyramidal TIFF (``.tif`` / ``.tiff``).
OpenSlide handles are thread-safe: one :class:`Slide` serves every reader thread.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from typing import Iterable, Sequence

import numpy as np
import openslide
import tifffile
from PIL import Image, ImageFile  # noqa: F401 - ImageFile: see below

from histo_jax.slides import geometry

# PIL imports its plugins and helpers (ImageFile, PngImagePlugin, ...) on first use, from
# whichever thread gets there first; done here, at import time (tests/test_threads.py).
Image.init()

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                    ".svslide", ".bif", ".dcm")
MAX_OVERVIEW_PIXELS = 400_000_000  # Largest level read whole for an overview.
# Declared level-0 pixels per byte of file above which a slide is taken as damaged: real
# slides hold about 1-50 (JPEG tiles; glass compresses further), never thousands.
MAX_PIXELS_PER_BYTE = 2000
BACKGROUND = 255  # Fill (white, like glass) of transparent pixels: outside the slide or scan.


class InputError(Exception):
    """A user file that cannot be used; ``str()`` is ``'<path>: <reason>'``."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class SlideError(InputError):
    """A slide that cannot be used (missing, unsupported, unreadable, truncated, no mpp)."""


def slide_name(path: str) -> str:
    """The slide's name: its file name without extension (``A.svs`` -> ``A``)."""
    base = os.path.basename(os.path.normpath(path))
    return os.path.splitext(base)[0]


def find_slides(paths: Iterable[str]) -> tuple[list[str], list[SlideError]]:
    """Slide files of ``paths`` (files, or folders scanned for slide extensions, not
    recursively). Returns (sorted unique files, errors for paths that are neither).

    A file is taken whatever its extension (opening it says whether OpenSlide reads it).
    """
    files, errors = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(SLIDE_EXTENSIONS) and os.path.isfile(os.path.join(p, f)))
            if not found:
                errors.append(SlideError(p, f"folder holds no slide file ({', '.join(SLIDE_EXTENSIONS)})"))
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            errors.append(SlideError(p, "no such file or folder"))
    seen, unique = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, errors


def _diagnose(path: str, message: str) -> str:
    """Why OpenSlide refused ``path``: truncated / corrupt TIFF, untiled TIFF, not a slide."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read the file ({e.strerror})"
    ext = os.path.splitext(path)[1].lower()
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes): unreadable or truncated slide"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        quiet = logging.getLogger("tifffile")
        level, quiet.level = quiet.level, logging.CRITICAL  # its warnings repeat ours
        try:
            size = os.path.getsize(path)
            with tifffile.TiffFile(path) as tif:
                pages = list(tif.pages)
                for page in pages:
                    ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                    if ends and max(ends) > size:
                        raise ValueError(f"image data runs past the end of the file ({size} bytes)")
        except Exception as e:  # noqa: BLE001 - any tifffile failure means a damaged file
            return f"unreadable or truncated TIFF ({e})"
        finally:
            quiet.level = level
        if not any(p.is_tiled for p in pages):
            return ("a TIFF without tiles: OpenSlide reads tiled pyramidal TIFFs only (convert it, "
                    "e.g. `vips tiffsave IN OUT.tiff --tile --pyramid --compression jpeg`)")
        return f"OpenSlide cannot read this TIFF ({message})"
    if ext not in SLIDE_EXTENSIONS:
        return (f"unsupported format ({ext or 'no extension'}): not a whole-slide format OpenSlide "
                f"reads ({', '.join(SLIDE_EXTENSIONS)})")
    return f"unreadable or truncated slide, or not a {ext} slide (OpenSlide: {message})"


def _file_state(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _check_readable(path: str, mode: int) -> None:
    """Permission: as the OS says, and for root (who may read anything) as the mode says."""
    if not os.access(path, os.R_OK) or not mode & 0o444:
        raise SlideError(path, f"permission denied: the file is not readable (mode "
                         f"{mode & 0o777:03o}); fix its permissions or leave it out")


def _check_geometry(path: str, dims, downsamples, size: int) -> None:
    """Levels of zero size, or more pixels than the file could possibly hold: damaged."""
    for k, (w, h) in enumerate(dims):
        if w <= 0 or h <= 0:
            raise SlideError(path, f"damaged slide: pyramid level {k} has zero size ({w} x {h})")
    pixels = dims[0][0] * dims[0][1]
    size = max(1, size)
    if pixels > MAX_PIXELS_PER_BYTE * size:
        raise SlideError(path, f"damaged slide: it declares {dims[0][0]} x {dims[0][1]} pixels "
                         f"in a {size}-byte file, far more than the file can hold")
    if any(not np.isfinite(d) or d <= 0 for d in downsamples):
        raise SlideError(path, f"damaged slide: invalid level downsamples {downsamples}")


class Slide:
    """An open slide: level-0 size, pyramid, resolution, and field reads."""

    def __init__(self, path: str, mpp: float | None = None):
        self.path = path
        self.name = slide_name(path)
        if not os.path.isfile(path):
            raise SlideError(path, "no such file")
        st = os.stat(path)
        _check_readable(path, st.st_mode)
        self._stat = _file_state(st)
        try:
            self._osr = openslide.OpenSlide(path)
        except openslide.OpenSlideError as e:
            raise SlideError(path, _diagnose(path, str(e))) from None
        try:
            self.width, self.height = self._osr.dimensions
            self.level_dimensions = tuple(self._osr.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
            _check_geometry(path, self.level_dimensions, self.level_downsamples, st.st_size)
        except SlideError:
            self._osr.close()
            raise
        props = self._osr.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "")
        meta = []
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            try:
                meta.append(float(props[key]))
            except (KeyError, ValueError):
                pass
        meta_mpp = float(np.mean(meta)) if len(meta) == 2 and min(meta) > 0 else None
        self.metadata_mpp = meta_mpp
        self.mpp = float(mpp) if mpp else meta_mpp
        self.mpp_source = "--mpp" if mpp else ("metadata" if meta_mpp else "")
        self._errors = openslide.OpenSlideError

    def __repr__(self) -> str:
        return (f"Slide({self.path!r}, {self.width}x{self.height}, levels {self.level_downsamples}, "
                f"mpp {self.mpp})")

    def close(self) -> None:
        self._osr.close()

    def check_unchanged(self) -> None:
        """Raises SlideError if the file was replaced or modified since it was opened (its
        crops would then mix two files)."""
        try:
            now = _file_state(os.stat(self.path))
        except OSError as e:
            raise SlideError(self.path, f"the file went away while it was read ({e.strerror})"
                             ) from None
        if now != self._stat:
            raise SlideError(self.path, "the file changed while it was read (size, time or "
                             "inode differ): its crops are not used; rerun once it is stable")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            region = self._osr.read_region(location, level, size)
        except self._errors as e:
            raise SlideError(self.path, f"unreadable or truncated slide: reading level {level} at "
                             f"{location} failed (OpenSlide: {e})") from None
        return _to_rgb(region)

    def read_field(self, x: int, y: int, fov: int, size: int | None = None,
                   pyramid: bool = True) -> np.ndarray:
        """uint8 (size, size, 3) crop of the ``fov`` px field centred on level-0 (x, y).

        ``size`` None stores the field at level 0 (``fov`` px, no resize). Otherwise the
        field is read from the coarsest level whose downsample does not exceed
        ``fov / size`` (level 0 when ``pyramid`` is False: the naive way), then resized to
        ``size`` with PIL's antialiased bilinear filter. Outside the slide the crop is
        white (``BACKGROUND``).
        """
        size = fov if size is None else int(size)
        level = geometry.read_plan(fov, size, self.level_downsamples, pyramid)
        ds = self.level_downsamples[level]
        x0, y0 = int(x) - fov // 2, int(y) - fov // 2
        loc, wsize, box = geometry.level_window(x0, y0, fov, ds)
        img = self._read(loc, level, wsize)
        if img.size == (size, size) and box == (0.0, 0.0, float(size), float(size)):
            return np.asarray(img)
        return np.asarray(img.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None))

    def field_level(self, fov: int, size: int | None, pyramid: bool = True) -> int:
        """The pyramid level :meth:`read_field` reads ``fov`` from."""
        return geometry.read_plan(fov, fov if size is None else size, self.level_downsamples, pyramid)

    def thumbnail(self, downsample: float, max_side: int | None = None
                  ) -> tuple[np.ndarray, tuple[float, float]]:
        """uint8 RGB overview at about ``downsample`` level-0 px per pixel (at most
        ``max_side`` px on the long side); returns (image, (downsample x, downsample y))."""
        w = max(1, int(round(self.width / downsample)))
        h = max(1, int(round(self.height / downsample)))
        if max_side and max(w, h) > max_side:
            f = max_side / max(w, h)
            w, h = max(1, int(round(w * f))), max(1, int(round(h * f)))
        # The coarsest level not coarser than needed, read whole, then resized (OpenSlide's
        # get_thumbnail does the same, but composites on the slide's background property).
        level = geometry.read_plan(min(self.width / w, self.height / h), 1, self.level_downsamples)
        lw, lh = self.level_dimensions[level]
        if lw * lh > MAX_OVERVIEW_PIXELS:
            raise SlideError(self.path, f"no pyramid level small enough for an overview (the "
                             f"closest is {lw} x {lh} px): convert the slide to a pyramidal format, "
                             "e.g. `vips tiffsave IN OUT.tiff --tile --pyramid --compression jpeg`")
        img = self._read((0, 0), level, (lw, lh))
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR, reducing_gap=None)
        return np.asarray(img), (self.width / w, self.height / h)


def _to_rgb(region: Image.Image) -> Image.Image:
    """OpenSlide's RGBA (transparent outside the scanned area) -> RGB on white."""
    alpha = region.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return region.convert("RGB")
    white = Image.new("RGBA", region.size, (BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(white, region).convert("RGB")


PROBE_TIMEOUT_S = 300.0
PROBE_WINDOW = 64  # px read at the centre of every level


def probe(path: str) -> str | None:
    """Opens ``path`` and decodes a sample of it: a window at the centre of every level and
    the coarsest level whole (what the overview reads). None if that works, else the reason
    (a :class:`SlideError`'s)."""
    try:
        with Slide(path) as s:
            for k, (w, h) in enumerate(s.level_dimensions):
                ds = s.level_downsamples[k]
                cw, ch = min(w, PROBE_WINDOW), min(h, PROBE_WINDOW)
                s._read((int((w - cw) / 2 * ds), int((h - ch) / 2 * ds)), k, (cw, ch))
            w, h = s.level_dimensions[-1]
            if w * h <= MAX_OVERVIEW_PIXELS:
                s._read((0, 0), len(s.level_dimensions) - 1, (w, h))
    except SlideError as e:
        return e.reason
    return None


class IsolatedProbe:
    """Runs :func:`probe` in a separate worker process (``python -m
    histo_jax.slides.probe_worker``, started once and reused), so that a file that crashes or
    hangs OpenSlide's decoders costs that slide, not the calling process; a slide that
    passes is then read in-process. ``probe_fn`` ('module:function', default this module's
    :func:`probe`) is what the worker calls."""

    def __init__(self, probe_fn: str = "", timeout: float = PROBE_TIMEOUT_S):
        self._fn, self._timeout, self._proc = probe_fn, timeout, None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or "." for p in sys.path))
        cmd = [sys.executable, "-m", "histo_jax.slides.probe_worker"] + (
            [self._fn] if self._fn else [])
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)

    def __call__(self, path: str) -> str | None:
        if self._proc is None:
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write(json.dumps(os.path.abspath(path)) + "\n")
            proc.stdin.flush()
        except OSError:  # the worker died before it could take the path
            pass
        ready, _, _ = select.select([proc.stdout], [], [], self._timeout)
        line = proc.stdout.readline() if ready else None
        if line:
            return json.loads(line)["reason"]
        self._stop()
        if line is None:
            return f"reading it did not finish within {self._timeout:g} s; it is left out"
        code = proc.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return (f"reading it crashed the isolated reader process ({how}): a damaged or hostile "
                "file OpenSlide cannot decode; it is left out")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the worker ends at end of input
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_slide(path: str, mpp: float | None = None) -> Slide:
    """Opens ``path`` (raises :class:`SlideError`); ``mpp`` overrides the metadata."""
    return Slide(path, mpp)


def check_unique_names(paths: Sequence[str]) -> None:
    """Slides are known by name (file name without extension): two files may not share one."""
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(slide_name(p), []).append(p)
    dup = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if dup:
        listing = "; ".join(f"{n}: {', '.join(ps)}" for n, ps in dup.items())
        raise ValueError(f"slides are known by file name without extension, and these share one "
                         f"({listing}): rename or give them in separate runs")
