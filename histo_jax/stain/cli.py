"""``python -m histo_jax.data stain fit|apply``: fit a normaliser once, apply it to a layout.

  stain fit   --ref IMAGE|DIR|SLIDE [...] --method macenko|reinhard --out stain.json
              pools the pixels of the reference images (a folder: its images, evenly chosen,
              at most --max_images; a slide: --max_fields tissue fields of --fov level-0 px
              read at --size px, as extract reads them)
  stain apply --stain stain.json --data_dir DIR --out DIR2
              writes DIR's layout normalised into DIR2 (labels and other files copied)
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

from histo_jax.stain import normalize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def add_parser(sub) -> None:
    p = sub.add_parser("stain", help="fit a stain normaliser, or apply one to a dataset folder")
    ss = p.add_subparsers(dest="stain_command", required=True)
    f = ss.add_parser("fit", help="fit a stain normaliser to reference tissue")
    f.add_argument("--ref", nargs="+", required=True, metavar="IMAGE|DIR|SLIDE",
                   help="reference images, folders of images, or whole slides")
    f.add_argument("--method", choices=normalize.METHODS, default="macenko")
    f.add_argument("--out", required=True, help="the stain file to write (e.g. stain.json)")
    f.add_argument("--max_images", type=int, default=64, help="per folder (default: %(default)s)")
    f.add_argument("--fov", type=int, default=1024, help="slides: field of view, level-0 px")
    f.add_argument("--size", type=int, default=224, help="slides: px a field is read at")
    f.add_argument("--max_fields", type=int, default=32, help="slides: tissue fields per slide")
    f.add_argument("--io", type=float, default=normalize.DEFAULT_IO,
                   help="transmitted light intensity (default: %(default)s)")
    f.add_argument("--alpha", type=float, default=normalize.DEFAULT_ALPHA,
                   help="Macenko angle percentile (default: %(default)s)")
    f.add_argument("--beta", type=float, default=normalize.DEFAULT_BETA,
                   help="OD threshold of tissue pixels (default: %(default)s)")
    a = ss.add_parser("apply", help="write a dataset folder normalised into a new folder")
    a.add_argument("--stain", required=True, help="a fitted stain file")
    a.add_argument("--data_dir", required=True, help="the dataset folder (scale folders + labels)")
    a.add_argument("--out", required=True, help="a new or empty folder")
    a.add_argument("--min_tissue", type=float, default=0.02,
                   help="smaller tissue fraction: the image is copied unchanged (default: %(default)s)")
    a.add_argument("--max_angle", type=float, default=30.0,
                   help="Macenko: largest angle to the reference stain vectors, degrees")
    a.add_argument("--workers", type=int, default=4, help="threads (default: %(default)s)")


def read_rgb(path: str) -> np.ndarray:
    """A reference image as uint8 (H, W, 3); StainError for non-RGB or unreadable files."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA")
                mode = "RGBA"
            if mode == "RGBA":
                alpha = np.asarray(img.getchannel("A"))
                if alpha.min() < 255:
                    raise normalize.StainError(
                        f"{path}: has transparent pixels (RGBA); give an opaque RGB image.")
                img = img.convert("RGB")
            elif mode != "RGB":
                raise normalize.StainError(
                    f"{path}: is a {mode} image, not RGB: stain estimation needs a colour (RGB) "
                    "H&E image.")
            return np.asarray(img)
    except normalize.StainError:
        raise
    except (OSError, ValueError) as e:
        raise normalize.StainError(f"{path}: cannot be read as an image ({e}).") from None


def _is_slide(path: str) -> bool:
    from histo_jax.slides.reader import SLIDE_EXTENSIONS  # noqa: PLC0415

    ext = os.path.splitext(path)[1].lower()
    if ext not in SLIDE_EXTENSIONS:
        return False
    if ext not in (".tif", ".tiff"):
        return True
    import openslide  # noqa: PLC0415 - tiled pyramidal TIFF (a slide) or a plain image

    try:
        if openslide.OpenSlide.detect_format(path) is None:
            return False
        with openslide.OpenSlide(path) as osr:  # closed: no handle left open per reference
            return osr.level_count > 1
    except openslide.OpenSlideError:
        return False


def _folder_images(folder: str, max_images: int) -> list[str]:
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise normalize.StainError(f"{folder}: holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    if len(found) > max_images:
        found = [found[i] for i in np.linspace(0, len(found) - 1, max_images).round().astype(int)]
    return found


def _slide_fields(path: str, fov: int, size: int, max_fields: int) -> list[np.ndarray]:
    from histo_jax.slides.locate import locate  # noqa: PLC0415
    from histo_jax.slides.reader import InputError, open_slide  # noqa: PLC0415

    try:
        with open_slide(path) as slide:
            loc = locate(slide, [fov], stride=fov, min_tissue=0.5, border="skip")
            if len(loc) == 0:
                raise normalize.StainError(
                    f"{path}: no tissue found (no {fov} px field is half tissue): give a slide "
                    "with tissue, or reference images.")
            pick = np.linspace(0, len(loc) - 1, min(max_fields, len(loc))).round().astype(int)
            return [slide.read_field(int(loc.xy[k, 0]), int(loc.xy[k, 1]), fov, size)
                    for k in np.unique(pick)]
    except InputError as e:
        raise normalize.StainError(str(e)) from None


def reference_images(refs, *, max_images: int = 64, fov: int = 1024, size: int = 224,
                     max_fields: int = 32) -> tuple[list[np.ndarray], list[str]]:
    """The images of ``refs`` (images, folders, slides) and their names."""
    images, names = [], []
    for ref in refs:
        if os.path.isdir(ref):
            for f in _folder_images(ref, max_images):
                images.append(read_rgb(f))
                names.append(f)
        elif not os.path.exists(ref):
            raise normalize.StainError(f"{ref}: no such file or folder.")
        elif _is_slide(ref):
            fields = _slide_fields(ref, fov, size, max_fields)
            images += fields
            names += [ref] * len(fields)
        else:
            images.append(read_rgb(ref))
            names.append(ref)
    return images, names


def fit_command(args) -> int:
    images, names = reference_images(args.ref, max_images=args.max_images, fov=args.fov,
                                     size=args.size, max_fields=args.max_fields)
    what = args.ref[0] if len(args.ref) == 1 else f"the {len(args.ref)} references"
    if len(images) == 1:
        what = names[0]
    fitted = normalize.fit(images, args.method, names=tuple(sorted(set(names))), io=args.io,
                           alpha=args.alpha, beta=args.beta, what=what)
    fitted.save(args.out)
    numbers = (f"stain matrix (columns H, E) {np.round(fitted.stain_matrix, 4).tolist()}, "
               f"max concentrations {np.round(fitted.max_conc, 4).tolist()}"
               if fitted.method == "macenko" else
               f"LAB mean {np.round(fitted.lab_mean, 3).tolist()}, std "
               f"{np.round(fitted.lab_std, 3).tolist()}")
    print(f"Fitted {fitted.method} to {len(images)} image(s) ({fitted.num_pixels} pixels): "
          f"{numbers} -> {args.out}")
    print(f"Use: --config.data.stain.method={fitted.method} --config.data.stain.file={args.out}")
    return 0


def apply_command(args) -> int:
    from histo_jax.data.layout import ordered_imap  # noqa: PLC0415

    normalizer = normalize.StainNormalizer(normalize.load(args.stain), min_tissue=args.min_tissue,
                                           max_angle=args.max_angle)
    src, out = args.data_dir, args.out
    if not os.path.isdir(src):
        raise normalize.StainError(f"{src}: no such folder.")
    if os.path.isdir(out) and os.listdir(out):
        raise normalize.StainError(f"{out} is not empty: give a new or empty folder (nothing is "
                                   "overwritten).")
    if os.path.realpath(out).startswith(os.path.realpath(src) + os.sep):
        raise normalize.StainError(f"{out} lies inside {src}: give a folder outside it.")
    jobs, copies = [], []
    for d, _, files in os.walk(src):
        rel = os.path.relpath(d, src)
        for f in sorted(files):
            (jobs if f.lower().endswith(IMAGE_EXTENSIONS) else copies).append(os.path.join(rel, f))
    if not jobs:
        raise normalize.StainError(f"{src}: holds no image to normalise.")

    def one(rel: str) -> bool:
        dst = os.path.join(out, os.path.splitext(rel)[0] + ".png")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        img, ok = normalize.apply_uint8(normalizer, read_rgb(os.path.join(src, rel)))
        Image.fromarray(img).save(dst, compress_level=1)
        return ok

    os.makedirs(out, exist_ok=True)
    oks = list(ordered_imap(one, jobs, args.workers))
    for rel in copies:
        os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(out, rel))
    normalizer.fitted.save(os.path.join(out, normalize.RUN_FILE))
    passed = [j for j, ok in zip(jobs, oks) if not ok]
    summary = {"source": os.path.abspath(src), "stain": os.path.abspath(args.stain),
               **normalizer.fitted.params(), "images": len(jobs), "passed_through": len(passed),
               "passed_through_files": passed[:1000]}
    with open(os.path.join(out, "stain_apply.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"Normalised {len(jobs) - len(passed)} of {len(jobs)} image(s) into {out} "
          f"({len(passed)} with too little tissue copied unchanged, listed in "
          f"{out}/stain_apply.json); {len(copies)} other file(s) copied.")
    return 0


def main(args) -> int:
    try:
        if args.stain_command == "fit":
            return fit_command(args)
        return apply_command(args)
    except normalize.StainError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
