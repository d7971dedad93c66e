"""Small valid and malformed datasets in the original layout, for tests.

``write_valid_dataset(root)`` writes tiny crops (40..96 px) in the four reference
scale folders plus ``labels.csv``; ``MALFORMED[name](root)`` then breaks a valid
dataset in one way and returns what validation must report (``Expect``).
``tiny_data_config()`` is the matching data config (image_size 32).
"""
from __future__ import annotations

import csv
import dataclasses
import os
import struct
import zlib
from typing import Callable

import numpy as np
from PIL import Image

from histo_jax.data.config import REFERENCE_SCALES, get_data_config

# Small crop sizes per reference folder (the real ones are 1024, 2048, 512, 256 px).
TINY_SIZES = {"high_mag_1024": 64, "high_mag_2048": 96, "high_mag_512": 48, "high_mag_256": 40}


def tiny_data_config(data_dir: str = "", **overrides):
    """The reference data config with image_size 32 and the given overrides."""
    cfg = get_data_config()
    cfg.dir = data_dir
    cfg.image_size = 32
    cfg.num_workers = 2
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def sample_name(num_id: int, k: int, label: int) -> str:
    return f"{num_id:03d}_{k}_{'pap' if label else 'normal'}"


def random_crop(rng: np.random.Generator, size: int, mode: str = "RGB") -> Image.Image:
    """A smooth-ish random RGB crop (compresses a little, like tissue)."""
    small = rng.integers(0, 256, size=(max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    return im if mode == "RGB" else im.convert(mode)


def write_valid_dataset(root: str, *, num_ids: int = 10, per_id: int = 2, seed: int = 0,
                        scales=REFERENCE_SCALES, sizes: dict | None = None,
                        labels_file: str = "labels.csv", write_labels: bool = True
                        ) -> list[tuple[str, int]]:
    """Writes ``num_ids`` x ``per_id`` samples (half the num_ids tumour); returns the rows."""
    sizes = sizes or TINY_SIZES
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(num_ids):
        label = n % 2
        for k in range(per_id):
            rows.append((sample_name(n, k, label), label))
    for scale in scales:
        os.makedirs(os.path.join(root, scale), exist_ok=True)
        for name, _ in rows:
            random_crop(rng, sizes[scale]).save(os.path.join(root, scale, name + ".png"),
                                                compress_level=1)
    if write_labels:
        write_labels_csv(os.path.join(root, labels_file), rows)
    return rows


def write_labels_csv(path: str, rows, header=("filename", "label")) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def read_rows(root: str, labels_file: str = "labels.csv") -> list[list[str]]:
    with open(os.path.join(root, labels_file), newline="") as f:
        return list(csv.reader(f))[1:]


def write_png16_rgb(path: str, size: int) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow can read but not write these)."""
    data = (np.arange(size * size * 3, dtype=np.uint16).reshape(size, size, 3) * 37).astype(">u2")
    raw = b"".join(b"\x00" + data[y].tobytes() for y in range(size))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + tag + body
                + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))


@dataclasses.dataclass(frozen=True)
class Expect:
    """What validation must report: issue kind, severity and a text naming the file."""

    kind: str
    severity: str
    names: str


def _first(root: str) -> str:
    return read_rows(root)[0][0]


def _path(root: str, scale: str, name: str) -> str:
    return os.path.join(root, scale, name + ".png")


def _labels(transform: Callable[[list[list[str]]], list[list[str]]], header=("filename", "label")):
    def apply(root: str) -> list[list[str]]:
        rows = transform(read_rows(root))
        write_labels_csv(os.path.join(root, "labels.csv"), rows, header)
        return rows
    return apply


def _mal_missing_labels(root):
    os.remove(os.path.join(root, "labels.csv"))
    return Expect("missing_labels_file", "error", "labels.csv")


def _mal_bad_columns(root):
    _labels(lambda r: r, header=("file", "label"))(root)
    return Expect("labels_format", "error", "filename")


def _mal_label_text(root):
    rows = _labels(lambda r: [[r[0][0], "tumour"]] + r[1:])(root)
    return Expect("bad_label", "error", rows[0][0])


def _mal_label_range(root):
    rows = _labels(lambda r: r[:1] + [[r[1][0], "7"]] + r[2:])(root)
    return Expect("bad_label", "error", rows[1][0])


def _mal_duplicate(root):
    rows = _labels(lambda r: r + [r[2]])(root)
    return Expect("duplicate_filename", "error", rows[2][0])


def _mal_missing_file(root):
    name = _first(root)
    os.remove(_path(root, "high_mag_512", name))
    return Expect("missing_file", "error", f"high_mag_512/{name}.png")


def _mal_missing_folder(root):
    os.rename(os.path.join(root, "high_mag_256"), os.path.join(root, "other_256"))
    return Expect("missing_scale_folder", "error", "high_mag_256")


def _mal_truncated(root):
    name = _first(root)
    path = _path(root, "high_mag_2048", name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return Expect("unreadable_image", "error", f"high_mag_2048/{name}.png")


def _mal_garbage(root):
    name = _first(root)
    with open(_path(root, "high_mag_1024", name), "wb") as f:
        f.write(b"this is not a png")
    return Expect("unreadable_image", "error", f"high_mag_1024/{name}.png")


def _mode_case(mode: str, kind: str, severity: str, scale: str = "high_mag_1024",
               alpha: int | None = None):
    def apply(root):
        name = _first(root)
        im = random_crop(np.random.default_rng(1), TINY_SIZES[scale])
        if mode == "RGBA":
            im = im.convert("RGBA")
            im.putalpha(alpha)
        elif mode == "P":
            im = im.convert("P", palette=Image.ADAPTIVE)
        else:
            im = im.convert(mode)
        im.save(_path(root, scale, name))
        return Expect(kind, severity, f"{scale}/{name}.png")
    return apply


def _mal_16bit(root):
    name = _first(root)
    write_png16_rgb(_path(root, "high_mag_512", name), TINY_SIZES["high_mag_512"])
    return Expect("unsupported_mode", "error", f"high_mag_512/{name}.png")


def _mal_gray16(root):
    name = _first(root)
    arr = np.full((40, 40), 1000, dtype=np.uint16)
    Image.fromarray(arr).save(_path(root, "high_mag_256", name))
    return Expect("unsupported_mode", "error", f"high_mag_256/{name}.png")


def _mal_not_square(root):
    name = _first(root)
    crop = random_crop(np.random.default_rng(2), 64).resize((64, 48))
    crop.save(_path(root, "high_mag_1024", name))
    return Expect("not_square", "error", f"high_mag_1024/{name}.png")


def _mal_size_mismatch(root):
    name = _first(root)
    random_crop(np.random.default_rng(3), 50).save(_path(root, "high_mag_2048", name))
    return Expect("size_mismatch", "error", f"high_mag_2048/{name}.png")


def _mal_empty(root):
    _labels(lambda r: [])(root)
    return Expect("empty_dataset", "error", root)


def _mal_too_few(root):
    # Keep every normal num_id but only two tumour ones.
    def keep(rows):
        tumour_ids = sorted({r[0].split("_")[0] for r in rows if r[1] == "1"})[:2]
        return [r for r in rows if r[1] == "0" or r[0].split("_")[0] in tumour_ids]
    _labels(keep)(root)
    return Expect("too_few_num_ids", "error", "tumour")


def _mal_unlabelled(root):
    random_crop(np.random.default_rng(4), 64).save(_path(root, "high_mag_1024", "999_0_normal"))
    return Expect("unlabelled_file", "warning", "999_0_normal.png")


MALFORMED: dict[str, Callable[[str], Expect]] = {
    "missing_labels_file": _mal_missing_labels,
    "labels_bad_columns": _mal_bad_columns,
    "label_not_integer": _mal_label_text,
    "label_out_of_range": _mal_label_range,
    "duplicate_filename": _mal_duplicate,
    "missing_file": _mal_missing_file,
    "missing_scale_folder": _mal_missing_folder,
    "truncated_image": _mal_truncated,
    "garbage_image": _mal_garbage,
    "grayscale": _mode_case("L", "unsupported_mode", "error"),
    "rgba_transparent": _mode_case("RGBA", "unsupported_mode", "error", alpha=128),
    "rgb_16bit": _mal_16bit,
    "gray_16bit": _mal_gray16,
    "palette_converted": _mode_case("P", "converted_mode", "warning"),
    "rgba_opaque_converted": _mode_case("RGBA", "converted_mode", "warning", alpha=255),
    "not_square": _mal_not_square,
    "size_mismatch": _mal_size_mismatch,
    "empty_dataset": _mal_empty,
    "too_few_num_ids": _mal_too_few,
    "unlabelled_file": _mal_unlabelled,
}
