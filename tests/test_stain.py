"""Stain handling: colour deconvolution parity, Macenko / Reinhard parity with torchstain,
stain files, pass-through of poor patches, bad input, augmentation in the train step."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from histo_jax.data import augment as A
from histo_jax.data import demo
from histo_jax.data import __main__ as data_cli
from histo_jax.stain import augment as SA
from histo_jax.stain import colour
from histo_jax.stain import normalize as N

skcolor = pytest.importorskip("skimage.color")
torchstain = pytest.importorskip("torchstain")


def he_image(sample: int, size: int = 1024, step: int = 4, site: str = "a",
             strength=(1.0, 1.0)) -> np.ndarray:
    """An H&E-like uint8 image: a demo crop (size px) subsampled by ``step``."""
    crops, _, _ = demo.render_sample(0, sample, sample % 2, strength, (size,), demo.SITES[site])
    return np.ascontiguousarray(crops[size][::step, ::step])


@pytest.fixture(scope="module")
def ref_and_target():
    return he_image(3), he_image(8, 512, 2, site="b", strength=(1.1, 0.9))


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# ---- colour spaces ------------------------------------------------------------------------------

def test_hed_and_lab_match_scikit_image_in_numpy_and_jax():
    rng = np.random.default_rng(0)
    x = rng.random((2, 32, 32, 3))
    x[0, 0, :4] = [0.0, 1.0, 0.5]  # 0 and 1 channels: clamped OD, no inf / NaN
    hed = skcolor.rgb2hed(x)
    np.testing.assert_allclose(colour.rgb2hed(x), hed, atol=1e-5)
    np.testing.assert_allclose(colour.hed2rgb(hed), skcolor.hed2rgb(hed), atol=1e-5)
    jx = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(colour.rgb2hed)(jx)), hed, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(colour.hed2rgb)(jnp.asarray(hed, jnp.float32))),
                               skcolor.hed2rgb(hed), atol=1e-5)
    lab = skcolor.rgb2lab(x)
    np.testing.assert_allclose(colour.rgb2lab(x), lab, atol=1e-9)
    np.testing.assert_allclose(colour.lab2rgb(lab), skcolor.lab2rgb(lab), atol=1e-9)
    # float32 LAB (L in [0, 100]): 1e-4 absolute.
    np.testing.assert_allclose(np.asarray(colour.rgb2lab(jx)), lab, atol=1e-4)
    np.testing.assert_allclose(np.asarray(colour.lab2rgb(jnp.asarray(lab, jnp.float32))),
                               skcolor.lab2rgb(lab), atol=1e-5)
    od = colour.rgb_to_od(np.zeros((1, 1, 3)))
    assert np.all(np.isfinite(od)) and od.max() == pytest.approx(-np.log(1e-6))


# ---- normalisation: parity with torchstain's numpy backend --------------------------------------

def test_macenko_matches_torchstain(ref_and_target):
    ref, img = ref_and_target
    t = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    t.fit(ref)
    fitted = N.fit(ref, "macenko")
    np.testing.assert_allclose(np.asarray(fitted.stain_matrix), t.HERef, atol=1e-8)
    np.testing.assert_allclose(fitted.max_conc, t.maxCRef, rtol=1e-8)
    expected = t.normalize(img, stains=False)[0].astype(np.float64)
    normalizer = N.StainNormalizer(fitted)
    out, ok = normalizer(img)
    assert bool(ok)
    # torchstain truncates to uint8 (astype); histo_jax keeps the float image: the two differ by
    # less than 1 grey level everywhere, 0.5 on average (the truncation).
    assert rms(out * 255, expected) < 1.0 and np.abs(out * 255 - expected).max() < 1.0 + 1e-6
    jout, jok = jax.jit(normalizer)(jnp.asarray(img))
    assert bool(jok) and rms(np.asarray(jout) * 255, expected) < 1.0  # float32, on device
    rounded, ok8 = N.apply_uint8(normalizer, img)  # what stain apply / extract --stain write
    assert ok8 and rounded.dtype == np.uint8 and rms(rounded, expected) < 1.0


def test_reinhard_matches_torchstain(ref_and_target):
    ref, img = ref_and_target
    t = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    t.fit(ref)
    fitted = N.fit(ref, "reinhard")
    # torchstain's LAB has the same formulas with OpenCV's 8-bit scaling undone, in float32.
    np.testing.assert_allclose(fitted.lab_mean, t.target_means, atol=1e-3)
    np.testing.assert_allclose(fitted.lab_std, t.target_stds, atol=1e-3)
    expected = t.normalize(img).astype(np.float64)
    out, ok = N.StainNormalizer(fitted)(img)
    assert bool(ok) and rms(out * 255, expected) < 1.0  # again the uint8 truncation
    jout, _ = N.StainNormalizer(fitted)(jnp.asarray(img))
    assert rms(np.asarray(jout) * 255, expected) < 1.0


def test_normalisation_brings_another_site_to_the_reference():
    """Site B's staining (other H&E vectors, 1.3x H, 0.75x E) of the same tissue is mapped
    close to site A's, much closer than before. (Macenko with OD threshold 0.05: the demo's
    stroma is paler than torchstain's default 0.15 assumes, as configs/cross_site_demo.py.)"""
    a = np.stack([he_image(k, 1024, 8) for k in (5, 6, 7, 8)])
    b = np.stack([he_image(k, 1024, 8, site="b") for k in (5, 6, 7, 8)])
    for method, most in (("macenko", 0.1), ("reinhard", 0.4)):
        normalizer = N.StainNormalizer(N.fit([he_image(k) for k in (1, 2, 3)], method, beta=0.05))
        (na, ok_a), (nb, ok_b) = normalizer(a), normalizer(b)
        assert ok_a.all() and ok_b.all()
        assert rms(na * 255, nb * 255) < most * rms(a, b), method  # measured: 0.06x, 0.26x


def test_batched_jax_equals_numpy_per_image(ref_and_target):
    ref, img = ref_and_target
    normalizer = N.StainNormalizer(N.fit(ref, "macenko"))
    batch = np.stack([img, img[::-1], ref]).reshape(3, 1, *img.shape)  # (B, N, H, W, 3)
    jout, jok = jax.jit(normalizer)(jnp.asarray(batch))
    assert jout.shape == batch.shape and jok.shape == (3, 1)
    for k in range(3):
        out, ok = normalizer(batch[k, 0])
        assert bool(ok) == bool(jok[k, 0])
        np.testing.assert_allclose(np.asarray(jout[k, 0]), out, atol=1e-3)  # float32: < 0.3 grey


# ---- poor patches pass through, never a NaN -----------------------------------------------------

def test_poor_patches_pass_through_unchanged_and_are_counted(ref_and_target):
    ref, img = ref_and_target
    img = img[::4, ::4]  # 64 px: small programs
    rng = np.random.default_rng(1)
    white = np.clip(rng.normal(244, 2, img.shape), 0, 255).astype(np.uint8)   # glass
    flat = np.full(img.shape, (150, 90, 160), np.uint8)                       # blurred to one colour
    pen = img.copy()
    pen[:] = (40, 150, 60)                                                    # green ink
    pen[::7] = img[::7]
    extremes = img.copy()
    extremes[:8] = 0
    extremes[8:16] = 255
    batch = np.stack([img, white, flat, pen, extremes])
    for method in ("macenko", "reinhard"):
        normalizer = N.StainNormalizer(N.fit(ref, method))
        for xp_batch in (batch, jnp.asarray(batch)):
            out, ok = normalizer(xp_batch)
            out, ok = np.asarray(out), np.asarray(ok)
            assert np.all(np.isfinite(out)), method
            want = [True, False, False, False, True] if method == "macenko" else [True, False, False, True, True]
            assert ok.tolist() == want, (method, ok)
            for k in np.flatnonzero(~ok):  # passed through unchanged
                np.testing.assert_allclose(out[k], batch[k] / 255.0, atol=1e-6)


def test_train_step_normalises_and_counts_pass_throughs(ref_and_target):
    from histo_jax import steps

    ref, img = ref_and_target
    normalizer = N.StainNormalizer(N.fit(ref, "macenko"))
    white = np.full(img.shape, 245, np.uint8)
    images = jnp.asarray(np.stack([np.stack([img, white]), np.stack([white, img])]))
    out, passthrough = jax.jit(steps.normalize_stain, static_argnums=1)(images, normalizer)
    assert int(passthrough) == 2 and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out[0, 1]), white / 255.0, atol=1e-6)
    same, none = steps.normalize_stain(images, None)
    assert none is None and same is images


# ---- stain files and bad input ------------------------------------------------------------------

def test_stain_file_round_trip_and_refusals(ref_and_target, tmp_path):
    ref, _ = ref_and_target
    fitted = N.fit(ref, "macenko", names=("ref.png",))
    path = str(tmp_path / "stain.json")
    fitted.save(path)
    again = N.load(path, "macenko")
    assert again.params() == fitted.params() and again.fingerprint() == fitted.fingerprint()
    with pytest.raises(N.StainError, match="holds a 'macenko' fit but the configuration asks for 'reinhard'"):
        N.load(path, "reinhard")
    d = json.load(open(path))
    d["version"] = 99
    json.dump(d, open(tmp_path / "v99.json", "w"))
    with pytest.raises(N.StainError, match="version 99; this histo_jax reads version 1"):
        N.load(str(tmp_path / "v99.json"))
    json.dump({"stain_matrix": [[1, 2]]}, open(tmp_path / "other.json", "w"))
    with pytest.raises(N.StainError, match="not a histo_jax stain file"):
        N.load(str(tmp_path / "other.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(N.StainError, match="broken.json cannot be read"):
        N.load(str(tmp_path / "broken.json"))
    with pytest.raises(N.StainError, match="missing.json not found: fit one with"):
        N.load(str(tmp_path / "missing.json"))
    d = json.load(open(path))
    d["stain_matrix"] = [[1, 2, 3]]
    json.dump(d, open(tmp_path / "shape.json", "w"))
    with pytest.raises(N.StainError, match="stain_matrix 3 x 2"):
        N.load(str(tmp_path / "shape.json"))


def test_bad_references_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"expected an RGB image of shape \(..., H, W, 3\); got shape \(8, 8, 4\)"):
        N.fit(np.zeros((8, 8, 4), np.uint8), "macenko")
    with pytest.raises(ValueError, match="got shape"):
        N.StainNormalizer(N.fit(he_image(3), "reinhard"))(np.zeros((8, 8), np.uint8))
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(tmp_path / "glass.png")
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(tmp_path / "gray.png")
    rgba = np.full((64, 64, 4), 120, np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.svs").mkdir()
    Image.fromarray(he_image(3)).save(tmp_path / "dir.svs" / "x.png")  # a folder named .svs
    cases = {"glass.png": "glass.png holds no tissue to fit a stain normaliser to",
             "gray.png": "gray.png: is a L image, not RGB",
             "clear.png": "clear.png: has transparent pixels",
             "empty": "empty: holds no image",
             "nothere.png": "nothere.png: no such file or folder"}
    for name, message in cases.items():
        rc = data_cli.main(["stain", "fit", "--ref", str(tmp_path / name), "--out",
                            str(tmp_path / "s.json")])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and "Traceback" not in err, (name, err)
    assert not os.path.exists(tmp_path / "s.json")
    assert data_cli.main(["stain", "fit", "--ref", str(tmp_path / "dir.svs"), "--out",
                          str(tmp_path / "s.json"), "--method", "reinhard"]) == 0
    assert "Fitted reinhard to 1 image(s)" in capsys.readouterr().out


def test_stain_apply_writes_a_normalised_layout(tmp_path, capsys):
    src = tmp_path / "data"
    demo.write_demo_dataset(str(src), num_ids=2, samples_per_id=1, sizes=(256,), num_processes=1)
    Image.fromarray(np.full((256, 256, 3), 246, np.uint8)).save(src / "high_mag_256" / "999_0_normal.png")
    assert data_cli.main(["stain", "fit", "--ref", str(src / "high_mag_256"), "--out",
                          str(tmp_path / "s.json")]) == 0
    out = tmp_path / "norm"
    assert data_cli.main(["stain", "apply", "--stain", str(tmp_path / "s.json"), "--data_dir",
                          str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Normalised 2 of 3 image(s)" in text and "1 with too little tissue" in text
    assert (out / "labels.csv").read_text() == (src / "labels.csv").read_text()
    summary = json.load(open(out / "stain_apply.json"))
    assert summary["passed_through_files"] == [os.path.join("high_mag_256", "999_0_normal.png")]
    normalizer = N.StainNormalizer(N.load(str(tmp_path / "s.json")))
    name = sorted(os.listdir(src / "high_mag_256"))[0]
    raw = np.asarray(Image.open(src / "high_mag_256" / name))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "high_mag_256" / name)),
                                  N.apply_uint8(normalizer, raw)[0])
    assert data_cli.main(["stain", "apply", "--stain", str(tmp_path / "s.json"), "--data_dir",
                          str(src), "--out", str(out)]) == 1  # never overwrites
    assert "is not empty" in capsys.readouterr().err


# ---- augmentation -------------------------------------------------------------------------------

def _images(n=3):
    return jnp.asarray(np.stack([np.stack([he_image(k, 256, 8)] * n) for k in (1, 2)]), jnp.float32) / 255.0


@pytest.mark.parametrize("method", ["hed", "lab"])
def test_stain_augmentation_shared_per_sample_deterministic_and_finite(method):
    x = _images()
    cfg = SA.StainAugmentConfig(method=method, hed_alpha=0.3, hed_beta=0.1)
    key = jax.random.PRNGKey(3)
    out = jax.jit(SA.stain_augment, static_argnums=2)(key, x, cfg)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out - x).mean()) > 1e-3
    # Shared by the scales of a sample (identical inputs stay identical), not by samples.
    np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(out[:, 2]))
    # Same key, same draw (eager vs jitted: float rounding only).
    np.testing.assert_allclose(np.asarray(SA.stain_augment(key, x, cfg)), np.asarray(out), atol=1e-6)
    per_input = SA.stain_augment(key, x, SA.StainAugmentConfig(method=method, per_input=True))
    assert float(jnp.abs(per_input[:, 0] - per_input[:, 2]).max()) > 1e-3
    never = SA.stain_augment(key, x, SA.StainAugmentConfig(method=method, prob=0.0))
    np.testing.assert_allclose(np.asarray(never), np.asarray(x), atol=2e-5)
    extreme = jnp.zeros_like(x).at[:, :, :4].set(1.0)  # 0 and 255 channels
    assert bool(jnp.all(jnp.isfinite(SA.stain_augment(key, extreme, cfg))))


def test_stain_augmentation_leaves_the_reference_draws_unchanged():
    """augment_batch with stain augmentation of zero strength = without it (its key is its own)."""
    x = (_images() * 255).astype(jnp.uint8)
    base = A.AugmentConfig(color_jitter=((0.3, 0.3, 0.3, 0.1),) * 3, erasing_prob=(0.3,) * 3)
    zero = A.AugmentConfig(color_jitter=base.color_jitter, erasing_prob=base.erasing_prob,
                           stain=SA.StainAugmentConfig(method="hed", hed_alpha=0.0, hed_beta=0.0))
    key = jax.random.PRNGKey(0)
    augment = jax.jit(A.augment_batch, static_argnums=2)
    np.testing.assert_allclose(np.asarray(augment(key, x, zero)),
                               np.asarray(augment(key, x, base)), atol=1e-5)
    only = A.AugmentConfig(enabled=False, color_jitter=base.color_jitter,
                           erasing_prob=base.erasing_prob, stain=SA.StainAugmentConfig(method="hed"))
    assert float(jnp.abs(A.augment_batch(key, x, only) - x / 255.0).mean()) > 1e-3


@pytest.mark.parametrize("method,rotation", [("hed", 15.0), ("lab", 0.0)])
def test_stain_map_inside_the_augmentation_equals_stain_first(method, rotation):
    """The fast path (the stain map on the gathered pixels, after flips and rotation) equals
    the plain semantics: stain jitter on the unaugmented batch, then the reference
    augmentation."""
    x = (_images() * 255).astype(jnp.uint8)
    hed = SA.StainAugmentConfig(method=method, hed_alpha=0.3, hed_beta=0.1)
    kw = dict(color_jitter=((0.3, 0.3, 0.3, 0.1),) * 3, erasing_prob=(0.3,) * 3,
              rotation_degrees=rotation)
    key = jax.random.PRNGKey(5)
    fast = jax.jit(A.augment_batch, static_argnums=2)(key, x, A.AugmentConfig(stain=hed, **kw))
    first = SA.stain_augment(jax.random.fold_in(key, A.STAIN_KEY), x / 255.0, hed)
    plain = jax.jit(A.augment_batch, static_argnums=2)(key, first, A.AugmentConfig(**kw))
    np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), atol=2e-5)
    assert float(jnp.abs(first - x / 255.0).mean()) > 1e-3  # and the jitter does act


def test_stain_augment_config_checks_and_from_config():
    from histo_jax.data.config import get_data_config

    cfg = get_data_config()
    assert not A.AugmentConfig.from_config(cfg, 2).stain.enabled  # the reference: off
    cfg.stain_augment.method, cfg.stain_augment.per_input = "lab", True
    s = A.AugmentConfig.from_config(cfg, 2).stain
    assert s.method == "lab" and s.per_input and s.lab_mean == (5.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="stain_augment.method must be one of"):
        SA.StainAugmentConfig(method="hsv")
    with pytest.raises(ValueError, match="prob must lie in"):
        SA.StainAugmentConfig(method="hed", prob=2.0)
