"""Stain benchmark: normalisation and augmentation throughput, numpy (host) and JAX (jitted).

* ``normalize``: Macenko and Reinhard (``histo_jax.stain.normalize.StainNormalizer``) on
  H&E-like demo crops at ``--size`` px: numpy, one image at a time (what ``stain apply`` and
  ``extract --stain`` do per crop), and JAX, one jitted batch of ``--batch`` images (what the
  train and eval steps do), images/s;
* ``augment``: HED and LAB jitter (``histo_jax.stain.augment``), one jitted batch, images/s;
* ``augment_in_reference``: the reference augmentation (``histo_jax.data.augment.
  augment_batch``, 4 inputs, the uint8 batch of the train step) without and with each
  stain jitter, seconds a batch and the jitter's added seconds.

Prints one JSON line per measurement (median of ``--rounds``). Its cost inside the full
train step: ``benchmarks/train_step.py --modes train_aug --data_set
stain_augment.method=hed --ab``.

    python benchmarks/stain.py [--size 224] [--batch 100] [--rounds 5]
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from histo_jax.data import augment as ref_augment
from histo_jax.data import demo
from histo_jax.stain import augment, normalize


def _images(n: int, size: int) -> np.ndarray:
    out = []
    for k in range(n):
        crop = demo.render_sample(0, k % 8, k % 2, (1.0, 1.0), (1024,))[0][1024]
        step = max(1, 1024 // size)
        out.append(np.ascontiguousarray(crop[::step, ::step][:size, :size]))
    return np.stack(out)


def _timed(fn, rounds: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=100, help="images per jitted call (N=4 x 25)")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    print(json.dumps({"stage": "setup", "cpus": os.cpu_count(), "load": os.getloadavg(),
                      "backend": jax.default_backend(), "size": a.size, "batch": a.batch}), flush=True)
    imgs = _images(a.batch, a.size)
    for method in normalize.METHODS:
        normalizer = normalize.StainNormalizer(normalize.fit(list(imgs[:8]), method))
        sub = imgs[:16]
        t = _timed(lambda: [normalizer(im) for im in sub], a.rounds)  # noqa: B023
        print(json.dumps({"stage": "normalize", "method": method, "backend": "numpy",
                          "images_per_s": round(len(sub) / t, 1)}), flush=True)
        fn = jax.jit(normalizer)
        x = jnp.asarray(imgs)
        t = _timed(lambda: fn(x), a.rounds)  # noqa: B023
        print(json.dumps({"stage": "normalize", "method": method, "backend": "jax",
                          "images_per_s": round(len(imgs) / t, 1),
                          "batch_seconds": round(t, 4)}), flush=True)
    x = jnp.asarray(imgs[:, None], jnp.float32) / 255.0
    for method in ("hed", "lab"):
        cfg = augment.StainAugmentConfig(method=method)
        fn = jax.jit(lambda k, v: augment.stain_augment(k, v, cfg))  # noqa: B023
        t = _timed(lambda: fn(jax.random.PRNGKey(0), x), a.rounds)  # noqa: B023
        print(json.dumps({"stage": "augment", "method": method, "backend": "jax",
                          "images_per_s": round(len(imgs) / t, 1),
                          "batch_seconds": round(t, 4)}), flush=True)
    # Inside the reference augmentation (what the train step runs), 4 inputs per sample.
    u8 = jnp.asarray(imgs[: a.batch // 4 * 4].reshape((-1, 4) + imgs.shape[1:]))
    seconds = {}
    for method in ("none", "hed", "lab"):
        cfg = ref_augment.AugmentConfig(color_jitter=((0.3, 0.3, 0.3, 0.1),) * 4,
                                        erasing_prob=(0.3,) * 4,
                                        stain=augment.StainAugmentConfig(method=method))
        fn = jax.jit(lambda k, v: ref_augment.augment_batch(k, v, cfg))  # noqa: B023
        seconds[method] = _timed(lambda: fn(jax.random.PRNGKey(0), u8), a.rounds)  # noqa: B023
        print(json.dumps({"stage": "augment_in_reference", "method": method,
                          "images": int(u8.shape[0] * 4),
                          "batch_seconds": round(seconds[method], 4),
                          "added_seconds": round(seconds[method] - seconds["none"], 4)}),
              flush=True)


if __name__ == "__main__":
    main()
