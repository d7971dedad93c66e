"""Parity with PyTorch (no torch needed): full-size EfficientNet-B0 on synthetic weights.

The reference numbers come from ``scripts/make_parity_reference.py`` (torch + torchvision +
timm); weights and images are regenerated here from the stored seeds with the same shared
functions, so the fixture only holds seeds and PyTorch outputs.
"""
import pathlib

import numpy as np
import pytest
from flax import nnx

from histo_jax.models import EfficientNet, build_model, convert, get_model_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "parity" / "reference.npz"
ATOL = 1e-4
IMAGE_SEED_OFFSET = 1000  # as in scripts/make_parity_reference.py

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _case(ref, case):
    seed, b, n, size = (int(v) for v in ref[f"{case}/meta"])
    return seed, b, n, size


@pytest.mark.parametrize("case,depthwise", [("ref_n1", "grouped"), ("ref_n4", "shift")])
def test_classifier_eval_matches_pytorch(ref, case, depthwise):
    seed, b, n, size = _case(ref, case)
    cfg = get_model_config()
    cfg.depthwise = depthwise
    model = build_model(cfg, n, nnx.Rngs(params=0))
    sd = convert.synthetic_state_dict(convert.torch_shapes(model, "reference"), seed)
    assert convert.load_state_dict(model, sd, case) == "reference"
    model.eval()
    x = convert.synthetic_images((b, n, size, size, 3), seed + IMAGE_SEED_OFFSET)
    logits, attn = nnx.jit(lambda m, x: m(x))(model, x)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), ref[f"{case}/logits"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(attn), ref[f"{case}/attention"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case,fmt", [("enc_tv", "torchvision"), ("enc_timm", "timm")])
def test_encoder_eval_matches_pytorch(ref, case, fmt):
    seed, b, _, size = _case(ref, case)
    enc = EfficientNet(depthwise="grouped", rngs=nnx.Rngs(params=0))
    sd = convert.synthetic_state_dict(convert.torch_shapes(enc, fmt), seed)
    sd.update({k.rsplit(".", 1)[0] + ".num_batches_tracked": np.array(7)
               for k in sd if k.endswith("running_mean")})
    assert convert.load_state_dict(enc, sd, case) == fmt
    enc.eval()
    x = convert.synthetic_images((b, size, size, 3), seed + IMAGE_SEED_OFFSET)
    feats = nnx.jit(lambda m, x: m(x))(enc, x)
    assert feats.shape == (b, 1280)
    np.testing.assert_allclose(np.asarray(feats), ref[f"{case}/features"], rtol=0, atol=ATOL)


def test_train_mode_batchnorm_matches_pytorch(ref):
    """Train mode, dropout and stochastic depth off: batch statistics and running updates."""
    case = "train_n1"
    seed, b, n, size = _case(ref, case)
    cfg = get_model_config()
    cfg.dropout = cfg.attn_dropout = cfg.stochastic_depth = 0.0
    model = build_model(cfg, n, nnx.Rngs(params=0))
    convert.load_state_dict(
        model, convert.synthetic_state_dict(convert.torch_shapes(model, "reference"), seed), case)
    model.train()
    x = convert.synthetic_images((b, n, size, size, 3), seed + IMAGE_SEED_OFFSET)
    logits, _ = nnx.jit(lambda m, x: m(x))(model, x)  # no rngs needed: all rates are 0
    np.testing.assert_allclose(np.asarray(logits), ref[f"{case}/logits"], rtol=0, atol=ATOL)
    exported = convert.export_state_dict(model, "reference")
    stats = [k[len(case) + 1:] for k in ref if k.startswith(case + "/feature_extractor")]
    assert len(stats) == 6
    for name in stats:
        np.testing.assert_allclose(exported[name], ref[f"{case}/{name}"], rtol=0, atol=ATOL,
                                   err_msg=name)
