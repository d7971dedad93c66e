"""The demo: 1 and 4 scales trained on the embedded synthetic dataset, on a laptop CPU.

    python main.py --config=configs/demo.py                # workdir: runs/demo

The demo dataset (written on first use, see histo_jax/data/demo.py) signals the class by
noisy cues at different fields of view, so 4 scales can beat 1. To finish in well under
10 minutes on 2 CPU cores, trained from scratch (no download), it differs from the
reference configuration in four documented ways: 96 px inputs, the 'tiny' encoder,
light dropout (0.1, no stochastic depth), and geometric augmentation only (flips,
rotation, blur: the reference's strong colour jitter and erasing, meant for an
ImageNet-pretrained encoder, stop a small from-scratch model from learning in this
budget). Sampling, weighted loss, OneCycle Adam, per-input BatchNorm statistics (model.bn_stats),
early stopping, checkpoints, metrics and plots are the reference procedure.
"""

from histo_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.grid.num_inputs = (1, 4)
    config.grid.runs = (0,)
    config.data.image_size = 96
    config.data.color_jitter = ((0.0, 0.0, 0.0, 0.0),) * 4
    config.data.erasing_prob = (0.0, 0.0, 0.0, 0.0)
    config.model.variant = "tiny"
    config.model.pretrained = "none"
    config.model.dropout = 0.1
    config.model.attn_dropout = 0.1
    config.model.stochastic_depth = 0.0
    config.batch_size = 12
    config.eval_batch_size = 48
    config.num_epochs = 25
    config.patience = 10
    config.optimizer.learning_rate = 3e-3
    return config
