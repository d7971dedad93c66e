"""Input-pipeline benchmark: augmented 4-scale batches per second, ready for the model.

For each source (raw PNG folders, decoded + resized on every access; the prepared TFDS
ArrayRecord dataset) and each Grain worker count, times the training loader followed by
the jitted JAX augmentation + preprocessing on the default JAX device
(``block_until_ready``). Prints one JSON line per configuration, plus the loader alone
and the augmentation alone. Runs on the embedded demo dataset unless ``--data_dir``.

    python benchmarks/input_pipeline.py [--data_dir DIR] [--batches 20] [--workers 0,2]

Reference: the original PyTorch DataLoader (2 workers, full-size PNGs) delivered
6.8 samples/s.
"""
import argparse
import json
import time

import jax
import numpy as np

from histo_jax import train
from histo_jax.data import augment, pipeline, sources
from histo_jax.data.config import get_data_config

REFERENCE_SAMPLES_PER_S = 6.8


def _timed(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="", help="dataset folder (default: demo dataset)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=25)
    parser.add_argument("--num_inputs", type=int, default=4)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--sources", default="folder,prepared")
    args = parser.parse_args()

    cfg = get_data_config()
    cfg.dir = args.data_dir or train.ensure_demo_dataset()  # The main job's demo data.
    aug_cfg = augment.AugmentConfig.from_config(cfg, args.num_inputs)

    @jax.jit
    def ready_for_model(key, images):
        return augment.preprocess(augment.augment_batch(key, images, aug_cfg), cfg.normalization)

    size = cfg.image_size
    dummy = np.zeros((args.batch_size, args.num_inputs, size, size, 3), np.uint8)
    key = jax.random.key(0)
    ready_for_model(key, dummy).block_until_ready()  # Compile once.
    t = _timed(lambda: ready_for_model(key, jax.device_put(dummy)).block_until_ready(), args.batches)
    print(json.dumps({"stage": "augmentation_only", "device": str(jax.devices()[0]),
                      "batches_per_s": round(args.batches / t, 2),
                      "samples_per_s": round(args.batches * args.batch_size / t, 1)}), flush=True)

    for kind in args.sources.split(","):
        start = time.perf_counter()
        source = sources.FolderSource(cfg) if kind == "folder" else sources.load_dataset(cfg, log=lambda m: None)
        open_s = time.perf_counter() - start
        for workers in (int(w) for w in args.workers.split(",")):
            loader = pipeline.make_train_loader(source, np.arange(len(source)), global_batch_size=args.batch_size,
                                                num_inputs=args.num_inputs, seed=0, num_workers=workers)
            it = iter(loader)
            next(it)  # Start-up (worker processes) excluded.
            t_loader = _timed(lambda: next(it), args.batches)
            step = [0]

            def full():
                batch = next(it)
                step[0] += 1
                out = ready_for_model(jax.random.fold_in(key, step[0]), jax.device_put(batch["images"]))
                out.block_until_ready()

            t_full = _timed(full, args.batches)
            del it
            print(json.dumps({
                "stage": "loader+augmentation", "source": kind, "workers": workers,
                "open_or_prepare_s": round(open_s, 1),
                "loader_only_samples_per_s": round(args.batches * args.batch_size / t_loader, 1),
                "batches_per_s": round(args.batches / t_full, 2),
                "samples_per_s": round(args.batches * args.batch_size / t_full, 1),
                "speedup_vs_reference": round(args.batches * args.batch_size / t_full / REFERENCE_SAMPLES_PER_S, 1),
            }), flush=True)


if __name__ == "__main__":
    from histo_jax import hostenv
    hostenv.reexec_with_malloc_tuning()  # As the trainer runs (histo_jax/hostenv.py).
    main()
