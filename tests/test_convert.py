"""PyTorch state-dict import: name tables, round trips, errors, load_pytorch, pretrained."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import histo_jax
from histo_jax.models import (EfficientNet, MultiInputClassifier, WeightImportError, build_model,
                              convert, get_model_config)


def tiny_cfg(**overrides):
    cfg = get_model_config()
    cfg.variant = "tiny"
    cfg.update(overrides)
    return cfg


_call = nnx.jit(lambda m, x: m(x))


def _images(shape, seed=0):
    return jnp.asarray(convert.synthetic_images(shape, seed))


def _with_torch_extras(sd, classifier_keys):
    """Add what real torch files carry and the importer must ignore."""
    out = dict(sd)
    for k in list(sd):
        if k.endswith("running_mean"):
            out[k[:-len("running_mean")] + "num_batches_tracked"] = np.array(3, np.int64)
    out.update(classifier_keys)
    return out


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(tiny_cfg(), 3, nnx.Rngs(params=0))


def test_full_b0_names_match_torchvision_and_timm_counts():
    enc = EfficientNet(rngs=nnx.Rngs(params=0))
    tv, tm = convert.torch_shapes(enc, "torchvision"), convert.torch_shapes(enc, "timm")
    # torchvision efficientnet_b0().features: 309 tensors without num_batches_tracked.
    assert len(tv) == len(tm) == 309
    assert tv["features.0.0.weight"] == (32, 3, 3, 3)
    assert tv["features.1.0.block.0.0.weight"] == (32, 1, 3, 3)            # depthwise, no expand
    assert tv["features.2.0.block.2.fc1.weight"] == (4, 96, 1, 1)          # SE: 16 // 4
    assert tv["features.8.0.weight"] == (1280, 320, 1, 1)
    assert tm["blocks.0.0.conv_dw.weight"] == (32, 1, 3, 3)
    assert tm["blocks.1.0.se.conv_reduce.weight"] == (4, 96, 1, 1)
    assert tm["blocks.6.0.conv_pwl.weight"] == (320, 1152, 1, 1)
    assert tm["conv_head.weight"] == (1280, 320, 1, 1)


@pytest.mark.parametrize("fmt", ["torchvision", "timm", "reference"])
def test_round_trip_through_pytorch_names(tiny_model, fmt):
    sd = convert.synthetic_state_dict(convert.torch_shapes(tiny_model, fmt), seed=5)
    extra = {"classifier.1.weight": np.zeros((1000, 320), np.float32)} if fmt != "reference" else {}
    sd_file = _with_torch_extras(sd, extra)
    if fmt == "timm":
        sd_file = {"module." + k: v for k, v in sd_file.items()}  # DataParallel prefix
    target = build_model(tiny_cfg(), 3, nnx.Rngs(params=1))
    assert convert.load_state_dict(target, sd_file, "file.pth") == fmt
    back = convert.export_state_dict(target, fmt)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # layouts: conv OIHW -> HWIO, depthwise (C,1,k,k) -> (k,k,1,C), Linear transposed
    if fmt == "torchvision":
        w = sd["features.1.0.block.0.0.weight"]
        np.testing.assert_array_equal(np.asarray(target.encoder.blocks[0].dw.kernel[...]),
                                      w.transpose(2, 3, 1, 0))
    if fmt == "reference":
        np.testing.assert_array_equal(np.asarray(target.attention[1].in_proj.kernel[...]),
                                      sd["attention_layers.1.in_proj_weight"].T)
        np.testing.assert_array_equal(np.asarray(target.fc2.kernel[...]),
                                      sd["classifier.4.weight"].T)


def test_errors_list_every_problem_at_once(tiny_model):
    sd = convert.synthetic_state_dict(convert.torch_shapes(tiny_model, "reference"), seed=1)
    del sd["proj.bias"], sd["norm2.weight"]
    sd["ffn.0.weight"] = np.zeros((7, 7), np.float32)
    sd["attention_layers.0.out_proj.weight"] = np.zeros((128,), np.float32)
    sd["attention_layers.9.in_proj_bias"] = np.zeros((384,), np.float32)
    before = np.asarray(tiny_model.fc1.kernel[...]).copy()
    with pytest.raises(WeightImportError) as err:
        convert.load_state_dict(tiny_model, sd, "my_checkpoint.pth")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "my_checkpoint.pth" in msg
    for name in ("proj.bias", "norm2.weight", "ffn.0.weight", "attention_layers.0.out_proj.weight",
                 "attention_layers.9.in_proj_bias"):
        assert name in msg
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg
    assert "shape mismatches (2)" in msg
    # all or nothing: nothing was written
    np.testing.assert_array_equal(np.asarray(tiny_model.fc1.kernel[...]), before)


def test_unrecognised_file_and_wrong_target():
    with pytest.raises(WeightImportError, match="not a recognised"):
        convert.detect_format({"layer1.weight": np.zeros(3)}, "x.pth")
    enc = EfficientNet(variant="tiny", rngs=nnx.Rngs(params=0))
    with pytest.raises(WeightImportError, match="need a MultiInputClassifier"):
        convert.name_table(enc, "reference")


def test_load_pytorch_reference_checkpoint(tmp_path):
    src = build_model(tiny_cfg(num_classes=3), 2, nnx.Rngs(params=3))
    src.eval()
    path = tmp_path / "trained.safetensors"
    save_file(convert.export_state_dict(src, "reference"), str(path))
    model = histo_jax.load_pytorch(path, variant="tiny")
    assert isinstance(model, MultiInputClassifier) and model.num_inputs == 2
    x = _images((2, 2, 32, 32, 3))
    logits, attn = _call(model, x)  # eval mode: no rngs needed
    ref_logits, ref_attn = _call(src, x)
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(attn), np.asarray(ref_attn), atol=1e-6)
    with pytest.raises(WeightImportError, match="trained.safetensors"):
        histo_jax.load_pytorch(path)  # default B0 config does not fit tiny weights


def test_load_pytorch_backbone_gives_an_encoder(tmp_path):
    src = EfficientNet(variant="tiny", rngs=nnx.Rngs(params=4))
    src.eval()
    path = tmp_path / "timm_b0.safetensors"
    save_file(_with_torch_extras(convert.export_state_dict(src, "timm"),
                                 {"classifier.weight": np.zeros((1000, 320), np.float32)}),
              str(path))
    enc = histo_jax.load_pytorch(path, variant="tiny", impl="plain")
    assert isinstance(enc, EfficientNet)
    x = _images((3, 32, 32, 3))
    np.testing.assert_allclose(np.asarray(_call(enc, x)), np.asarray(_call(src, x)), atol=1e-5)


def test_build_model_pretrained_path_and_imagenet(tmp_path, monkeypatch):
    src = EfficientNet(variant="tiny", rngs=nnx.Rngs(params=7))
    path = tmp_path / "backbone.safetensors"
    save_file(convert.export_state_dict(src, "torchvision"), str(path))
    model = build_model(tiny_cfg(pretrained=str(path)), 2, nnx.Rngs(params=0))
    want = jax.tree.leaves(nnx.state(src, nnx.Param))
    got = jax.tree.leaves(nnx.state(model.encoder, nnx.Param))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, got))
    assert model.encoder.blocks[0].deterministic is False  # returned in train mode

    from histo_jax.models import pretrained
    monkeypatch.setattr(pretrained, "imagenet_weights_path", lambda *a, **k: path)
    model = build_model(tiny_cfg(pretrained="imagenet"), 1, nnx.Rngs(params=0))
    np.testing.assert_array_equal(np.asarray(model.encoder.head.bn.var[...]),
                                  np.asarray(src.head.bn.var[...]))
    with pytest.raises(FileNotFoundError, match="neither 'none', 'imagenet'"):
        build_model(tiny_cfg(pretrained=str(tmp_path / "nope.pth")), 1, nnx.Rngs(params=0))


def test_synthetic_helpers_are_deterministic():
    shapes = {"a.weight": (4, 3, 3, 3), "bn.running_var": (4,), "bn.weight": (4,)}
    a, b = convert.synthetic_state_dict(shapes, 1), convert.synthetic_state_dict(shapes, 1)
    assert all(np.array_equal(a[k], b[k]) for k in shapes)
    assert not np.array_equal(a["a.weight"], convert.synthetic_state_dict(shapes, 2)["a.weight"])
    assert np.all(a["bn.running_var"] > 0)
    img = convert.synthetic_images((2, 40, 40, 3), 0)
    assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    np.testing.assert_array_equal(img, convert.synthetic_images((2, 40, 40, 3), 0))
