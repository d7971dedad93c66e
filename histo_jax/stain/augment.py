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


def stain_augment(key: jax.Array, images: jax.Array, cfg: StainAugmentConfig) -> jax.Array:
    """images (B, N, H, W, 3) float in [0, 1] -> augmented, same shape (see module docstring)."""
    if not cfg.enabled:
        return images
    b, n = images.shape[:2]
    draws = (b, n if cfg.per_input else 1)
    k_apply, k_1, k_2 = jax.random.split(key, 3)
    apply = jax.random.bernoulli(k_apply, cfg.prob, draws)[..., None]          # (B, n|1, 1)
    expand = lambda v: v[:, :, None, None, :]  # noqa: E731 - (B, n|1, 3) -> broadcast to pixels
    if cfg.method == "hed":
        alpha = jax.random.uniform(k_1, draws + (3,), minval=1 - cfg.hed_alpha,
                                   maxval=1 + cfg.hed_alpha)
        beta = jax.random.uniform(k_2, draws + (3,), minval=-cfg.hed_beta, maxval=cfg.hed_beta)
        alpha, beta = jnp.where(apply, alpha, 1.0), jnp.where(apply, beta, 0.0)
        # OD' = ((OD M^-1) * alpha + beta) M = OD (M^-1 diag(alpha) M) + beta M: one 3 x 3 map
        # per draw, written as channel sums so that log, map and exp fuse into one pass.
        m = jnp.asarray(colour.RGB_FROM_HED, jnp.float32)
        m_inv = jnp.asarray(colour.HED_FROM_RGB, jnp.float32)
        mix = jnp.einsum("kj,bnj,jc->bnkc", m_inv, alpha, m)[:, :, None, None]   # (B,n,1,1,3,3)
        shift = expand(beta @ m)
        od = colour.rgb_to_od(images)
        od = sum(od[..., k:k + 1] * mix[..., k, :] for k in range(3)) + shift
        out = colour.od_to_rgb(od)
    else:
        shift = jax.random.normal(k_1, draws + (3,)) * jnp.asarray(cfg.lab_mean, jnp.float32)
        scale = jnp.clip(1 + jax.random.normal(k_2, draws + (3,))
                         * jnp.asarray(cfg.lab_std, jnp.float32), 0.5, 1.5)
        shift, scale = jnp.where(apply, shift, 0.0), jnp.where(apply, scale, 1.0)
        lab = colour.rgb2lab(images)
        mu = lab.mean(axis=(2, 3), keepdims=True)
        out = colour.lab2rgb(mu + expand(shift) + (lab - mu) * expand(scale))
    return jnp.clip(out, 0.0, 1.0).astype(images.dtype)
