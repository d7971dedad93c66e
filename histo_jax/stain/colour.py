"""Colour spaces of stain handling, written once for numpy and JAX.

Every function takes arrays ``(..., 3)`` (RGB in [0, 1], optical density, stain
concentrations or CIE LAB) and works on ``numpy`` arrays (float64, host) or ``jax``
arrays (float32, jit-able, batched, on device): the array module is chosen from the
input, so one formula serves the command-line tools and the jitted steps.

* Optical density (Beer-Lambert): ``OD = -ln(max(I, eps))`` with the clamp ``eps = 1e-6``
  (scikit-image's), so 0-valued channels give a large finite OD, never infinity.
* Colour deconvolution with the H&E(-DAB) basis of Ruifrok & Johnston (2001): rows of
  :data:`RGB_FROM_HED` are the OD vectors of one unit of haematoxylin, eosin and DAB.
  :func:`rgb2hed` / :func:`hed2rgb` equal ``skimage.color.rgb2hed`` / ``hed2rgb``
  (concentrations in scikit-image's units, OD / ln(10^6)); :func:`od_to_concentrations`
  gives them in OD units.
* CIE LAB (sRGB, D65, 2 degree observer), as ``skimage.color.rgb2lab`` / ``lab2rgb``.
"""
from __future__ import annotations

import sys

import numpy as np

# Ruifrok & Johnston's OD vectors (rows: haematoxylin, eosin, DAB), as scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
OD_EPS = 1e-6
_LOG_ADJUST = -np.log(OD_EPS)  # scikit-image's HED units: OD / ln(1e6)

XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def xp_of(x):
    """``jax.numpy`` for JAX arrays and tracers, ``numpy`` otherwise (JAX is not imported
    here: the numpy tools run without it)."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return sys.modules["jax.numpy"]
    return np


def _const(xp, value, like):
    return xp.asarray(value, dtype=like.dtype)


def as_unit_float(x):
    """uint8 [0, 255] -> float in [0, 1]; float input is returned as float (numpy: float64,
    JAX: float32)."""
    xp = xp_of(x)
    dtype = xp.float64 if xp is np else xp.float32
    if x.dtype == xp.uint8:
        return x.astype(dtype) / 255.0
    return x.astype(dtype)


def check_rgb(x, what: str = "image") -> None:
    """Raises ValueError unless ``x`` has shape (..., H, W, 3)."""
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"{what}: expected an RGB image of shape (..., H, W, 3); got shape "
                         f"{tuple(x.shape)}.")


# ---- optical density and colour deconvolution ------------------------------------------------

def rgb_to_od(rgb):
    """RGB in [0, 1] -> optical density ``-ln(max(rgb, 1e-6))`` (finite for 0-valued channels)."""
    xp = xp_of(rgb)
    rgb = as_unit_float(rgb)
    return -xp.log(xp.maximum(rgb, _const(xp, OD_EPS, rgb)))


def od_to_rgb(od):
    """Optical density -> RGB ``exp(-od)`` clipped to [0, 1]."""
    xp = xp_of(od)
    return xp.clip(xp.exp(-od), 0.0, 1.0)


def od_to_concentrations(od, rgb_from_stains=RGB_FROM_HED):
    """OD (..., 3) -> stain concentrations (..., 3) in OD units: ``od @ inv(M)``."""
    xp = xp_of(od)
    return od @ _const(xp, np.linalg.inv(rgb_from_stains), od)


def concentrations_to_od(conc, rgb_from_stains=RGB_FROM_HED):
    xp = xp_of(conc)
    return conc @ _const(xp, rgb_from_stains, conc)


def rgb2hed(rgb):
    """``skimage.color.rgb2hed``: RGB [0, 1] -> H, E, DAB (scikit-image units, >= 0)."""
    xp = xp_of(rgb)
    conc = od_to_concentrations(rgb_to_od(rgb)) / _LOG_ADJUST
    return xp.maximum(conc, 0.0)


def hed2rgb(hed):
    """``skimage.color.hed2rgb``: H, E, DAB (scikit-image units) -> RGB in [0, 1]."""
    return od_to_rgb(concentrations_to_od(hed * _LOG_ADJUST))


def _mat3(xp, x, m):
    """``x @ m`` for x (..., 3) and a 3 x 3 constant. In JAX as three channel products, which
    XLA fuses with the elementwise ops around them; a dot with K = 3 is a separate,
    memory-bound matrix multiply on XLA:CPU."""
    if xp is np:
        return x @ m
    m = xp.asarray(m, x.dtype)
    return x[..., 0:1] * m[0] + x[..., 1:2] * m[1] + x[..., 2:3] * m[2]


# ---- CIE LAB -----------------------------------------------------------------------------------

def _pow(xp, x, p: float):
    """``x ** p`` for ``x > 0``. In JAX as ``exp(p log x)``: XLA:CPU fuses it at the cost of
    a copy, where its ``pow`` is 2x and its ``cbrt`` 7x slower (float32 rounding only)."""
    if xp is np:
        return x ** p
    return xp.exp(p * xp.log(x))


def rgb2lab(rgb):
    """``skimage.color.rgb2lab`` (sRGB, D65, 2 degrees): RGB [0, 1] -> L in [0, 100], a, b."""
    xp = xp_of(rgb)
    rgb = as_unit_float(rgb)
    lin = xp.where(rgb > 0.04045, _pow(xp, (xp.maximum(rgb, 0.04045) + 0.055) / 1.055, 2.4),
                   rgb / 12.92)
    xyz = _mat3(xp, lin, XYZ_FROM_RGB.T / D65_WHITE)
    f = xp.where(xyz > 0.008856, _pow(xp, xp.maximum(xyz, 0.008856), 1 / 3),
                 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return xp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab2rgb(lab):
    """``skimage.color.lab2rgb`` (sRGB, D65, 2 degrees), clipped to [0, 1]."""
    xp = xp_of(lab)
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    y = (L + 16.0) / 116.0
    x = a / 500.0 + y
    z = xp.maximum(y - b / 200.0, 0.0)  # scikit-image sets negative z to 0 (and warns)
    f = xp.stack([x, y, z], axis=-1)
    xyz = xp.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * _const(xp, D65_WHITE, xyz)
    lin = _mat3(xp, xyz, RGB_FROM_XYZ.T)
    rgb = xp.where(lin > 0.0031308, 1.055 * _pow(xp, xp.maximum(lin, 0.0031308), 1 / 2.4) - 0.055,
                   lin * 12.92)
    return xp.clip(rgb, 0.0, 1.0)
