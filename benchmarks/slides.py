"""Slide benchmark: extraction samples/s (pyramid vs naive) and slide prediction locations/s.

1. Extraction, side by side in one run, on the same slides and locations (tissue grid,
   4 fields of view 256, 512, 1024, 2048 px, stored at ``--size`` px, border padded):
   - ``pyramid``: each field read from the coarsest level not coarser than F / size, then
     resized (``python -m histo_jax.data extract --size N``);
   - ``naive``: each field read at level 0 (F x F px), then resized (``--no_pyramid``);
   - ``native``: the default ``--size native``, every field stored at level 0 (F px);
   - ``pyramid+macenko`` / ``pyramid+reinhard``: ``pyramid`` with ``--stain`` (a normaliser
     fitted on the first slide's tissue): every crop normalised (numpy) before it is written.
   Both write the PNGs with the same reader threads; a sample = one location's 4 crops.
   A second pair of lines times the reads alone (no PNG).
2. Slide prediction (``histo_jax.slides.predict.predict_slides``) with a randomly
   initialised model (``--variant``, 4 inputs, ``--image_size``) on every device:
   locations/s and the split between reading (thread-seconds, and the time the model
   waited for reads) and the model.

Runs on demo slides rendered into a temporary folder (``--num_slides`` of 5120 x 4096 px
at 0.25 um/px) unless ``--slides``. Prints one JSON line per measurement.

    python benchmarks/slides.py [--slides PATH ...] [--num_slides 2] [--size 224]
        [--stride 256] [--workers 4] [--variant b0] [--image_size 224] [--no_predict]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from histo_jax import hostenv

if __name__ == "__main__":
    hostenv.reexec_with_malloc_tuning()

import numpy as np  # noqa: E402

from histo_jax.data.layout import ordered_imap  # noqa: E402
from histo_jax.slides import extract, synthetic  # noqa: E402
from histo_jax.slides.locate import fov_pixels, locate  # noqa: E402
from histo_jax.slides.reader import find_slides, open_slide  # noqa: E402
from histo_jax.stain import cli as stain_cli, normalize  # noqa: E402


def _demo_slides(folder, n):
    paths = []
    for i in range(n):
        layout = synthetic.slide_layout(0, 100 + i, 5120, 4096, tumour=True)
        path = os.path.join(folder, f"bench-{i + 1:02d}.tiff")
        synthetic.write_pyramid_tiff(path, synthetic.render_slide(layout))
        paths.append(path)
    return paths


def _fit_stains(paths, scratch):
    """Macenko and Reinhard normalisers fitted on the first slide's tissue (stain fit)."""
    images, names = stain_cli.reference_images([paths[0]])
    files = {}
    for method in ("macenko", "reinhard"):
        files[method] = os.path.join(scratch, f"stain_{method}.json")
        normalize.fit(images, method, names=tuple(set(names))).save(files[method])
    return files


def _extraction(paths, args, scratch):
    out = {}
    fovs = extract.ExtractConfig().fovs
    stains = _fit_stains(paths, scratch)
    for method in ("naive", "pyramid", "pyramid+macenko", "pyramid+reinhard", "native"):
        stain = stains.get(method.partition("+")[2])
        cfg = extract.ExtractConfig(size=None if method == "native" else args.size, stride=args.stride,
                                    border="pad", pyramid=method.startswith("pyramid"),
                                    workers=args.workers, stain=stain)
        target = os.path.join(scratch, f"extract_{method}")
        start = time.perf_counter()
        result = extract.extract(paths, target, cfg, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - start
        n = sum(s["locations"] for s in result.slides.values())
        out[method] = n / seconds
        disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(target) for f in fs
                   if f.endswith(".png") and os.path.basename(r) != extract.THUMBNAILS)
        print(json.dumps({"stage": "extract", "method": method, "fields_of_view": [f.folder for f in fovs],
                          "stored_px": "native" if method == "native" else args.size, "slides": len(paths),
                          "samples": n, "crops": 4 * n, "seconds": round(seconds, 2),
                          "samples_per_s": round(n / seconds, 2), "png_mb_per_sample": round(disk / n / 1e6, 3),
                          "workers": args.workers}), flush=True)
        shutil.rmtree(target)
    print(json.dumps({"stage": "extract", "speedup_pyramid_vs_naive": round(out["pyramid"] / out["naive"], 2),
                      "macenko_vs_plain": round(out["pyramid+macenko"] / out["pyramid"], 3),
                      "reinhard_vs_plain": round(out["pyramid+reinhard"] / out["pyramid"], 3)}),
          flush=True)
    # Reads alone (what slide prediction does), same locations.
    fovs_px = (256, 512, 1024, 2048)
    for method in ("naive", "pyramid"):
        n, seconds = 0, 0.0
        for path in paths:
            with open_slide(path) as slide:
                loc = locate(slide, fov_pixels(slide, fovs), stride=args.stride, border="pad")
                start = time.perf_counter()
                for _ in ordered_imap(lambda xy: [slide.read_field(int(xy[0]), int(xy[1]), f, args.size,
                                                                   method == "pyramid") for f in fovs_px],
                                      loc.xy, args.workers):
                    pass
                seconds += time.perf_counter() - start
                n += len(loc)
        print(json.dumps({"stage": "read_only", "method": method, "samples": n, "seconds": round(seconds, 2),
                          "samples_per_s": round(n / seconds, 2)}), flush=True)


def _prediction(paths, args, scratch):
    hostenv.keep_step_memory()  # as python -m histo_jax.predict does
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from histo_jax.config import get_base_config  # noqa: PLC0415
    from histo_jax.models import build_model  # noqa: PLC0415
    from histo_jax.slides.predict import predict_slides  # noqa: PLC0415

    config = get_base_config()
    config.num_inputs = 4
    config.data.image_size = args.image_size
    config.model.variant = args.variant
    config.model.pretrained = "none"
    config.eval_batch_size = args.batch_size
    model = build_model(config.model, 4, nnx.Rngs(params=0))
    hostenv.release_build_memory()
    model.eval()
    out = os.path.join(scratch, "predict")
    s = predict_slides(config, model, paths, out, stride=args.stride, num_workers=args.workers,
                       progress=False, pictures_too=False)  # compiles ahead, timed apart
    shutil.rmtree(out)
    t = s["timing"]
    print(json.dumps({"stage": "predict", "variant": args.variant, "image_size": args.image_size,
                      "devices": jax.device_count(), "device": str(jax.devices()[0].device_kind),
                      "batch": args.batch_size, "locations": s["num_locations"],
                      "locations_per_s": t["locations_per_second"], "wall_s": t["wall_seconds"],
                      "model_s": t["model_seconds"], "waiting_for_reads_s": t["waiting_for_reads_seconds"],
                      "read_thread_s": t["read_seconds_summed_over_threads"], "read_threads": args.workers,
                      "tissue_detection_s": t["plan_seconds"], "compile_s": t["compile_seconds"]}),
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", nargs="*", default=None, help="slide files / folders (default: demo slides)")
    parser.add_argument("--num_slides", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="stored px of every field")
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--variant", default="b0", help="model variant for prediction (b0, tiny)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--no_predict", action="store_true")
    parser.add_argument("--no_extract", action="store_true")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="histo_slides_bench_")
    try:
        if args.slides:
            paths, errors = find_slides(args.slides)
            if errors:
                sys.exit("; ".join(map(str, errors)))
        else:
            start = time.perf_counter()
            paths = _demo_slides(scratch, args.num_slides)
            print(json.dumps({"stage": "demo_slides", "slides": len(paths),
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        print(json.dumps({"stage": "setup", "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
                          "numpy": np.__version__}), flush=True)
        if not args.no_extract:
            _extraction(paths, args, scratch)
        if not args.no_predict:
            _prediction(paths, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
