"""histo_jax: multi-magnification histology patch classification in JAX / Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    """Lazy exports (keep ``import histo_jax`` light): ``histo_jax.load_pytorch``."""
    if name == "load_pytorch":
        from histo_jax.models.build import load_pytorch
        return load_pytorch
    raise AttributeError(f"module 'histo_jax' has no attribute {name!r}")
