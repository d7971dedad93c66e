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

import logging
import os
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


class Slide:
    """An open slide: level-0 size, pyramid, resolution, and field reads."""

    def __init__(self, path: str, mpp: float | None = None):
        self.path = path
        self.name = slide_name(path)
        if not os.path.isfile(path):
            raise SlideError(path, "no such file")
        try:
            self._osr = openslide.OpenSlide(path)
        except openslide.OpenSlideError as e:
            raise SlideError(path, _diagnose(path, str(e))) from None
        self.width, self.height = self._osr.dimensions
        self.level_dimensions = tuple(self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
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
