"""Training augmentation and preprocessing as pure, jit-friendly JAX functions.

The Grain pipeline delivers uint8 batches ``(B, N, H, W, 3)``; the trainer calls
:func:`augment_batch` inside its jitted train step (with ``fold_in(seed_key, step)``,
so a resumed run draws exactly the same augmentations) and :func:`preprocess` in both
train and eval steps.

:func:`augment_batch` reproduces the reference's torchvision pipeline (docs/reference.md §2) on
every image independently -- a fresh draw per sample AND per input -- in this order:

1. ``RandomHorizontalFlip(p)``, ``RandomVerticalFlip(p)``;
2. ``RandomRotation(d)``: angle uniform in [-d, d] degrees, counter-clockwise, about
   the image centre, NEAREST interpolation, fill 0, same size (torchvision's inverse
   affine grid with ``align_corners=False``);
3. ``ColorJitter(b, c, s, h)`` with the per-input strengths of input position i:
   factors uniform in [max(0, 1 - x), 1 + x], hue in [-h, h]; the four ops are applied
   in a random order (``torch.randperm(4)``); brightness blends with black, contrast
   with the mean of the grayscale image, saturation with the grayscale image, hue
   shifts H in HSV (torchvision's ``_rgb2hsv`` / ``_hsv2rgb``); clamp to [0, 1] after
   each op;
4. ``GaussianBlur(k, sigma)``: sigma uniform in ``blur_sigma``, separable kernel on
   ``linspace(-(k-1)/2, (k-1)/2, k)``, reflect padding;
5. ``RandomErasing(p_i, scale, ratio, value=0)``: up to 10 tries of (area, log-uniform
   aspect ratio), the first rectangle that fits is zeroed at a uniform position;
6. clamp to [0, 1].

With ``shared_geometry`` the flip and rotation draws are shared by the inputs of one
sample (colour, blur and erasing stay independent).

All draws of a batch come from ONE ``jax.random.uniform(key, (B, N, 35))`` call, mapped
per image to flips, angle, colour order and factors, sigma and erasing box (``*_DRAWS``):
the same distributions as the reference's, with one threefry hash instead of ~25 per
image (their hashes were 60 % of this program's compile), and a sample's draws depend on
(key, sample index) only, whatever the batch size or sharding.

Stain augmentation (``stain``: HED or LAB jitter, ``histo_jax/stain/augment.py``; off in
the reference) acts as if it ran first, on the unaugmented images, with its own key
(``fold_in(key, STAIN_KEY)``), so the reference draws are the same with it on or off; it
runs even when the reference augmentation is disabled. Both are per-pixel maps (drawn per
image, LAB's from the image's statistics), applied after the flips and rotation, on the
gathered pixels: the same result as applying them first, with no float copy of the batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from histo_jax.stain import augment as stain_aug
from histo_jax.stain.augment import StainAugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("none", "imagenet")
_ERASING_TRIES = 10
_GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights.
STAIN_KEY = 0x57A1  # fold_in constant of the stain augmentation's key
# Uniform draws per image (all drawn at once by augment_batch, see _augment_image).
GEOMETRY_DRAWS = 3  # h-flip, v-flip, rotation angle
JITTER_DRAWS = 8  # order (4), brightness, contrast, saturation, hue
ERASING_DRAWS = 3 + 2 * _ERASING_TRIES  # apply, top, left, (area, aspect) per try
APPEARANCE_DRAWS = JITTER_DRAWS + 1 + ERASING_DRAWS  # jitter, blur sigma, erasing


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Static (hashable) augmentation settings for ``num_inputs`` inputs.

    ``color_jitter[i]`` = (brightness, contrast, saturation, hue) and
    ``erasing_prob[i]`` apply to input position i.
    """

    enabled: bool = True
    shared_geometry: bool = False
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rotation_degrees: float = 15.0
    color_jitter: tuple[tuple[float, float, float, float], ...] = ((0.3, 0.3, 0.3, 0.1),)
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    erasing_prob: tuple[float, ...] = (0.3,)
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)
    stain: StainAugmentConfig = StainAugmentConfig()

    def __post_init__(self):
        n = len(self.color_jitter)
        if len(self.erasing_prob) != n:
            raise ValueError(
                f"AugmentConfig: color_jitter has {n} entries but erasing_prob has "
                f"{len(self.erasing_prob)}; give one entry per input.")
        if any(len(cj) != 4 for cj in self.color_jitter):
            raise ValueError(
                "AugmentConfig: every color_jitter entry must be a 4-tuple "
                f"(brightness, contrast, saturation, hue); got {self.color_jitter}.")
        if any(not 0.0 <= cj[3] <= 0.5 for cj in self.color_jitter):
            raise ValueError(f"AugmentConfig: hue jitter must lie in [0, 0.5]; got {self.color_jitter}.")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"AugmentConfig: blur_kernel must be odd and >= 1; got {self.blur_kernel}.")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"AugmentConfig: blur_sigma must be 0 < min <= max; got {self.blur_sigma}.")

    @property
    def num_inputs(self) -> int:
        return len(self.color_jitter)

    @classmethod
    def from_config(cls, data_cfg: Any, num_inputs: int) -> "AugmentConfig":
        """Builds the config for the first ``num_inputs`` inputs of a data ConfigDict.

        ``data_cfg`` is ``histo_jax.data.config.get_data_config()`` (or any object
        with the same fields).
        """
        jitter = tuple(tuple(float(v) for v in cj) for cj in data_cfg.color_jitter)
        erasing = tuple(float(p) for p in data_cfg.erasing_prob)
        for name, values in (("color_jitter", jitter), ("erasing_prob", erasing)):
            if len(values) < num_inputs:
                raise ValueError(
                    f"data config field '{name}' has {len(values)} per-input entries but the "
                    f"model uses {num_inputs} inputs: add one entry per input (see "
                    "histo_jax/data/config.py).")
        return cls(
            enabled=bool(data_cfg.augment),
            shared_geometry=bool(data_cfg.shared_geometry),
            hflip_prob=float(data_cfg.hflip_prob),
            vflip_prob=float(data_cfg.vflip_prob),
            rotation_degrees=float(data_cfg.rotation_degrees),
            color_jitter=jitter[:num_inputs],
            blur_kernel=int(data_cfg.blur_kernel),
            blur_sigma=tuple(float(s) for s in data_cfg.blur_sigma),
            erasing_prob=erasing[:num_inputs],
            erasing_scale=tuple(float(s) for s in data_cfg.erasing_scale),
            erasing_ratio=tuple(float(r) for r in data_cfg.erasing_ratio),
            stain=StainAugmentConfig.from_config(data_cfg.get("stain_augment")),
        )


# ----------------------------------------------------------------------------- ops
# Every op works on one float32 image (H, W, 3) in [0, 1].

def rotate_nearest(img: jax.Array, angle_deg: jax.Array, pixel_map=None) -> jax.Array:
    """torchvision ``rotate(img, angle, NEAREST, fill=0)``: counter-clockwise about the centre.

    ``pixel_map`` (optional, per-pixel colour map) is applied to the gathered pixels before
    the fill: ``rotate_nearest(f(img)) == rotate_nearest(img, pixel_map=f)`` for any
    per-pixel ``f``, in one pass over the output.
    """
    h, w = img.shape[:2]
    theta = jnp.deg2rad(angle_deg)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    ys = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) * 0.5
    xs = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) * 0.5
    # Source location (pixel index) of every output pixel.
    ix = jnp.round(cos * xs - sin * ys + (w - 1) * 0.5).astype(jnp.int32)
    iy = jnp.round(sin * xs + cos * ys + (h - 1) * 0.5).astype(jnp.int32)
    valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = img[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
    if pixel_map is not None:
        out = pixel_map(out)
    return jnp.where(valid[..., None], out, 0.0)


def _scale(u: jax.Array, lo, hi) -> jax.Array:
    """A uniform draw ``u`` in [0, 1) mapped to [lo, hi) (``jax.random.uniform``'s map)."""
    return jnp.maximum(lo, u * (hi - lo) + lo)


def _uniform_int(u: jax.Array, n: jax.Array) -> jax.Array:
    """A uniform draw ``u`` in [0, 1) mapped to an integer uniform in [0, n)."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _grayscale(img: jax.Array) -> jax.Array:
    return img[..., 0] * _GRAY[0] + img[..., 1] * _GRAY[1] + img[..., 2] * _GRAY[2]


def _blend(img: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * img + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(img: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(img, jnp.zeros_like(img), factor)


def adjust_contrast(img: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(img, jnp.mean(_grayscale(img)), factor)


def adjust_saturation(img: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(img, _grayscale(img)[..., None], factor)


def _rgb_to_hsv_planes(img: jax.Array):
    """torchvision ``_rgb2hsv`` on an (..., 3) image -> planes (h, s, v).

    Elementwise max/min and selects only (no argmax or gather) and the two ``fmod``s
    written as exact subtractions: XLA:CPU lowers ``fmod`` to a scalar libm call, which
    made this op the most expensive of the augmentation.
    The max channel is chosen by comparisons (r first, then g, as torchvision's
    ``maxc == r`` tests), not by equality with ``maxc``: XLA may recompute ``img`` in
    several fusions with different rounding, and hue is continuous across the branch
    boundaries while an equality test would fall through to the wrong branch.
    """
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    r_max = (r >= g) & (r >= b)
    g_max = g >= b
    h = jnp.where(r_max, bc - gc, jnp.where(g_max, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h / 6.0 + 1.0  # In [5/6, 11/6]: fmod(h, 1) is h - 1 above 1, exactly (Sterbenz).
    return jnp.where(h >= 1.0, h - 1.0, h), s, maxc


def _hsv_planes_to_rgb(h: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    """HSV planes (h, s, v in [0, 1]) -> RGB (..., 3); equals torchvision's sector table
    (``v, q, p, p, t, v`` ...), computed as ``v - v * s * clip(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6``, n = 5, 3, 1 for r, g, b (n + 6h < 12, so the mod is one exact
    subtraction)."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + h * 6.0
        k = jnp.where(k >= 6.0, k - 6.0, k)
        channels.append(v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels, axis=-1)


def adjust_hue(img: jax.Array, hue_factor: jax.Array) -> jax.Array:
    h, s, v = _rgb_to_hsv_planes(img)
    h = h + hue_factor  # In [-0.5, 1.5]; jnp.mod(h, 1) without the libm fmod:
    h = jnp.where(h < 0.0, h + 1.0, jnp.where(h >= 1.0, h - 1.0, h))
    return jnp.clip(_hsv_planes_to_rgb(h, s, v), 0.0, 1.0)


def color_jitter(u: jax.Array, img: jax.Array, strengths: jax.Array) -> jax.Array:
    """torchvision ``ColorJitter``: random factors, the 4 ops in a random order.

    ``u``: ``JITTER_DRAWS`` uniforms in [0, 1): the order (argsort of 4 uniforms, a uniform
    permutation like ``torch.randperm(4)``), then the brightness, contrast, saturation and
    hue draws.
    """
    b, c, s, h = strengths[0], strengths[1], strengths[2], strengths[3]

    def factor(v, x):
        return _scale(v, jnp.maximum(0.0, 1.0 - x), 1.0 + x)

    fb, fc, fs = factor(u[4], b), factor(u[5], c), factor(u[6], s)
    fh = _scale(u[7], -h, h)
    return apply_color_ops(img, jnp.argsort(u[:4]), fb, fc, fs, fh)


def apply_color_ops(img: jax.Array, order: jax.Array, brightness, contrast, saturation, hue) -> jax.Array:
    """Applies op ``order[0]``, ..., ``order[3]`` (0 brightness, 1 contrast, 2 saturation, 3 hue).

    Same result as applying the ops one by one, but cheaper under vmap (where a
    ``lax.switch`` computes every branch): brightness, contrast and saturation are all
    ``clip(f * x + (1 - f) * other)`` and share one blend per step, and the costly hue op
    runs once (the blends before it, hue, then the blends after it).
    """
    factors = jnp.stack([jnp.asarray(brightness, jnp.float32), jnp.asarray(contrast, jnp.float32),
                         jnp.asarray(saturation, jnp.float32)])

    def blend_step(x, op):  # op 0..2: that blend; 3: identity (factor 1).
        gray = _grayscale(x)
        other = jnp.where(op == 1, jnp.mean(gray), jnp.where(op == 2, gray, 0.0))[..., None]
        return _blend(x, other, jnp.where(op == 3, 1.0, factors[jnp.minimum(op, 2)]))

    hue_step = jnp.argmax(order == 3)
    cheap_order = order[jnp.argsort(order == 3, stable=True)][:3]
    for t in range(3):
        img = blend_step(img, jnp.where(t < hue_step, cheap_order[t], 3))
    img = adjust_hue(img, hue)
    for t in range(3):
        img = blend_step(img, jnp.where(t >= hue_step, cheap_order[t], 3))
    return img


def gaussian_blur(img: jax.Array, kernel_size: int, sigma: jax.Array) -> jax.Array:
    """torchvision ``gaussian_blur``: separable kernel, reflect padding, same size."""
    half = (kernel_size - 1) * 0.5
    x = jnp.linspace(-half, half, kernel_size)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    k = k / jnp.sum(k)
    pad = kernel_size // 2
    padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    rows = sum(k[t] * padded[t:t + h] for t in range(kernel_size))
    return sum(k[t] * rows[:, t:t + w] for t in range(kernel_size))


def random_erasing(u: jax.Array, img: jax.Array, prob: jax.Array,
                   scale: tuple[float, float], ratio: tuple[float, float]) -> jax.Array:
    """torchvision ``RandomErasing(p, scale, ratio, value=0)`` (first of 10 tries that fits).

    ``u``: ``ERASING_DRAWS`` uniforms in [0, 1): apply, top, left, then 10 areas and 10
    log aspect ratios.
    """
    h, w = img.shape[:2]
    tries = u[3:]
    area = h * w * _scale(tries[:_ERASING_TRIES], scale[0], scale[1])
    aspect = jnp.exp(_scale(tries[_ERASING_TRIES:], math.log(ratio[0]), math.log(ratio[1])))
    eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (eh < h) & (ew < w)
    first = jnp.argmax(fits)
    eh, ew = eh[first], ew[first]
    top = _uniform_int(u[1], h - eh + 1)
    left = _uniform_int(u[2], w - ew + 1)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    erase = (u[0] < prob) & jnp.any(fits)
    return jnp.where((inside & erase)[..., None], 0.0, img)


# ----------------------------------------------------------------------------- pipeline

def _augment_image(img, geo, app, jitter, erase_prob, cfg: AugmentConfig, pixel_map=None):
    """One image: flips, rotation, colour jitter, blur, erasing.

    ``geo``: ``GEOMETRY_DRAWS`` uniforms in [0, 1) (h-flip, v-flip, angle); ``app``:
    ``APPEARANCE_DRAWS`` (colour jitter, blur sigma, erasing). ``pixel_map`` (the stain
    jitter; default: the uint8 -> [0, 1] conversion) is applied right after the geometry,
    on the gathered pixels: equal to applying it first, since a per-pixel map commutes
    with flips and nearest rotation.
    """
    pixel_map = pixel_map or _to_unit_float  # uint8 -> [0, 1] on the gathered pixels
    img = jnp.where(geo[0] < cfg.hflip_prob, img[:, ::-1], img)
    img = jnp.where(geo[1] < cfg.vflip_prob, img[::-1], img)
    if cfg.rotation_degrees:
        d = cfg.rotation_degrees
        img = rotate_nearest(img, _scale(geo[2], -d, d), pixel_map)
    else:
        img = pixel_map(img)
    img = color_jitter(app[:JITTER_DRAWS], img, jitter)
    if cfg.blur_kernel > 1:
        img = gaussian_blur(img, cfg.blur_kernel, _scale(app[JITTER_DRAWS], *cfg.blur_sigma))
    img = random_erasing(app[JITTER_DRAWS + 1:], img, erase_prob, cfg.erasing_scale,
                         cfg.erasing_ratio)
    return jnp.clip(img, 0.0, 1.0)


def _to_unit_float(images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def augment_batch(key: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Augments a batch ``(B, N, H, W, 3)`` (uint8 or float in [0, 1]) -> float32 in [0, 1].

    Deterministic given ``key``; independent draws per sample and per input (flips and
    rotation shared across a sample's inputs when ``cfg.shared_geometry``). With
    ``cfg.enabled`` False it only scales to [0, 1] (and applies ``cfg.stain``).
    """
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"augment_batch expects images (B, N, H, W, 3); got shape {images.shape}.")
    num_inputs = images.shape[1]
    if num_inputs > cfg.num_inputs:
        raise ValueError(
            f"augment_batch: images have {num_inputs} inputs but the AugmentConfig holds "
            f"parameters for {cfg.num_inputs}; build it with AugmentConfig.from_config(cfg, "
            f"{num_inputs}).")
    stain = cfg.stain.enabled
    stain_params = (stain_aug.draw(jax.random.fold_in(key, STAIN_KEY), images, cfg.stain)
                    if stain else None)
    if not cfg.enabled:
        return stain_aug.apply_map(images, stain_params) if stain else _to_unit_float(images)
    jitter = jnp.asarray(cfg.color_jitter[:num_inputs], jnp.float32)
    erase_p = jnp.asarray(cfg.erasing_prob[:num_inputs], jnp.float32)
    b = images.shape[0]

    # Every draw of the batch in one call: one threefry hash instead of ~25 per image
    # (jax.random's per-call hash dominated this program's compile). Partitionable
    # threefry gives element (i, n, k) from its index alone, so a sample's draws do not
    # depend on the batch size or on how the batch is sharded.
    u = jax.random.uniform(key, (b, num_inputs, GEOMETRY_DRAWS + APPEARANCE_DRAWS))
    geo, app = u[..., :GEOMETRY_DRAWS], u[..., GEOMETRY_DRAWS:]
    if cfg.shared_geometry:
        geo = jnp.broadcast_to(geo[:, :1], geo.shape)

    def fn(img, g, a, j, p, params):
        # The stain jitter, a per-pixel map, runs on the gathered pixels (_augment_image).
        def pixel_map(px):
            return stain_aug.apply_map(px, params)
        return _augment_image(img, g, a, j, p, cfg, pixel_map if stain else None)

    return jax.vmap(jax.vmap(fn), in_axes=(0, 0, 0, None, None, 0))(
        images, geo, app, jitter, erase_p, stain_params)


def preprocess(images: jax.Array, normalization: str = "none") -> jax.Array:
    """uint8 -> float32 in [0, 1] (float input is kept), then optional ImageNet mean/std.

    ``normalization``: 'none' (the reference) or 'imagenet'.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"preprocess: unknown normalization '{normalization}'; use one of {NORMALIZATIONS} "
            "(data config field 'normalization').")
    x = _to_unit_float(images)
    if normalization == "imagenet":
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        x = (x - mean) / std
    return x
