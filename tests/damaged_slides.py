"""A catalogue of damaged and hostile slide files, made from one good pyramidal TIFF.

``build(root, good)`` writes each case under ``root`` and returns ``{case: (path, reason)}``:
``reason`` is a fragment of the line histo_jax must print for it, or None for a file that is
damaged but still readable, and must be read correctly. Used by
tests/test_damaged_slides.py (extract and predict --slides); importable by the isolated
reader's worker processes.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import tifffile


def _copy(good: str, path: str) -> str:
    shutil.copyfile(good, path)
    return path


def _truncated(good: str, path: str, fraction: float) -> str:
    data = open(good, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return path


def _overwrite_tag(path: str, page: int, tag: str, value) -> None:
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[page].tags[tag].overwrite(value)


def build(root: str, good: str) -> dict[str, tuple[str, str]]:
    os.makedirs(root, exist_ok=True)
    p = lambda name: os.path.join(root, name)  # noqa: E731
    size = os.path.getsize(good)
    with tifffile.TiffFile(good) as tif:
        offsets = list(tif.pages[0].dataoffsets)
        counts = list(tif.pages[0].databytecounts)
    cases = {}

    trunc = "unreadable or truncated TIFF (image data runs past the end of the file"
    cases["truncated_header"] = (_truncated(good, p("truncated_header.tiff"), 0.001), trunc)
    cases["truncated_half"] = (_truncated(good, p("truncated_half.tiff"), 0.5), trunc)
    cases["truncated_last_tile"] = (_truncated(good, p("truncated_last_tile.tiff"), 0.995),
                                    trunc)
    cases["empty"] = (p("empty.svs"), "empty file")
    open(cases["empty"][0], "wb").close()

    # One tile of level 0, in the tissue, with its compressed bytes replaced by garbage.
    path = _copy(good, p("bad_tile_data.tiff"))
    k = len(offsets) // 2
    with open(path, "r+b") as f:
        f.seek(offsets[k])
        f.write(np.random.default_rng(0).integers(0, 256, counts[k], np.uint8).tobytes())
    cases["bad_tile_data"] = (path, "ZIPDecode: Decoding error")

    path = _copy(good, p("offset_past_eof.tiff"))
    _overwrite_tag(path, 0, "TileOffsets",
                   tuple(o if i != k else size + 10**6 for i, o in enumerate(offsets)))
    cases["offset_past_eof"] = (path, "Read error")

    path = _copy(good, p("zero_size_level.tiff"))
    _overwrite_tag(path, 1, "ImageWidth", 0)
    cases["zero_size_level"] = (path, None)  # OpenSlide drops the empty level: read the others

    path = _copy(good, p("huge_dimensions.tiff"))
    _overwrite_tag(path, 0, "ImageWidth", 1_000_000)
    _overwrite_tag(path, 0, "ImageLength", 1_000_000)
    cases["huge_dimensions"] = (path, "OpenSlide cannot read this TIFF (Invalid TIFF")

    path = p("not_a_slide.svs")
    with open(path, "wb") as f:
        f.write(b"<html>this is a web page saved with a slide's name</html>\n" * 50)
    cases["not_a_slide"] = (path, "not a .svs slide")

    path = p("png_named_tiff.tiff")
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 100, 150)).save(path, format="PNG")
    cases["png_named_tiff"] = (path, "not a .tiff slide")

    os.makedirs(p("folder.svs"))
    cases["directory_named_svs"] = (p("folder.svs"), "folder holds no slide file")

    os.symlink(p("gone.tiff"), p("dangling_link.tiff"))
    cases["dangling_link"] = (p("dangling_link.tiff"), "no such file")

    path = _copy(good, p("no_permission.tiff"))
    os.chmod(path, 0)
    cases["no_permission"] = (path, "permission denied: the file is not readable (mode 000)")
    return cases


def crash_probe(path: str):
    """A probe that crashes its process (as a segfault in a decoder would) for files named
    ``*crash*``, sleeps for ``*hang*``, and probes the others normally."""
    import time

    from histo_jax.slides import reader

    if "crash" in os.path.basename(path):
        os.abort()
    if "hang" in os.path.basename(path):
        time.sleep(600)
    return reader.probe(path)
