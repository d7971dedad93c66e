"""A tiny but complete training configuration shared by the trainer and prediction tests."""

import os

from histo_jax.config import get_base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, prepared_dir: str, cache_dir: str = ""):
    """2 inputs, 32 px, tiny encoder, 4 epochs x 3 steps: fast but the full procedure."""
    c = get_base_config()
    c.data.dir, c.data.prepared_dir = data_dir, prepared_dir
    c.data.image_size, c.data.num_workers = 32, 0
    c.model.variant = "tiny"
    c.num_inputs, c.batch_size, c.eval_batch_size = 2, 8, 8
    c.num_epochs, c.patience = 4, 15
    c.checkpoint_every_steps = 2
    c.progress = False
    c.compilation_cache_dir = cache_dir
    c.xla_cpu_memory_scheduler = False  # a tiny model: the faster compile
    return c


def cli_flags(c) -> list[str]:
    """The command-line overrides that turn configs/four_scale.py into ``c``."""
    return [f"--config.data.dir={c.data.dir}", f"--config.data.prepared_dir={c.data.prepared_dir}",
            "--config.data.image_size=32", "--config.data.num_workers=0",
            "--config.model.variant=tiny", "--config.model.pretrained=none",
            "--config.num_inputs=2", "--config.batch_size=8", "--config.eval_batch_size=8",
            "--config.num_epochs=4", "--config.checkpoint_every_steps=2", "--config.progress=False",
            f"--config.compilation_cache_dir={c.compilation_cache_dir}",
            "--config.xla_cpu_memory_scheduler=False"]
