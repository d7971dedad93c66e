"""The demo: 1 and 4 scales trained on the embedded synthetic dataset, on a laptop CPU.

    python main.py --config=configs/demo.py                # workdir: runs/demo

The demo dataset (written on first use, see histo_jax/data/demo.py) signals the class by
noisy cues at different fields of view, so 4 scales should beat 1. To fit in ~10 minutes
on 2 CPU cores it uses 96 px crops, a half-width/half-depth EfficientNet trained from
scratch and few epochs; everything else (augmentation, weighted sampling and loss,
OneCycle Adam, early stopping, checkpoints, metrics, plots) is the reference procedure.
"""

from histo_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.grid.num_inputs = (1, 4)
    config.grid.runs = (0,)
    config.data.image_size = 96
    config.model.variant = "b0"
    config.model.width_mult = 0.5
    config.model.depth_mult = 0.5
    config.model.pretrained = "none"
    config.batch_size = 24
    config.eval_batch_size = 48
    config.num_epochs = 20
    config.patience = 8
    config.optimizer.learning_rate = 2e-3
    return config
