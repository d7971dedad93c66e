"""Forward + backward time of the full EfficientNet-B0 encoder per layer implementation.

Prints one JSON line per ``model.impl`` ('xla_cpu': shift depthwise conv, hand-written
backward passes, the fused MBConv op; 'plain': XLA's grouped depthwise conv and autodiff):
compile time and the median of ``--repeats`` timed train-mode steps (loss = sum of pooled
features, gradients w.r.t. all params). Usage::

    python benchmarks/impl.py [--batch 8] [--size 224] [--repeats 5] [--impls xla_cpu,plain]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from histo_jax.models import EfficientNet  # noqa: E402


def bench(impl: str, batch: int, size: int, repeats: int) -> dict:
    enc = EfficientNet(impl=impl, stochastic_depth=0.0, rngs=nnx.Rngs(params=0))
    enc.train()

    @nnx.jit
    def step(model, x):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x)))(model)

    x = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3), np.float32))
    t0 = time.perf_counter()
    jax.block_until_ready(step(enc, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(enc, x))
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "batch": batch, "size": size, "backend": jax.default_backend(),
            "devices": jax.device_count(), "first_call_s": round(compile_s, 3),
            "step_median_s": round(statistics.median(times), 4),
            "step_min_s": round(min(times), 4), "repeats": repeats}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="xla_cpu,plain")
    a = p.parse_args(argv)
    for impl in a.impls.split(","):
        print(json.dumps(bench(impl, a.batch, a.size, a.repeats)), flush=True)


if __name__ == "__main__":
    from histo_jax import hostenv
    hostenv.reexec_with_malloc_tuning()  # As the trainer runs (histo_jax/hostenv.py).
    main()
