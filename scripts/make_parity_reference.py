"""Produce the PyTorch reference numbers of ``tests/fixtures/parity/reference.npz``.

The parity tests (``tests/test_parity.py``) check that histo_jax reproduces PyTorch without
needing torch: weights and inputs are regenerated on both sides from seeds with
``histo_jax.models.convert.synthetic_state_dict`` / ``synthetic_images``, and only the seeds,
shapes and PyTorch outputs are stored (about 0.5 MB, most of it the BatchNorm statistics).

Cases (full-size EfficientNet-B0):
  * ``ref_n1`` / ``ref_n4``: the reference ``MultiInputModule`` (torchvision
    ``efficientnet_b0().features`` + the fusion head of docs/reference.md §3, written below), eval
    mode, N = 1 and N = 4 -> logits and attention;
  * ``enc_tv`` / ``enc_timm``: the encoder alone with torchvision and timm names, eval mode ->
    pooled 1280-d features;
  * ``step_n1`` / ``step_n4`` (``tests/parity_step.py``): ONE full train step of the reference
    structure (the trunk called once per input), 64 px, batch 4, dropout and stochastic depth
    off: weighted cross-entropy, backward, clip 1.0, Adam with the OneCycle lr and beta1 of
    step 0 -> loss, logits, every BatchNorm running mean and variance after the step (whole),
    and for every parameter tensor its gradient's max |.| and L2 norm, its max |.| after the
    update, and 32 fixed elements of both (``parity_step.sample_indices``; the full tensors
    would be 2 x 21 MB per case). Tensors whose gradient is zero in exact arithmetic
    (``parity_step.zero_grad_names``) are listed instead. The script prints histo_jax's
    errors over the WHOLE tensors: default implementation, ``impl='plain'``, and
    ``bn_stats='joint'`` (which must fail).

Requirements: histo_jax with the ``torch`` extra in ONE environment. Install the CPU wheel of
torch first (the default wheel pulls GBs of CUDA), then torchvision without dependencies:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install --no-deps torchvision==0.28.0 && pip install timm pillow
    python scripts/make_parity_reference.py            # writes tests/fixtures/parity/
    python scripts/make_parity_reference.py --cases step_n1,step_n4   # only these cases

(In the development container: ``PYTHONPATH=.venv-torch/lib/python3.11/site-packages
.venv/bin/python scripts/make_parity_reference.py``.) The script also runs histo_jax on the same
weights and prints the max abs differences, as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from reference.torch_model import (Encoder, MultiInputModule, import_torchvision,  # noqa: E402
                                   make_train_step)

torchvision = import_torchvision()

from histo_jax.models import convert  # noqa: E402
import parity_step  # noqa: E402  (tests/parity_step.py)

CASES = {  # name: (weight seed, batch, num_inputs, image size)
    "ref_n1": (1, 2, 1, 224),
    "ref_n4": (4, 2, 4, 224),
    "enc_tv": (10, 2, 0, 224),
    "enc_timm": (11, 2, 0, 224),
}
IMAGE_SEED_OFFSET = 1000


def _fill(module: nn.Module, jax_shapes: dict, seed: int, skip_classifier: bool) -> dict:
    """Load synthetic weights; check names and shapes agree with histo_jax's name table."""
    names = {k: tuple(v.shape) for k, v in module.state_dict().items()
             if not k.endswith("num_batches_tracked")
             and not (skip_classifier and k.startswith("classifier."))}
    if names != jax_shapes:
        diff = sorted(set(names.items()) ^ set(jax_shapes.items()))
        raise SystemExit(f"torch and histo_jax names/shapes differ: {diff[:20]}")
    synth = convert.synthetic_state_dict(jax_shapes, seed)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in synth.items()}, strict=False)
    return synth


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def _no_randomness(tmodel: nn.Module) -> None:
    """Dropout, attention dropout and stochastic depth off (train mode stays deterministic)."""
    for mod in tmodel.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
        if isinstance(mod, torchvision.ops.StochasticDepth):
            mod.p = 0.0


def torch_step(case: str) -> dict:
    """The reference train step of ``case`` in PyTorch: the numbers the fixture stores."""
    seed, b, n, size = parity_step.STEP_CASES[case]
    _, jmodel, _ = parity_step.reference_model(seed, n)
    tmodel = MultiInputModule(n)
    _fill(tmodel, convert.torch_shapes(jmodel, "reference"), seed, skip_classifier=False)
    _no_randomness(tmodel)
    images, labels = parity_step.step_inputs(seed, b, n, size)
    seen = {}

    def on_step(logits, loss):
        seen["logits"], seen["loss"] = logits.numpy(), float(loss)
        seen["grads"] = {k: p.grad.numpy().copy() for k, p in tmodel.named_parameters()}

    step = make_train_step(tmodel, torch.tensor(parity_step.CLASS_WEIGHTS),
                           parity_step.TOTAL_STEPS, on_step=on_step)
    step(_nchw(images), torch.from_numpy(labels).long())
    tsd = tmodel.state_dict()
    params = {k: tsd[k].numpy() for k in seen["grads"]}
    stats = {k: v.numpy() for k, v in tsd.items() if "running_" in k}
    return {"loss": seen["loss"], "logits": seen["logits"], "grads": seen["grads"],
            "params": params, "stats": stats}


def step_fixture(case: str, ref: dict) -> dict[str, np.ndarray]:
    """The compact fixture entries of a train-step case (see the module docstring)."""
    seed, b, n, size = parity_step.STEP_CASES[case]
    absmax = {k: float(np.abs(g).max()) for k, g in ref["grads"].items()}
    zero = parity_step.zero_grad_names(absmax)
    names = sorted(set(ref["grads"]) - zero)
    stat_names = sorted(ref["stats"])
    index = {k: parity_step.sample_indices(k, ref["grads"][k]) for k in names}

    def samples(tree):
        return np.concatenate([tree[k].ravel()[index[k]] for k in names]).astype(np.float32)

    def per_tensor(tree, fn):
        return np.array([fn(tree[k]) for k in names], np.float32)

    return {
        f"{case}/meta": np.array([seed, b, n, size, parity_step.TOTAL_STEPS], np.int64),
        f"{case}/loss": np.float32(ref["loss"]), f"{case}/logits": ref["logits"],
        f"{case}/stat_names": np.array(stat_names),
        f"{case}/stat_values": np.concatenate([ref["stats"][k] for k in stat_names]),
        f"{case}/zero_grad_names": np.array(sorted(zero)),
        f"{case}/param_names": np.array(names),
        f"{case}/sample_count": np.array([len(index[k]) for k in names], np.int32),
        f"{case}/sample_index": np.concatenate([index[k] for k in names]).astype(np.int32),
        f"{case}/grad_samples": samples(ref["grads"]),
        f"{case}/grad_absmax": per_tensor(ref["grads"], lambda a: np.abs(a).max()),
        f"{case}/grad_norm": per_tensor(ref["grads"], np.linalg.norm),
        f"{case}/param_samples": samples(ref["params"]),
        f"{case}/param_absmax": per_tensor(ref["params"], lambda a: np.abs(a).max()),
    }


def step_report(case: str, ref: dict, **model_fields) -> dict:
    """histo_jax's step on the same case against the WHOLE PyTorch tensors."""
    got = parity_step.histo_jax_step(case, **model_fields)
    rec = {"case": case, **model_fields, "loss_abs_diff": abs(got["loss"] - ref["loss"]),
           "logits_max_abs_diff": float(np.abs(got["logits"] - ref["logits"]).max())}
    zero = parity_step.zero_grad_names({k: np.abs(v).max() for k, v in ref["grads"].items()})
    top = max(np.abs(v).max() for v in ref["grads"].values())
    for what in ("grads", "stats", "params"):
        errs = {k: parity_step.rel_err(got[what][k], ref[what][k]) for k in ref[what]
                if k not in zero}
        worst = max(errs, key=errs.get)
        rec[f"{what}_max_rel_err"] = errs[worst]
        rec[f"{what}_worst"] = worst
        rec[f"{what}_tensors"] = len(errs)
        rec[f"{what}_rel_err_p99"] = float(np.percentile(list(errs.values()), 99))
    rec["zero_grad_tensors"] = len(zero)
    rec["zero_grad_max_abs_over_top"] = max(
        float(np.abs(got["grads"][k]).max()) for k in zero) / float(top)
    rec["zero_grad_max_update_over_lr"] = max(
        float(np.abs(got["params"][k] - ref["params"][k]).max()) for k in zero) / parity_step.LR0
    return rec


def forward_case(case: str) -> tuple[dict[str, np.ndarray], dict]:
    """A forward-only case of ``CASES``: its fixture entries and the histo_jax report."""
    from flax import nnx
    from histo_jax.models import EfficientNet, build_model, get_model_config

    seed, b, n, size = CASES[case]
    out = {f"{case}/meta": np.array([seed, b, n, size], np.int64)}
    if case.startswith("enc"):
        kind = "torchvision" if case == "enc_tv" else "timm"
        enc = EfficientNet(rngs=nnx.Rngs(params=0))
        shapes = convert.torch_shapes(enc, kind)
        tmodel = Encoder(kind).eval()
        synth = _fill(tmodel.net, shapes, seed, skip_classifier=True)
        x = convert.synthetic_images((b, size, size, 3), seed + IMAGE_SEED_OFFSET)
        with torch.no_grad():
            ref = tmodel(_nchw(x)).numpy()
        convert.load_state_dict(enc, synth, case)
        enc.eval()
        got = np.asarray(enc(x))
        out[f"{case}/features"] = ref
        return out, {"case": case, "max_abs_diff": float(np.abs(got - ref).max()),
                     "ref_abs_max": float(np.abs(ref).max())}
    model = build_model(get_model_config(), n, nnx.Rngs(params=0))
    shapes = convert.torch_shapes(model, "reference")
    tmodel = MultiInputModule(n)
    synth = _fill(tmodel, shapes, seed, skip_classifier=False)
    x = convert.synthetic_images((b, n, size, size, 3), seed + IMAGE_SEED_OFFSET)
    convert.load_state_dict(model, synth, case)
    tmodel.eval()
    model.eval()
    with torch.no_grad():
        logits, attn = tmodel(_nchw(x))
    got_logits, got_attn = model(x)
    out[f"{case}/logits"] = logits.numpy()
    out[f"{case}/attention"] = attn.numpy()
    rec = {"case": case, "max_abs_diff": float(np.abs(np.asarray(got_logits)
                                                      - logits.numpy()).max()),
           "attn_max_abs_diff": float(np.abs(np.asarray(got_attn) - attn.numpy()).max()),
           "ref_abs_max": float(np.abs(logits.numpy()).max())}
    return out, rec


def main(argv=None) -> None:
    all_cases = [*CASES, *parity_step.STEP_CASES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/fixtures/parity")
    parser.add_argument("--cases", default=",".join(all_cases),
                        help="comma list of cases to regenerate (the others are kept from the "
                             "existing fixture); default: all")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(all_cases))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {all_cases}")
    dest = pathlib.Path(args.out) / "reference.npz"
    out: dict[str, np.ndarray] = {}
    if dest.exists():  # keep the cases that are not regenerated
        out = {k: v for k, v in np.load(dest).items() if k.split("/")[0] not in cases}
    torch.manual_seed(0)
    for case in cases:
        if case in CASES:
            entries, rec = forward_case(case)
            out.update(entries)
            print(json.dumps(rec), flush=True)
            continue
        ref = torch_step(case)
        out.update(step_fixture(case, ref))
        for fields in ({}, {"impl": "plain"}, {"bn_stats": "joint"}):
            print(json.dumps(step_report(case, ref, **fields)), flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest, **out)
    print(json.dumps({"written": str(dest), "bytes": dest.stat().st_size}))


if __name__ == "__main__":
    main()
