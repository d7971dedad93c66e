"""The base configuration: every field with the reference value of docs/reference.md §4.

Config files in ``configs/`` start from :func:`get_base_config` and change a few fields;
every field can be overridden on the command line, e.g. ``--config.num_epochs=20``.
"""

from __future__ import annotations

import ml_collections

from histo_jax.data.config import get_data_config
from histo_jax.models.config import get_model_config


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_inputs = 4            # scales used: the first num_inputs of data.scales
    c.run = 0                   # split index: train_test_split(random_state=42 + run)
    c.seed = 0                  # init, sampling, augmentation and dropout randomness

    c.data = get_data_config()
    c.model = get_model_config()

    c.batch_size = 25           # global batch, split over all devices
    c.eval_batch_size = 50
    c.num_epochs = 150
    c.patience = 15             # early stopping on validation macro-F1
    c.steps_per_epoch = 0       # 0: ceil(len(train) / batch_size), the reference epoch

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-4    # OneCycle max lr
    c.optimizer.pct_start = 0.3
    c.optimizer.div_factor = 25.0
    c.optimizer.final_div_factor = 1e4
    c.optimizer.b1_max = 0.95
    c.optimizer.b1_min = 0.85
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0
    c.class_weighted_loss = True        # cross-entropy weighted by balanced class weights

    c.log_every_steps = 10
    c.checkpoint_every_steps = 0        # 0: at the end of every epoch only
    c.keep_checkpoints = 2
    c.progress = True                   # tqdm bars with samples/s and ETA
    c.compilation_cache_dir = "auto"    # 'auto': <histo_jax cache>/jax_compilation_cache; '' disables
    # XLA:CPU only: schedule the train and eval steps for low peak memory (full-size B0 at 4
    # inputs: see benchmarks/README.md). Off: compiles faster, same numbers, more memory.
    c.xla_cpu_memory_scheduler = True
    # Multi-host: when one process fails (an error, or silent this long: killed, hung), every
    # process stops within about this many seconds, naming it (histo_jax/failstop.py).
    c.failure_timeout_s = 30.0

    # Experiment grid (configs/grid.py): empty tuples = a single run of the fields above.
    c.grid = ml_collections.ConfigDict()
    c.grid.num_inputs = ()
    c.grid.runs = ()
    return c
