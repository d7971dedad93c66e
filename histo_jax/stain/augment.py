"""Stain augmentation inside the jitted train step (JAX): HED jitter and LAB jitter.

* ``hed`` (Tellez et al., 2018): each image's RGB is deconvolved into haematoxylin, eosin
  and DAB concentrations (Ruifrok & Johnston's basis, in OD units: ``colour.
  od_to_concentrations``), each channel is scaled by alpha ~ U(1 - hed_alpha, 1 + hed_alpha)
  and shifted by beta ~ U(-hed_beta, hed_beta), and the image is recomposed.
* ``lab`` (in the style of RandStainNA, Shen et al., 2022): per LAB channel the image's
  mean is moved by ``lab_mean[c]`` x N(0, 1) and its spread scaled by
  1 + ``lab_std[c]`` x N(0, 1) (clipped to [0.5, 1.5]), a Reinhard transfer to randomly
  drawn statistics.

The draw is shared by the N scales of one sample (one tissue region, one staining) unless
``per_input``; ``prob`` is the chance that a sample (or input) is augmented at all. The key
comes from the train step's ``fold_in(seed key, step)``, so a resumed run replays the same
draws. OD is clamped as in ``colour.rgb_to_od`` (0-valued channels give a finite OD), and the
output is clipped to [0, 1]: no NaN for any input in [0, 1].
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from histo_jax.stain import colour

AUGMENT_METHODS = ("none", "hed", "lab")


@dataclasses.dataclass(frozen=True)
class StainAugmentConfig:
    method: str = "none"
    per_input: bool = False
    prob: float = 1.0
    hed_alpha: float = 0.05
    hed_beta: float = 0.05
    lab_mean: tuple[float, float, float] = (5.0, 3.0, 3.0)
    lab_std: tuple[float, float, float] = (0.1, 0.1, 0.1)

    def __post_init__(self):
        if self.method not in AUGMENT_METHODS:
            raise ValueError(f"data.stain_augment.method must be one of {AUGMENT_METHODS}; got "
                             f"{self.method!r}.")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"data.stain_augment.prob must lie in [0, 1]; got {self.prob}.")
        if not 0 <= self.hed_alpha < 1 or self.hed_beta < 0:
            raise ValueError("data.stain_augment: need 0 <= hed_alpha < 1 and hed_beta >= 0; got "
                             f"{self.hed_alpha}, {self.hed_beta}.")
        if len(self.lab_mean) != 3 or len(self.lab_std) != 3:
            raise ValueError("data.stain_augment.lab_mean and lab_std need 3 values (L, a, b).")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @classmethod
    def from_config(cls, cfg) -> "StainAugmentConfig":
        """From a ``data.stain_augment`` ConfigDict (None: off)."""
        if cfg is None:
            return cls()
        return cls(method=str(cfg.method), per_input=bool(cfg.per_input), prob=float(cfg.prob),
                   hed_alpha=float(cfg.hed_alpha), hed_beta=float(cfg.hed_beta),
                   lab_mean=tuple(float(v) for v in cfg.lab_mean),
                   lab_std=tuple(float(v) for v in cfg.lab_std))


def draw(key: jax.Array, images: jax.Array, cfg: StainAugmentConfig) -> dict:
    """The stain jitter of a batch (B, N, H, W, 3) as per-image parameters of a per-pixel
    map (a dict of arrays with leading dims (B, N)), applied by :func:`apply_map`.

    * hed: ``OD' = ((OD M^-1) diag(alpha) + beta) M = OD (M^-1 diag(alpha) M) + beta M``:
      deconvolve, jitter and recompose folded into one 3 x 3 map ``mix`` and a ``shift``.
    * lab: each image's LAB mean ``mu`` (of the unaugmented image, on a 2 x 2 subsampled
      grid), its ``shift`` and ``scale``: ``lab' = mu + shift + (lab - mu) * scale``.

    Draws are shared by a sample's N inputs unless ``per_input``; images not drawn
    (``prob``) get the identity map.
    """
    b, n = images.shape[:2]
    draws = (b, n if cfg.per_input else 1)
    k_apply, k_1, k_2 = jax.random.split(key, 3)
    apply = jax.random.bernoulli(k_apply, cfg.prob, draws)[..., None]          # (B, n|1, 1)
    full = lambda v: jnp.broadcast_to(v, (b, n) + v.shape[2:])  # noqa: E731
    if cfg.method == "hed":
        alpha = jax.random.uniform(k_1, draws + (3,), minval=1 - cfg.hed_alpha,
                                   maxval=1 + cfg.hed_alpha)
        beta = jax.random.uniform(k_2, draws + (3,), minval=-cfg.hed_beta, maxval=cfg.hed_beta)
        alpha, beta = jnp.where(apply, alpha, 1.0), jnp.where(apply, beta, 0.0)
        m = jnp.asarray(colour.RGB_FROM_HED, jnp.float32)
        m_inv = jnp.asarray(colour.HED_FROM_RGB, jnp.float32)
        return {"mix": full(jnp.einsum("kj,bnj,jc->bnkc", m_inv, alpha, m)),
                "shift": full(beta @ m)}
    shift = jax.random.normal(k_1, draws + (3,)) * jnp.asarray(cfg.lab_mean, jnp.float32)
    scale = jnp.clip(1 + jax.random.normal(k_2, draws + (3,))
                     * jnp.asarray(cfg.lab_std, jnp.float32), 0.5, 1.5)
    shift, scale = jnp.where(apply, shift, 0.0), jnp.where(apply, scale, 1.0)
    # The image's LAB mean, estimated on every other pixel of every other row (a quarter of
    # the cost; within 0.05 LAB units of the full mean on the demo crops).
    sub = images[:, :, ::2, ::2]
    mu = colour.rgb2lab(colour.as_unit_float(sub)).mean(axis=(2, 3))           # (B, N, 3)
    return {"mu": mu, "shift": full(shift), "scale": full(scale)}


def apply_map(images: jax.Array, params: dict) -> jax.Array:
    """Applies per-image stain maps (from :func:`draw`): images (..., H, W, 3) uint8 or float
    in [0, 1], params with leading dims ``...`` -> float32 (..., H, W, 3) in [0, 1].

    A per-pixel map: it commutes with flips and nearest-neighbour rotations, so the
    trainer applies it after its geometry, on the gathered pixels (one pass, no float copy
    of the batch). 3 x 3 maps are written as channel sums so that XLA fuses the whole map.
    """
    x = colour.as_unit_float(images)
    px = lambda v: v[..., None, None, :]  # noqa: E731 - (..., 3) -> broadcast over pixels
    if "mix" in params:
        mix = params["mix"][..., None, None, :, :]
        od = colour.rgb_to_od(x)
        od = sum(od[..., k:k + 1] * mix[..., k, :] for k in range(3)) + px(params["shift"])
        out = colour.od_to_rgb(od)
    else:
        mu = px(params["mu"])
        out = colour.lab2rgb(mu + px(params["shift"]) + (colour.rgb2lab(x) - mu)
                             * px(params["scale"]))
    return jnp.clip(out, 0.0, 1.0)


def stain_augment(key: jax.Array, images: jax.Array, cfg: StainAugmentConfig) -> jax.Array:
    """images (B, N, H, W, 3) in [0, 1] (or uint8) -> augmented float, same shape (see the
    module docstring)."""
    if not cfg.enabled:
        return colour.as_unit_float(images)
    return apply_map(images, draw(key, images, cfg))
