"""Where histo_jax keeps its caches: ``$HISTO_JAX_CACHE``, else ``$XDG_CACHE_HOME/histo_jax``,
else ``~/.cache/histo_jax``. Subfolders: ``datasets/`` (prepared data), ``demo_dataset/``,
``weights/`` (pretrained files) and ``jax_compilation_cache/``."""

import os

CACHE_ENV = "HISTO_JAX_CACHE"


def cache_root() -> str:
    root = os.environ.get(CACHE_ENV)
    if root:
        return os.path.expanduser(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "histo_jax")
