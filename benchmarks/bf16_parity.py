"""bfloat16 compute vs float32: max abs logit difference on the same weights and images.

Both models get the synthetic PyTorch-reference weights of the parity tests
(``convert.synthetic_state_dict``) and see the same synthetic images; the float32 model is the
parity-tested one (within 1e-4 of PyTorch). Prints one JSON line per N. Usage::

    python benchmarks/bf16_parity.py [--inputs 1,4] [--batch 4] [--size 224] [--seed 4]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from histo_jax.models import build_model, convert, get_model_config  # noqa: E402


def logits(dtype: str, n: int, images: np.ndarray, seed: int) -> np.ndarray:
    cfg = get_model_config()
    cfg.dtype = dtype
    model = build_model(cfg, n, nnx.Rngs(params=0))
    convert.load_state_dict(model, convert.synthetic_state_dict(
        convert.torch_shapes(model, "reference"), seed), f"synthetic seed {seed}")
    model.eval()
    return np.asarray(jax.jit(lambda m, x: m(x)[0])(model, images))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", default="1,4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=4)
    a = p.parse_args(argv)
    for n in (int(x) for x in a.inputs.split(",")):
        images = convert.synthetic_images((a.batch, n, a.size, a.size, 3), a.seed + 1000)
        ref = logits("float32", n, images, a.seed)
        got = logits("bfloat16", n, images, a.seed)
        print(json.dumps({
            "n_inputs": n, "batch": a.batch, "size": a.size, "backend": jax.default_backend(),
            "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "logit_abs_max": float(np.abs(ref).max()),
            "argmax_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}), flush=True)


if __name__ == "__main__":
    main()
