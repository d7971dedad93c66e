"""Stain handling for H&E: colour deconvolution, normalisation (Macenko, Reinhard) and
augmentation (HED and LAB jitter). All of it is opt-in: the reference has none.

``colour``     RGB <-> optical density, the Ruifrok-Johnston HED basis, CIE LAB (numpy + JAX)
``normalize``  fit / save / load a normaliser (stain.json) and apply it (numpy + JAX)
``augment``    HED and LAB jitter inside the jitted train step
``cli``        ``python -m histo_jax.data stain fit|apply``
"""
from histo_jax.stain.normalize import FittedStain, StainError, StainNormalizer, fit, load  # noqa: F401
