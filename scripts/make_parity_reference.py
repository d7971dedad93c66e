"""Produce the PyTorch reference numbers of ``tests/fixtures/parity/reference.npz``.

The parity tests (``tests/test_parity.py``) check that histo_jax reproduces PyTorch without
needing torch: weights and inputs are regenerated on both sides from seeds with
``histo_jax.models.convert.synthetic_state_dict`` / ``synthetic_images``, and only the seeds,
shapes and PyTorch outputs are stored (a few KB).

Cases (full-size EfficientNet-B0):
  * ``ref_n1`` / ``ref_n4``: the reference ``MultiInputModule`` (torchvision
    ``efficientnet_b0().features`` + the fusion head of SPEC section 3, written below), eval
    mode, N = 1 and N = 4 -> logits and attention;
  * ``enc_tv`` / ``enc_timm``: the encoder alone with torchvision and timm names, eval mode ->
    pooled 1280-d features;
  * ``train_n1``: train mode with dropout and stochastic depth off, N = 1 -> logits and the
    BatchNorm running statistics after that single forward pass (PyTorch updates running_var
    with the unbiased batch variance).

Requirements: histo_jax with the ``torch`` extra in ONE environment. Install the CPU wheel of
torch first (the default wheel pulls GBs of CUDA), then torchvision without dependencies:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install --no-deps torchvision==0.28.0 && pip install timm pillow
    python scripts/make_parity_reference.py            # writes tests/fixtures/parity/

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

from benchmarks.torch_reference import MultiInputModule, import_torchvision  # noqa: E402

torchvision = import_torchvision()
import timm  # noqa: E402

from histo_jax.models import convert  # noqa: E402

CASES = {  # name: (weight seed, batch, num_inputs, image size)
    "ref_n1": (1, 2, 1, 224),
    "ref_n4": (4, 2, 4, 224),
    "enc_tv": (10, 2, 0, 224),
    "enc_timm": (11, 2, 0, 224),
    "train_n1": (20, 4, 1, 96),
}
IMAGE_SEED_OFFSET = 1000
TRAIN_BN = ("feature_extractor.0.1", "feature_extractor.4.1.block.1.1", "feature_extractor.8.1")


class Encoder(nn.Module):
    """A torchvision or timm EfficientNet-B0 trunk + global average pooling."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "torchvision":
            self.net = torchvision.models.efficientnet_b0()
        else:
            self.net = timm.create_model("efficientnet_b0", pretrained=False)

    def forward(self, x):
        if self.kind == "torchvision":
            return self.net.avgpool(self.net.features(x)).flatten(1)
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/fixtures/parity")
    args = parser.parse_args(argv)
    from flax import nnx
    from histo_jax.models import EfficientNet, build_model, get_model_config

    torch.manual_seed(0)
    out: dict[str, np.ndarray] = {}
    for case, (seed, b, n, size) in CASES.items():
        out[f"{case}/meta"] = np.array([seed, b, n, size], np.int64)
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
            print(json.dumps({"case": case, "max_abs_diff": float(np.abs(got - ref).max()),
                              "ref_abs_max": float(np.abs(ref).max())}), flush=True)
            continue
        cfg = get_model_config()
        train = case.startswith("train")
        if train:
            cfg.dropout = cfg.attn_dropout = cfg.stochastic_depth = 0.0
        model = build_model(cfg, n, nnx.Rngs(params=0))
        shapes = convert.torch_shapes(model, "reference")
        tmodel = MultiInputModule(n)
        synth = _fill(tmodel, shapes, seed, skip_classifier=False)
        x = convert.synthetic_images((b, n, size, size, 3), seed + IMAGE_SEED_OFFSET)
        convert.load_state_dict(model, synth, case)
        if train:
            for mod in tmodel.modules():
                if isinstance(mod, nn.Dropout):
                    mod.p = 0.0
                if isinstance(mod, nn.MultiheadAttention):
                    mod.dropout = 0.0
                if isinstance(mod, torchvision.ops.StochasticDepth):
                    mod.p = 0.0
            tmodel.train()
            model.train()
        else:
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
        if train:
            tsd = tmodel.state_dict()
            exported = convert.export_state_dict(model, "reference")
            worst = 0.0
            for bn in TRAIN_BN:
                for stat in ("running_mean", "running_var"):
                    ref = tsd[f"{bn}.{stat}"].numpy()
                    out[f"{case}/{bn}.{stat}"] = ref
                    worst = max(worst, float(np.abs(exported[f"{bn}.{stat}"] - ref).max()))
            rec["bn_stats_max_abs_diff"] = worst
        print(json.dumps(rec), flush=True)
    dest = pathlib.Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest / "reference.npz", **out)
    print(json.dumps({"written": str(dest / "reference.npz"),
                      "bytes": (dest / "reference.npz").stat().st_size}))


if __name__ == "__main__":
    main()
