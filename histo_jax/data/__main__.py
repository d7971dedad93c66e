"""Data command line: ``python -m histo_jax.data {validate,labels,prepare,demo} ...``.

  validate --data_dir DIR   full report (every image decoded); exit 0 when no error
                            remains (warnings and explicit --on_bad_sample=skip skips
                            do not fail), 1 otherwise.
  labels   --data_dir DIR   writes the labels file from the class token at the end of
                            the file names (reference class map by default).
  prepare  --data_dir DIR   validates, then builds (or reuses) the prepared dataset.
  demo     --out DIR        writes the synthetic demo dataset.
  demo     --slides DIR     writes the synthetic slide demo (pyramidal TIFFs + GeoJSON).
  demo     --out DIR --sites 2
                            two sites (site_a, site_b: other patients, other staining).
  stain    fit --ref IMAGE|DIR|SLIDE --method macenko --out stain.json
  stain    apply --stain stain.json --data_dir DIR --out DIR2
                            stain normalisation (histo_jax/stain/cli.py).
  extract  --slides PATH [PATH ...] --out DIR
                            nested multi-field-of-view crops from whole slides, in this
                            layout (histo_jax/slides/extract.py); bad slides are reported
                            at the end and make the exit code 1.

Exit codes: 0 success, 1 data problem or refused action, 2 bad command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from histo_jax.data.config import ON_BAD_SAMPLE_CHOICES, REFERENCE_SCALES, get_data_config
from histo_jax.errors import WorkdirError


def _csv_list(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _add_layout_args(p: argparse.ArgumentParser, image: bool = True) -> None:
    d = get_data_config()
    p.add_argument("--data_dir", required=True, help="dataset folder (scale folders + labels)")
    p.add_argument("--scales", type=_csv_list, default=d.scales,
                   help="comma-separated scale folders, input order (default: %(default)s)")
    p.add_argument("--labels_file", default=d.labels_file, help="default: %(default)s")
    if image:
        p.add_argument("--image_size", type=int, default=d.image_size,
                       help="resize target in px (default: %(default)s)")
        p.add_argument("--num_classes", type=int, default=d.num_classes)
        p.add_argument("--on_bad_sample", choices=ON_BAD_SAMPLE_CHOICES, default=d.on_bad_sample,
                       help="'skip' excludes bad samples explicitly, listing each one")
        p.add_argument("--num_workers", type=int, default=d.num_workers,
                       help="decode threads (default: %(default)s)")


def _data_cfg(args: argparse.Namespace):
    cfg = get_data_config()
    cfg.dir = args.data_dir
    cfg.scales = tuple(args.scales)
    cfg.labels_file = args.labels_file
    for name in ("image_size", "num_classes", "on_bad_sample", "num_workers", "prepared_dir"):
        if getattr(args, name, None) not in (None, ""):
            setattr(cfg, name, getattr(args, name))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m histo_jax.data",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="report every problem of a dataset folder")
    _add_layout_args(p)
    p.add_argument("--max_listed", type=int, default=20, help="files listed per problem kind")

    p = sub.add_parser("labels", help="build the labels file from the file names")
    _add_layout_args(p, image=False)
    p.add_argument("--class_map", default="",
                   help="NAME=INT,... replacing the reference map (normal=0, pap/fol/sol/...=1)")
    p.add_argument("--ignore", type=_csv_list, default=None,
                   help="class tokens to ignore (default: embol,psamoma,back,background)")
    p.add_argument("--balance", action="store_true",
                   help="undersample every class to the smallest one")
    p.add_argument("--seed", type=int, default=42, help="balancing seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing labels file")

    p = sub.add_parser("prepare", help="validate and build the prepared ArrayRecord dataset")
    _add_layout_args(p)
    p.add_argument("--prepared_dir", default="",
                   help="where prepared datasets go (default: $HISTO_JAX_CACHE/datasets)")

    p = sub.add_parser("demo", help="write the synthetic demo dataset (or slide demo)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="output folder of the demo dataset (crops in this layout)")
    g.add_argument("--slides", metavar="OUT",
                   help="output folder of the slide demo: train/ and new/ pyramidal TIFFs "
                        "(0.25 um/px) and annotations/ (QuPath GeoJSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", type=int, default=1, help="with --out: 2 writes OUT/site_a (the "
                   "default dataset) and OUT/site_b (other patients, other H&E staining)")

    _add_extract_parser(sub)
    from histo_jax.stain import cli as stain_cli  # noqa: PLC0415 - numpy only
    stain_cli.add_parser(sub)
    return parser


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return v


def _stored_size(text: str) -> int | None:
    if text == "native":
        return None
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected 'native' or a number of px, got {text!r}")
    return v


def _add_extract_parser(sub) -> None:
    from histo_jax.slides.annotations import DEFAULT_CLASS_MAP  # noqa: PLC0415 - light module
    from histo_jax.slides.tissue import TissueParams  # noqa: PLC0415

    t = TissueParams()
    p = sub.add_parser(
        "extract", help="nested multi-FOV crops from whole slides",
        description="Nested, centred crops at several fields of view around tissue locations "
                    "of whole slides, written in the dataset layout (docs/reference.md §1, §6).")
    p.add_argument("--slides", nargs="+", required=True, metavar="PATH",
                   help="slide files or folders of slides (OpenSlide formats)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or a previous "
                   "extraction with the same options: finished crops are skipped)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--points", metavar="CSV", help="slide,x,y[,label]: extract these "
                       "level-0 centres (every one; tissue filter only with --min_tissue)")
    where.add_argument("--annotations", metavar="DIR", help="QuPath GeoJSON <slide>.geojson "
                       "files: grid locations inside a region take its class's label")
    p.add_argument("--stride", type=int, default=None, help="tissue grid step in level-0 px "
                   "(default: the smallest field of view)")
    fov = p.add_mutually_exclusive_group()
    fov.add_argument("--fovs", default="256,512,1024,2048",
                     help="fields of view in level-0 px -> folders high_mag_<F> (default: %(default)s)")
    fov.add_argument("--fovs_um", default=None,
                     help="or in micrometres -> folders fov_<U>um (needs the slides' mpp)")
    p.add_argument("--mpp", type=float, default=None,
                   help="micrometres per level-0 px, overriding the slides' metadata")
    p.add_argument("--size", type=_stored_size, default=None, metavar="native|N",
                   help="stored crop size: 'native' (default: level-0 resolution, F px) or N px "
                        "(read from the fitting pyramid level; much faster and smaller)")
    p.add_argument("--border", choices=("skip", "pad"), default="skip",
                   help="fields crossing the slide border: skip the location, or pad with white "
                        "(default: %(default)s)")
    p.add_argument("--min_tissue", type=_fraction, default=None,
                   help="keep a location when its smallest field is at least this tissue "
                        "(default 0.5 for grid / annotations; points: no filter)")
    p.add_argument("--annotation_classes", default=DEFAULT_CLASS_MAP,
                   help="classification.name -> label, NAME=INT or NAME=ignore, comma-separated "
                        "(default: %(default)s)")
    p.add_argument("--outside_label", type=int, default=None,
                   help="label of tissue locations outside every region (default: not extracted)")
    p.add_argument("--patients", metavar="CSV", default=None,
                   help="slide,patient: num_id = patient (splits keep a patient's slides together)")
    p.add_argument("--labels_file", default="labels.csv", help="default: %(default)s")
    p.add_argument("--workers", type=int, default=4, help="reader threads (default: %(default)s)")
    p.add_argument("--stain", metavar="JSON", default=None,
                   help="a fitted stain normaliser (stain fit): crops are written normalised")
    p.add_argument("--no_pyramid", action="store_true",
                   help="read every field at level 0 and resize it (the naive way; for checks)")
    p.add_argument("--tissue_downsample", type=float, default=t.downsample,
                   help="tissue detection resolution, level-0 px per mask px (default: %(default)s)")
    p.add_argument("--tissue_saturation", default=str(int(t.saturation)),
                   help="saturation threshold 0-255 after the median blur, or 'otsu' "
                        "(default: %(default)s)")
    p.add_argument("--tissue_median", type=int, default=t.median,
                   help="median blur kernel, mask px, odd (default: %(default)s)")
    p.add_argument("--tissue_close", type=int, default=t.close,
                   help="morphological closing kernel, mask px; 0 off (default: %(default)s)")
    p.add_argument("--tissue_min_area", type=float, default=t.min_area,
                   help="smallest tissue piece kept, level-0 px^2 (default: %(default)g)")
    p.add_argument("--tissue_min_hole_area", type=float, default=t.min_hole_area,
                   help="smaller holes are filled, larger ones excluded, level-0 px^2 "
                        "(default: %(default)g)")


def _cmd_validate(args) -> int:
    from histo_jax.data.layout import validate_dataset

    report = validate_dataset(_data_cfg(args), progress=True)
    print(report.format(max_listed=args.max_listed))
    return 0 if report.ok else 1


def _cmd_labels(args) -> int:
    from histo_jax.data import labels

    class_map = labels.parse_class_map(args.class_map) if args.class_map else None
    out = os.path.join(args.data_dir, args.labels_file)
    if os.path.exists(out) and not args.overwrite:
        print(f"ERROR: {out} already exists; pass --overwrite to replace it (or --labels_file "
              f"to write another file).", file=sys.stderr)
        return 1
    result = labels.build_labels(args.data_dir, args.scales, class_map=class_map,
                                 ignore=args.ignore, balance=args.balance, seed=args.seed)
    print(result.format())
    if not result.rows:
        print(f"ERROR: no labelled sample in {os.path.join(args.data_dir, args.scales[0])}; "
              f"nothing written.", file=sys.stderr)
        return 1
    labels.write_labels(out, result.rows, overwrite=args.overwrite)
    print(f"Wrote {out} ({len(result.rows)} rows).")
    return 0


def _cmd_prepare(args) -> int:
    from histo_jax.data.layout import DataValidationError
    from histo_jax.data.prepare import prepare_dataset

    try:
        prepared = prepare_dataset(_data_cfg(args), progress=True)
    except DataValidationError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"Prepared dataset: {prepared.path} ({len(prepared.samples)} samples"
          f"{', reused' if prepared.reused else ''}; {len(prepared.skipped)} skipped)")
    return 0


def _cmd_demo(args) -> int:
    if args.slides:
        return _cmd_demo_slides(args)
    from histo_jax.data.demo import write_demo_dataset  # Lazy: only this command needs it.

    if args.sites > 1:
        from histo_jax.data.demo import write_demo_sites  # noqa: PLC0415
        summary = write_demo_sites(args.out, args.sites, seed=args.seed)
        for name, s in summary.items():
            print(f"Site {name}: {s['num_samples']} samples of {s['num_ids']} patients -> "
                  f"{s['out_dir']}")
        return 0
    summary = write_demo_dataset(args.out, seed=args.seed)
    print(f"Demo dataset written to {args.out}: {summary}")
    return 0


def _cmd_demo_slides(args) -> int:
    from histo_jax.slides.synthetic import write_demo_slides  # noqa: PLC0415

    out = args.slides
    summary = write_demo_slides(out, seed=args.seed)
    n_new = sum(s["slide"].startswith(os.path.join(out, "new")) for s in summary["slides"])
    print(f"Slide demo written to {out} in {summary['seconds']:.0f} s: "
          f"{len(summary['slides']) - n_new} slides in {out}/train, {n_new} in {out}/new "
          f"({summary['size'][0]} x {summary['size'][1]} px, {summary['mpp']} um/px), their "
          f"tumour regions in {out}/annotations. Next (README, From slides):")
    print(f"  python -m histo_jax.data extract --slides {out}/train --annotations {out}/annotations "
          f"--outside_label 0 --border pad --stride 512 --size 224 --out {out}/crops")
    print(f"  python main.py --config=configs/slides_demo.py --config.data.dir={out}/crops")
    print(f"  python -m histo_jax.predict --run=runs/slides_demo --slides={out}/new "
          f"--annotations={out}/annotations --stride=128 --out={out}/predictions")
    return 0


def _cmd_extract(args) -> int:
    from histo_jax.slides import annotations, extract, geometry  # noqa: PLC0415
    from histo_jax.slides.reader import InputError  # noqa: PLC0415
    from histo_jax.slides.tissue import TissueParams  # noqa: PLC0415

    sat = args.tissue_saturation
    tissue = TissueParams(downsample=args.tissue_downsample,
                          saturation=sat if sat == "otsu" else float(sat), median=args.tissue_median,
                          close=args.tissue_close, min_area=args.tissue_min_area,
                          min_hole_area=args.tissue_min_hole_area)
    fovs = (geometry.parse_fovs(args.fovs_um, "um") if args.fovs_um
            else geometry.parse_fovs(args.fovs, "px"))
    class_map = tuple(annotations.parse_class_map(args.annotation_classes).items())
    cfg = extract.ExtractConfig(
        fovs=fovs, size=args.size, stride=args.stride, min_tissue=args.min_tissue,
        border=args.border, tissue=tissue, mpp=args.mpp, pyramid=not args.no_pyramid,
        points=args.points, annotations=args.annotations, class_map=class_map,
        outside_label=args.outside_label, patients=args.patients, labels_file=args.labels_file,
        workers=args.workers, stain=args.stain)
    try:
        result = extract.extract(args.slides, args.out, cfg, progress=True, log=lambda m: None)
    except InputError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(result.format())
    if result.slides:
        scales = extract.training_scales(result.scales, fovs)
        flag = "" if tuple(scales) == REFERENCE_SCALES else f' --config.data.scales="{scales}"'
        print(f"Check: python -m histo_jax.data validate --data_dir {args.out} --scales {','.join(scales)}")
        if os.path.exists(os.path.join(args.out, args.labels_file)):
            print(f"Train: python main.py --config=configs/four_scale.py --config.data.dir={args.out}{flag}")
    if not result.ok:
        print(f"ERROR: {len(result.failures)} slide(s) or input file(s) failed (listed above); "
              "the others were extracted.", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one data command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from histo_jax.stain import cli as stain_cli  # noqa: PLC0415

    commands = {"validate": _cmd_validate, "labels": _cmd_labels, "prepare": _cmd_prepare,
                "demo": _cmd_demo, "extract": _cmd_extract, "stain": stain_cli.main}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError, WorkdirError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
