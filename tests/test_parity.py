"""Parity with PyTorch (no torch needed): full-size EfficientNet-B0 on synthetic weights.

The reference numbers come from ``scripts/make_parity_reference.py`` (torch + torchvision +
timm); weights and images are regenerated here from the stored seeds with the same shared
functions, so the fixture only holds seeds and PyTorch outputs. The train-step cases run the
reference structure (the trunk called once per input) for one full step; see
``tests/parity_step.py`` for what is compared and how.
"""
import pathlib

import numpy as np
import pytest
from flax import nnx

import parity_step
from histo_jax.models import EfficientNet, build_model, convert, get_model_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "parity" / "reference.npz"
ATOL = 1e-4
IMAGE_SEED_OFFSET = 1000  # as in scripts/make_parity_reference.py

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _case(ref, case):
    seed, b, n, size = (int(v) for v in ref[f"{case}/meta"][:4])
    return seed, b, n, size


@pytest.mark.parametrize("case,impl", [("ref_n1", "plain"), ("ref_n4", "xla_cpu")])
def test_classifier_eval_matches_pytorch(ref, case, impl):
    seed, b, n, size = _case(ref, case)
    cfg = get_model_config()
    cfg.impl = impl
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
    enc = EfficientNet(impl="plain", rngs=nnx.Rngs(params=0))
    sd = convert.synthetic_state_dict(convert.torch_shapes(enc, fmt), seed)
    sd.update({k.rsplit(".", 1)[0] + ".num_batches_tracked": np.array(7)
               for k in sd if k.endswith("running_mean")})
    assert convert.load_state_dict(enc, sd, case) == fmt
    enc.eval()
    x = convert.synthetic_images((b, size, size, 3), seed + IMAGE_SEED_OFFSET)
    feats = nnx.jit(lambda m, x: m(x))(enc, x)
    assert feats.shape == (b, 1280)
    np.testing.assert_allclose(np.asarray(feats), ref[f"{case}/features"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("path", parity_step.STEP_PATHS)
@pytest.mark.parametrize("case", list(parity_step.STEP_CASES))
def test_train_step_matches_pytorch(ref, case, path):
    """One full reference train step (per-input BatchNorm statistics, weighted CE, backward,
    clip 1.0, Adam with OneCycle lr / beta1 of step 0) equals PyTorch's: loss, logits, every
    BatchNorm running mean and variance, every parameter gradient and updated parameter;
    compiled as the staged chain (the CPU default) and as one program."""
    assert tuple(int(v) for v in ref[f"{case}/meta"]) == (
        *parity_step.STEP_CASES[case], parity_step.TOTAL_STEPS), "fixture and case differ"
    err = parity_step.step_errors(ref, case, parity_step.histo_jax_step(case, path))
    print(case, path, {k: f"{v:.2e}" for k, v in err.items()})
    assert set(err) == set(parity_step.TOLERANCES)
    over = {k: v for k, v in err.items() if not v <= parity_step.TOLERANCES[k]}
    assert not over, f"{case}: errors above tolerance {over} (all: {err})"


def test_train_step_comparison_fails_for_joint_statistics(ref):
    """The same comparison catches pooled ('joint') statistics by orders of magnitude: the
    train-mode forward of the 4-input case alone is already far off in logits, loss and
    running statistics."""
    err = parity_step.step_errors(ref, "step_n4",
                                  parity_step.histo_jax_forward("step_n4", bn_stats="joint"))
    tol = parity_step.TOLERANCES
    assert err["logits"] > 100 * tol["logits"] and err["stats"] > 100 * tol["stats"], err
    assert err["loss"] > 10 * tol["loss"], err
