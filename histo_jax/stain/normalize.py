"""Stain normalisation (Macenko, Reinhard): fitted once, applied alike everywhere.

A normaliser is fitted to reference tissue (``fit``; ``python -m histo_jax.data stain fit``)
and saved as a small JSON file (:class:`FittedStain`): the reference stain matrix and
concentration percentiles (Macenko) or the LAB statistics (Reinhard). :class:`StainNormalizer`
applies it to batches of images ``(..., H, W, 3)``, each image normalised on its own
statistics, with the same formulas in numpy (float64: ``stain apply``, ``extract --stain``)
and JAX (float32, inside the jitted train, eval and prediction steps).

* **Macenko** (Macenko et al., ISBI 2009), as torchstain's numpy backend: OD =
  ``-ln((255 I + 1) / Io)``; tissue pixels have OD >= ``beta`` in every channel; the stain
  plane is spanned by the two leading eigenvectors of the tissue OD covariance; the stain
  vectors are the ``alpha`` and ``100 - alpha`` percentile angles in that plane (the one
  with the larger red OD is haematoxylin); concentrations by least squares over all pixels,
  scaled so that their 99th percentiles match the reference's; the image is rebuilt with the
  reference stain matrix, ``Io exp(-HE_ref C)`` capped at 255. Eigenvector signs are made
  canonical (the estimate does not depend on them).
* **Reinhard** (Reinhard et al., 2001), as torchstain: per channel of CIE LAB, the image's
  mean and standard deviation over all pixels are mapped onto the reference's.

Patches whose estimate cannot be trusted pass through unchanged and are counted (the
``ok`` output): less than ``min_tissue`` of the pixels is tissue (near-white or empty
patches), a non-finite or degenerate estimate (blur or a single stain makes the two stain
vectors coincide), or (Macenko) an estimated stain vector more than ``max_angle`` degrees
from the reference's (pen marks, ink, folds). Pixel values 0 and 255 are safe: Macenko's
``+1`` keeps the OD finite, and OD below ``beta`` (white, 255) is background.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import numpy as np

from histo_jax.stain import colour

FORMAT = "histo_jax.stain"
VERSION = 1
METHODS = ("macenko", "reinhard")
# torchstain's defaults (Macenko): transmitted light, percentile, OD threshold.
DEFAULT_IO, DEFAULT_ALPHA, DEFAULT_BETA = 240.0, 1.0, 0.15
MIN_FIT_TISSUE_PIXELS = 500
MAX_FIT_PIXELS = 1 << 22  # a fit pools at most this many pixels (evenly strided per image)


class StainError(ValueError):
    """A stain reference, file or setting the user has to fix (the message says how)."""


# ---- the fitted normaliser (what stain.json holds) ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class FittedStain:
    """A fitted normaliser. Macenko: ``stain_matrix`` (3 x 2, OD of unit H and E, columns) and
    ``max_conc`` (99th percentiles of H and E); Reinhard: ``lab_mean``, ``lab_std``."""

    method: str
    stain_matrix: tuple = ()
    max_conc: tuple = ()
    lab_mean: tuple = ()
    lab_std: tuple = ()
    io: float = DEFAULT_IO
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    fitted_on: tuple = ()     # the reference files, as given
    num_pixels: int = 0       # tissue pixels (Macenko) or pixels (Reinhard) of the fit

    def __post_init__(self):
        if self.method not in METHODS:
            raise StainError(f"unknown stain normalisation method {self.method!r}; use one of "
                             f"{METHODS}.")
        if self.method == "macenko":
            m = np.asarray(self.stain_matrix, np.float64)
            if m.shape != (3, 2) or np.asarray(self.max_conc).shape != (2,):
                raise StainError("a Macenko fit needs stain_matrix 3 x 2 and max_conc (2,); got "
                                 f"{m.shape} and {np.asarray(self.max_conc).shape}.")
        elif np.asarray(self.lab_mean).shape != (3,) or np.asarray(self.lab_std).shape != (3,):
            raise StainError("a Reinhard fit needs lab_mean (3,) and lab_std (3,).")

    def params(self) -> dict:
        """The numbers the normalisation uses (what identifies it)."""
        if self.method == "macenko":
            return {"method": self.method, "stain_matrix": [list(r) for r in self.stain_matrix],
                    "max_conc": list(self.max_conc), "io": self.io, "alpha": self.alpha,
                    "beta": self.beta}
        return {"method": self.method, "lab_mean": list(self.lab_mean),
                "lab_std": list(self.lab_std), "io": self.io, "beta": self.beta}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.params(),
                "fitted_on": list(self.fitted_on), "num_pixels": self.num_pixels,
                "fingerprint": self.fingerprint()}

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(tmp, path)


def load(path: str, method: str | None = None) -> FittedStain:
    """Reads a stain file. ``method``: the method the caller expects (None: any).

    Raises:
      StainError: missing or unreadable file, another format or version, another method.
    """
    hint = ("fit one with `python -m histo_jax.data stain fit --ref IMAGE|DIR|SLIDE --method "
            f"{method or 'macenko'} --out stain.json`")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise StainError(f"stain file {path} not found: {hint}.") from None
    except (OSError, ValueError) as e:
        raise StainError(f"stain file {path} cannot be read ({type(e).__name__}: {e}): {hint}."
                         ) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise StainError(f"{path} is not a histo_jax stain file (no \"format\": \"{FORMAT}\"): "
                         f"{hint}.")
    if d.get("version") != VERSION:
        raise StainError(f"{path} is a stain file of version {d.get('version')!r}; this "
                         f"histo_jax reads version {VERSION}: refit it ({hint}).")
    if method is not None and d.get("method") != method:
        raise StainError(f"{path} holds a {d.get('method')!r} fit but the configuration asks for "
                         f"{method!r}: set the method to {d.get('method')!r} or {hint}.")
    try:
        fitted = FittedStain(
            method=d["method"], io=float(d["io"]), beta=float(d["beta"]),
            alpha=float(d.get("alpha", DEFAULT_ALPHA)),
            stain_matrix=tuple(tuple(float(v) for v in r) for r in d.get("stain_matrix", ())),
            max_conc=tuple(float(v) for v in d.get("max_conc", ())),
            lab_mean=tuple(float(v) for v in d.get("lab_mean", ())),
            lab_std=tuple(float(v) for v in d.get("lab_std", ())),
            fitted_on=tuple(d.get("fitted_on", ())), num_pixels=int(d.get("num_pixels", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise StainError(f"{path}: malformed stain file ({type(e).__name__}: {e}): {hint}."
                         ) from None
    return fitted


# ---- the shared formulas (numpy or JAX, batched over leading axes) -----------------------------

def _flat(images):
    """(..., H, W, 3) -> float (B, P, 3) in [0, 1], and the leading shape."""
    colour.check_rgb(images, "stain normalisation")
    x = colour.as_unit_float(images)
    lead = x.shape[:-3]
    return x.reshape((-1, x.shape[-3] * x.shape[-2], 3)), lead


def macenko_od(x, io: float, beta: float):
    """Macenko's OD ``-ln((255 x + 1) / io)`` and tissue mask (OD >= beta in all channels)."""
    xp = colour.xp_of(x)
    od = -xp.log((x * 255.0 + 1.0) / io)
    return od, xp.all(od >= beta, axis=-1)


def masked_percentile(x, mask, q: float):
    """numpy's linear-interpolation percentile ``q`` of ``x[b][mask[b]]`` for each row b of
    (B, P) arrays (NaN where a row has no valid entry)."""
    xp = colour.xp_of(x)
    n = mask.sum(-1)
    s = xp.sort(xp.where(mask, x, xp.inf), axis=-1)
    pos = (q / 100.0) * xp.maximum(n - 1, 0).astype(x.dtype)
    lo = xp.floor(pos).astype(xp.int32)
    hi = xp.minimum(lo + 1, xp.maximum(n - 1, 0)).astype(xp.int32)
    a = xp.take_along_axis(s, lo[:, None], axis=-1)[:, 0]
    b = xp.take_along_axis(s, hi[:, None], axis=-1)[:, 0]
    out = a + (b - a) * (pos - lo)
    return xp.where(n > 0, out, xp.nan)


def macenko_stains(od, mask, alpha: float):
    """Stain matrices (B, 3, 2) (columns H, E) of OD pixels (B, P, 3) over ``mask`` (B, P)."""
    xp = colour.xp_of(od)
    m = mask[..., None].astype(od.dtype)
    n = mask.sum(-1).astype(od.dtype)
    mean = (od * m).sum(-2) / xp.maximum(n, 1.0)[:, None]
    d = (od - mean[:, None, :]) * m
    cov = xp.swapaxes(d, -1, -2) @ d / xp.maximum(n - 1.0, 1.0)[:, None, None]
    cov = xp.where(xp.isfinite(cov), cov, 0.0)
    _, vecs = xp.linalg.eigh(cov)                                   # ascending eigenvalues
    sign = xp.where(vecs.sum(-2, keepdims=True) < 0, -1.0, 1.0)     # canonical signs
    plane = (vecs * sign)[..., 1:3]                                 # (B, 3, 2)
    t = od @ plane
    phi = xp.arctan2(t[..., 1], t[..., 0])
    lo = masked_percentile(phi, mask, alpha)
    hi = masked_percentile(phi, mask, 100.0 - alpha)
    v_min = (plane @ xp.stack([xp.cos(lo), xp.sin(lo)], -1)[..., None])[..., 0]
    v_max = (plane @ xp.stack([xp.cos(hi), xp.sin(hi)], -1)[..., None])[..., 0]
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    h = xp.where(h_first, v_min, v_max)
    e = xp.where(h_first, v_max, v_min)
    return xp.stack([h, e], axis=-1)


def macenko_concentrations(od, he):
    """Least-squares concentrations (B, P, 2) of OD (B, P, 3) for stain matrices (B, 3, 2)."""
    xp = colour.xp_of(od)
    hth = xp.swapaxes(he, -1, -2) @ he                               # (B, 2, 2)
    a, b, c, d = hth[:, 0, 0], hth[:, 0, 1], hth[:, 1, 0], hth[:, 1, 1]
    det = a * d - b * c
    inv = xp.stack([xp.stack([d, -b], -1), xp.stack([-c, a], -1)], -2) / det[:, None, None]
    pinv = inv @ xp.swapaxes(he, -1, -2)                             # (B, 2, 3)
    return od @ xp.swapaxes(pinv, -1, -2)


def _cos_angle(u, v, xp):
    return (u * v).sum(-1) / (xp.sqrt((u * u).sum(-1) * (v * v).sum(-1)) + 1e-12)


@dataclasses.dataclass(frozen=True)
class StainNormalizer:
    """Applies a :class:`FittedStain`; hashable, so jitted steps can close over it.

    ``min_tissue``: smallest fraction of tissue pixels for an estimate; ``max_angle``:
    largest angle (degrees) between an estimated and the reference stain vector (Macenko;
    0 disables the check).
    """

    fitted: FittedStain
    min_tissue: float = 0.02
    max_angle: float = 30.0
    min_stain_angle: float = 1.0  # the estimated H and E vectors must differ by this much

    def __call__(self, images):
        """images (..., H, W, 3), uint8 or float in [0, 1] -> (float [0, 1] same shape, ok (...,)).

        ``ok`` is False for the images passed through unchanged (see the module docstring).
        """
        xp = colour.xp_of(images)
        if xp is np:  # degenerate estimates give NaN / inf, detected below: no warnings
            with np.errstate(all="ignore"):
                return self._apply(images, xp)
        return self._apply(images, xp)

    def _apply(self, images, xp):
        x, lead = _flat(images)
        f = self.fitted
        od, tissue = macenko_od(x, f.io, f.beta)
        enough = tissue.mean(-1) >= max(self.min_tissue, 1e-9)
        if f.method == "macenko":
            out, ok = self._macenko(x, od, tissue, xp)
        else:
            out, ok = self._reinhard(x, xp)
        ok = ok & enough & xp.all(xp.isfinite(out), axis=(-1, -2))
        out = xp.where(ok[:, None, None], out, x)
        shape = lead + tuple(images.shape[-3:])
        return out.reshape(shape), ok.reshape(lead)

    def _macenko(self, x, od, tissue, xp):
        f = self.fitted
        he = macenko_stains(od, tissue, f.alpha)
        conc = macenko_concentrations(od, he)
        every = xp.ones(conc.shape[:2], bool)
        max_c = xp.stack([masked_percentile(conc[..., k], every, 99.0) for k in range(2)], -1)
        ref = xp.asarray(f.stain_matrix, x.dtype)
        ref_max = xp.asarray(f.max_conc, x.dtype)
        c2 = conc / (max_c / ref_max)[:, None, :]
        out = xp.minimum(f.io * xp.exp(-(c2 @ ref.T)), 255.0) / 255.0
        h, e = he[..., 0], he[..., 1]
        ok = xp.all(xp.isfinite(he), axis=(-1, -2)) & xp.all(max_c > 1e-6, axis=-1)
        ok = ok & (_cos_angle(h, e, xp) < math.cos(math.radians(self.min_stain_angle)))
        if self.max_angle > 0:
            cmax = math.cos(math.radians(self.max_angle))
            ok = ok & (_cos_angle(h, ref[:, 0], xp) >= cmax) & (_cos_angle(e, ref[:, 1], xp) >= cmax)
        return out, ok

    def _reinhard(self, x, xp):
        f = self.fitted
        lab = colour.rgb2lab(x)
        mu, std = lab.mean(-2), lab.std(-2)
        tm, ts = xp.asarray(f.lab_mean, x.dtype), xp.asarray(f.lab_std, x.dtype)
        ok = xp.all(std > 1e-3, axis=-1)
        safe = xp.where(std > 1e-3, std, 1.0)
        out = colour.lab2rgb((lab - mu[:, None]) / safe[:, None] * ts + tm)
        return out, ok


def apply_uint8(normalizer: StainNormalizer, image: np.ndarray) -> tuple[np.ndarray, bool]:
    """numpy: one uint8 (H, W, 3) image -> (normalised uint8 rounded, ok)."""
    out, ok = normalizer(np.asarray(image))
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), bool(ok)


# ---- fitting (numpy, host) ---------------------------------------------------------------------

def fit(images, method: str, *, names=(), io: float = DEFAULT_IO, alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA, what: str = "the reference") -> FittedStain:
    """Fits a normaliser to reference images (a list of uint8 (H, W, 3) arrays or one array),
    pooling their pixels (at most ``MAX_FIT_PIXELS``: each image gives an even share, taking
    every k-th pixel). Raises :class:`StainError` when they hold (almost) no tissue."""
    if method not in METHODS:
        raise StainError(f"unknown stain normalisation method {method!r}; use one of {METHODS}.")
    imgs = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    if not imgs:
        raise StainError(f"{what}: no image to fit the stain normaliser to.")
    flat = []
    for k, img in enumerate(imgs):
        img = np.asarray(img)
        label = names[k] if k < len(names) else what
        colour.check_rgb(img, label)
        px = img.reshape(-1, 3)
        step = max(1, math.ceil(len(px) * len(imgs) / MAX_FIT_PIXELS))
        flat.append(colour.as_unit_float(px[::step]))
    x = np.concatenate(flat)[None]                                  # (1, P, 3)
    od, tissue = macenko_od(x, io, beta)
    n_tissue = int(tissue.sum())
    if n_tissue < MIN_FIT_TISSUE_PIXELS or tissue.mean() < 0.01:
        raise StainError(
            f"{what} holds no tissue to fit a stain normaliser to: {n_tissue} of {x.shape[1]} "
            f"pixels have optical density >= {beta} in every channel (near-white or empty "
            "images). Give H&E images or a slide with tissue.")
    common = dict(method=method, io=float(io), alpha=float(alpha), beta=float(beta),
                  fitted_on=tuple(names))
    if method == "macenko":
        he = macenko_stains(od, tissue, alpha)
        conc = macenko_concentrations(od, he)
        every = np.ones(conc.shape[:2], bool)
        max_c = [float(masked_percentile(conc[..., k], every, 99.0)[0]) for k in range(2)]
        if not np.all(np.isfinite(he)) or min(max_c) <= 0:
            raise StainError(f"{what}: the Macenko estimate is degenerate (a single stain, or "
                             "no contrast); give H&E tissue with both nuclei and stroma.")
        return FittedStain(stain_matrix=tuple(tuple(float(v) for v in r) for r in he[0]),
                           max_conc=tuple(max_c), num_pixels=n_tissue, **common)
    lab = colour.rgb2lab(x[0])
    return FittedStain(lab_mean=tuple(float(v) for v in lab.mean(0)),
                       lab_std=tuple(float(v) for v in lab.std(0)), num_pixels=int(x.shape[1]),
                       **common)



# ---- configuration -----------------------------------------------------------------------------

RUN_FILE = "stain.json"  # a run's copy of its fitted normaliser
WHERE_CHOICES = ("step",)


def from_config(stain_cfg, path: str | None = None) -> StainNormalizer | None:
    """The normaliser of a ``data.stain`` ConfigDict (None when ``method`` is 'none').

    ``path`` replaces ``stain_cfg.file`` (e.g. a run's own copy, or ``--stain``).
    """
    if stain_cfg is None or stain_cfg.method == "none":
        return None
    if stain_cfg.method not in METHODS:
        raise StainError(f"data.stain.method must be 'none' or one of {METHODS}; got "
                         f"{stain_cfg.method!r}.")
    if stain_cfg.where not in WHERE_CHOICES:
        raise StainError(f"data.stain.where must be one of {WHERE_CHOICES}; got "
                         f"{stain_cfg.where!r} (to normalise crops on disk once, use `python -m "
                         "histo_jax.data stain apply` or `extract --stain`).")
    path = path or stain_cfg.file
    if not path:
        raise StainError(f"data.stain.method is {stain_cfg.method!r} but data.stain.file is empty: "
                         "fit a normaliser with `python -m histo_jax.data stain fit --ref "
                         f"IMAGE|DIR|SLIDE --method {stain_cfg.method} --out stain.json` and pass "
                         "--config.data.stain.file=stain.json.")
    return StainNormalizer(load(os.path.expanduser(path), stain_cfg.method),
                           min_tissue=float(stain_cfg.min_tissue),
                           max_angle=float(stain_cfg.max_angle))
