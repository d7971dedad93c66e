"""The slide demo: 4 scales trained on crops extracted from the synthetic demo slides.

    python -m histo_jax.data demo --slides runs/demo_slides
    python -m histo_jax.data extract --slides runs/demo_slides/train \
        --annotations runs/demo_slides/annotations --outside_label 0 --border pad \
        --stride 512 --size 224 --out runs/demo_slides/crops
    python main.py --config=configs/slides_demo.py               # workdir: runs/slides_demo
    python -m histo_jax.predict --run=runs/slides_demo --slides=runs/demo_slides/new \
        --annotations=runs/demo_slides/annotations --stride=128 --out=runs/demo_slides/predictions

The crops' num_id is their slide, so the splits hold out whole slides. Settings are those
of configs/demo.py (96 px inputs, the 'tiny' encoder trained from scratch, light dropout,
geometric augmentation only) so that extraction, training and slide prediction finish in
well under 10 minutes on 2 CPU cores; one run of 4 scales instead of the 1 / 4 grid.
"""

from histo_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.data.dir = "runs/demo_slides/crops"
    config.num_inputs = 4
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
    config.num_epochs = 20
    config.patience = 8
    config.optimizer.learning_rate = 3e-3
    return config
