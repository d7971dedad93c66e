"""Reference configuration of docs/reference.md §4 with 3 input scale(s): the first 3 of
data.scales (reference order 1024, 2048, 512, 256).

Run (on your data; without --config.data.dir the demo dataset is used):
    python main.py --config=configs/three_scale.py --config.data.dir=/path/to/data \
        --workdir=runs/three_scale
Override any field, e.g. --config.run=3 --config.num_epochs=50 --config.model.pretrained=imagenet

Training normalises each input scale with its own BatchNorm batch statistics and updates
the running averages once per input (model.bn_stats='per_input', the default): the original
calls its shared encoder once per input. --config.model.bn_stats=joint pools all scales'
statistics instead, a deviation from the reference.
"""

from histo_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.num_inputs = 3
    # The study used ImageNet-pretrained EfficientNet-B0 (torchvision IMAGENET1K_V1).
    config.model.pretrained = "imagenet"
    return config
