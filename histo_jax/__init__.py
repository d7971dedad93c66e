"""histo_jax: multi-magnification histology patch classification in JAX / Flax NNX."""

__version__ = "0.1.0"
