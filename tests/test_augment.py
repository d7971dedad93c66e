"""Tests of histo_jax.data.augment: torchvision parity of every op, randomness, shapes."""
import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histo_jax.data import augment as A
from histo_jax.data.config import get_data_config

REF = os.path.join(os.path.dirname(__file__), "fixtures", "augment_torchvision_ref.npz")
NO_OP = A.AugmentConfig(  # Every random op switched to identity; tests enable one at a time.
    hflip_prob=0.0, vflip_prob=0.0, rotation_degrees=0.0,
    color_jitter=((0.0, 0.0, 0.0, 0.0),) * 4, blur_kernel=1, erasing_prob=(0.0,) * 4)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF))


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)


augment = jax.jit(A.augment_batch, static_argnums=2)


def test_from_config_reference_values():
    cfg = A.AugmentConfig.from_config(get_data_config(), 2)
    assert cfg.color_jitter == ((0.3, 0.3, 0.3, 0.1), (0.4, 0.4, 0.4, 0.2))
    assert cfg.erasing_prob == (0.3, 0.4)
    assert cfg.num_inputs == 2 and cfg.enabled and not cfg.shared_geometry
    with pytest.raises(ValueError, match="color_jitter"):
        A.AugmentConfig.from_config(get_data_config(), 5)


@pytest.mark.parametrize("angle", [7.0, -13.0, 90.0])
def test_rotation_matches_torchvision(ref, angle):
    out = A.rotate_nearest(jnp.asarray(ref["image"]), angle)
    np.testing.assert_array_equal(np.asarray(out), ref[f"rotate_{angle:g}"])


def test_rotation_90_is_rot90_and_fills_zero():
    img = np.random.default_rng(1).uniform(0.1, 1, (8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(A.rotate_nearest(jnp.asarray(img), 90.0)), np.rot90(img, 1))
    rotated = np.asarray(A.rotate_nearest(jnp.asarray(img), 45.0))
    assert np.all(rotated[0, 0] == 0) and np.all(rotated[4, 4] > 0)


@pytest.mark.parametrize("factor", [0.6, 1.3])
def test_colour_ops_match_torchvision(ref, factor):
    img = jnp.asarray(ref["image"])
    for name, fn in (("brightness", A.adjust_brightness), ("contrast", A.adjust_contrast),
                     ("saturation", A.adjust_saturation)):
        np.testing.assert_allclose(np.asarray(fn(img, factor)), ref[f"{name}_{factor:g}"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(A.adjust_brightness(img, factor)),
                               np.clip(ref["image"] * factor, 0, 1), atol=1e-7)


@pytest.mark.parametrize("hue", [-0.2, 0.0, 0.15])
def test_hue_matches_torchvision(ref, hue):
    out = np.asarray(A.adjust_hue(jnp.asarray(ref["image"]), hue))
    np.testing.assert_allclose(out, ref[f"hue_{hue:g}"], atol=1e-5)
    if hue == 0.0:
        np.testing.assert_allclose(out, ref["image"], atol=1e-5)


@pytest.mark.parametrize("sigma", [0.3, 1.7])
def test_blur_matches_torchvision(ref, sigma):
    out = A.gaussian_blur(jnp.asarray(ref["image"]), 3, sigma)
    np.testing.assert_allclose(np.asarray(out), ref[f"blur_{sigma:g}"], atol=1e-6)
    const = jnp.full((6, 7, 3), 0.42)
    np.testing.assert_allclose(np.asarray(A.gaussian_blur(const, 3, sigma)), 0.42, atol=1e-6)


def test_colour_ops_follow_the_drawn_order(ref):
    """apply_color_ops == applying the four ops one after the other, for all 24 orders."""
    img = jnp.asarray(ref["image"])
    factors = (0.7, 1.4, 0.5, 0.12)
    ops = (A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue)
    orders = np.array(list(itertools.permutations(range(4))))
    got = jax.jit(jax.vmap(lambda o: A.apply_color_ops(img, o, *factors)))(orders)
    for order, out in zip(orders, np.asarray(got)):
        expected = img
        for op in order:
            expected = ops[op](expected, factors[op])
        np.testing.assert_allclose(out, np.asarray(expected), atol=1e-5, err_msg=str(order))


def test_erasing_area_and_zero_fill():
    img = jnp.full((40, 40, 3), 0.5)
    areas = []
    for seed in range(20):
        u = jax.random.uniform(jax.random.key(seed), (A.ERASING_DRAWS,))
        out = np.asarray(A.random_erasing(u, img, 1.0, (0.02, 0.33), (0.3, 3.3)))
        zero = np.all(out == 0, axis=-1)
        assert np.all(out[~zero] == 0.5)
        rows, cols = np.nonzero(zero)
        assert zero.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # One filled rectangle.
        areas.append(zero.sum() / 1600)
    assert 0.015 <= min(areas) and max(areas) <= 0.36  # Rounding of h, w.
    never = A.random_erasing(jnp.zeros(A.ERASING_DRAWS), img, 0.0, (0.02, 0.33), (0.3, 3.3))
    np.testing.assert_array_equal(np.asarray(never), np.asarray(img))


def test_erasing_position_covers_every_offset():
    """The top-left corner is uniform over every position where the rectangle fits."""
    img = jnp.ones((6, 6, 3))
    u = np.zeros((64, A.ERASING_DRAWS), np.float32)
    u[:, 1:3] = np.stack(np.meshgrid(*(np.arange(8) / 8,) * 2), -1).reshape(64, 2)  # top, left
    u[:, 3:3 + 10] = 1 / 36  # area 1 px: a 1x1 rectangle on the first try...
    u[:, 13:] = 0.5  # ...with aspect sqrt(0.3 * 3.3) ~ 1.
    out = np.asarray(jax.vmap(lambda v: A.random_erasing(v, img, 1.0, (0.0, 1.0), (0.3, 3.3)))(u))
    corners = {tuple(np.argwhere(o[..., 0] == 0)[0]) for o in out}
    assert all(int(np.sum(o[..., 0] == 0)) == 1 for o in out)
    assert corners == set(itertools.product(range(6), range(6)))


def test_colour_order_is_a_uniform_permutation():
    orders = np.asarray(jnp.argsort(jax.random.uniform(jax.random.key(0), (4800, 4)), axis=1))
    counts = {}
    for o in map(tuple, orders):
        counts[o] = counts.get(o, 0) + 1
    assert len(counts) == 24 and 140 < min(counts.values()) and max(counts.values()) < 260


def test_a_sample_draws_the_same_whatever_the_batch(batch):
    """Sample i's augmentation depends on (key, i) only, not on the batch size (up to
    float rounding of differently vectorised loops)."""
    cfg = A.AugmentConfig.from_config(get_data_config(), 4)
    big = np.concatenate([batch, batch[::-1]])
    np.testing.assert_allclose(np.asarray(augment(jax.random.key(7), big, cfg))[:3],
                               np.asarray(augment(jax.random.key(7), batch, cfg)), atol=1e-6)


def test_shapes_range_determinism(batch):
    cfg = A.AugmentConfig.from_config(get_data_config(), 4)
    out = augment(jax.random.key(0), batch, cfg)
    assert out.shape == batch.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(augment(jax.random.key(0), batch, cfg)))
    assert not np.array_equal(np.asarray(out), np.asarray(augment(jax.random.key(1), batch, cfg)))
    off = dataclasses.replace(cfg, enabled=False)
    np.testing.assert_allclose(np.asarray(augment(jax.random.key(0), batch, off)), batch / 255.0, atol=1e-7)


def test_flip_p1_equals_np_flip(batch):
    cfg = dataclasses.replace(NO_OP, hflip_prob=1.0)
    np.testing.assert_allclose(np.asarray(augment(jax.random.key(3), batch, cfg)),
                               batch[:, :, :, ::-1] / 255.0, atol=1e-6)
    cfg = dataclasses.replace(NO_OP, vflip_prob=1.0)
    np.testing.assert_allclose(np.asarray(augment(jax.random.key(3), batch, cfg)),
                               batch[:, :, ::-1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(augment(jax.random.key(3), batch, NO_OP)), batch / 255.0,
                               atol=1e-6)


def _flip_pattern(out, batch):
    """Per (sample, input): 0 = unchanged, 1 = h-flipped, 2 = v-flipped, 3 = both."""
    x = batch / 255.0
    pattern = np.zeros(batch.shape[:2], int)
    for code, ref in enumerate((x, x[:, :, :, ::-1], x[:, :, ::-1], x[:, :, ::-1, ::-1])):
        pattern[np.all(np.isclose(out, ref, atol=1e-6), axis=(2, 3, 4))] = code
    return pattern


def test_geometry_independent_per_input_unless_shared():
    batch = np.random.default_rng(2).integers(0, 256, (16, 4, 8, 8, 3), dtype=np.uint8)
    cfg = dataclasses.replace(NO_OP, hflip_prob=0.5, vflip_prob=0.5)
    independent = _flip_pattern(np.asarray(augment(jax.random.key(5), batch, cfg)), batch)
    assert len(np.unique(independent)) == 4  # All 4 flip combinations occur.
    assert any(len(set(row)) > 1 for row in independent)  # Inputs of a sample differ.
    shared = _flip_pattern(np.asarray(augment(
        jax.random.key(5), batch, dataclasses.replace(cfg, shared_geometry=True))), batch)
    assert all(len(set(row)) == 1 for row in shared) and len(np.unique(shared)) > 1


def test_per_input_colour_strength():
    """Input 0 has no jitter, input 1 strong brightness jitter: only input 1 changes."""
    batch = np.full((8, 2, 8, 8, 3), 128, np.uint8)
    cfg = dataclasses.replace(NO_OP, color_jitter=((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0)),
                              erasing_prob=(0.0, 0.0))
    out = np.asarray(augment(jax.random.key(0), batch, cfg))
    np.testing.assert_allclose(out[:, 0], 128 / 255.0, atol=1e-6)
    factors = out[:, 1, 0, 0, 0] / (128 / 255.0)
    assert np.all((factors >= 0.5 - 1e-5) & (factors <= 1.5 + 1e-5)) and np.ptp(factors) > 0.1


def test_preprocess():
    x = np.full((1, 1, 2, 2, 3), 255, np.uint8)
    np.testing.assert_allclose(np.asarray(A.preprocess(x)), 1.0)
    norm = np.asarray(A.preprocess(x, "imagenet"))[0, 0, 0, 0]
    np.testing.assert_allclose(norm, (1 - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(A.preprocess(x / 255.0)), 1.0)  # Float kept in [0, 1].
    with pytest.raises(ValueError, match="normalization"):
        A.preprocess(x, "zscore")
