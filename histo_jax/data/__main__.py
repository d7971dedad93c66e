"""Data command line: ``python -m histo_jax.data {validate,labels,prepare,demo} ...``.

  validate --data_dir DIR   full report (every image decoded); exit 0 when no error
                            remains (warnings and explicit --on_bad_sample=skip skips
                            do not fail), 1 otherwise.
  labels   --data_dir DIR   writes the labels file from the class token at the end of
                            the file names (reference class map by default).
  prepare  --data_dir DIR   validates, then builds (or reuses) the prepared dataset.
  demo     --out DIR        writes the synthetic demo dataset.

Exit codes: 0 success, 1 data problem or refused action, 2 bad command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from histo_jax.data.config import ON_BAD_SAMPLE_CHOICES, get_data_config


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

    p = sub.add_parser("demo", help="write the synthetic demo dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    return parser


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
    from histo_jax.data.demo import write_demo_dataset  # Lazy: only this command needs it.

    summary = write_demo_dataset(args.out, seed=args.seed)
    print(f"Demo dataset written to {args.out}: {summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one data command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    commands = {"validate": _cmd_validate, "labels": _cmd_labels, "prepare": _cmd_prepare,
                "demo": _cmd_demo}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
