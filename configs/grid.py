"""The study: test macro-F1 for 1..4 scales x 5 runs (docs/reference.md §4), reference settings.

    python main.py --config=configs/grid.py --config.data.dir=/path/to/data --workdir=runs/grid

Writes runs/grid/n<N>/run<r>/metrics.json per cell, runs/grid/results.csv and
runs/grid/f1_vs_scales.png. Finished cells are skipped when the command is rerun.
Narrow it with e.g. --config.grid.num_inputs="(1,4)" --config.grid.runs="(0,1)".
results.csv's std_test_f1 is the population standard deviation (ddof=0), as the study's
np.std. Training uses per-input BatchNorm statistics (model.bn_stats='per_input', the
reference; see configs/four_scale.py).
"""

from histo_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.model.pretrained = "imagenet"
    config.grid.num_inputs = (1, 2, 3, 4)
    config.grid.runs = (0, 1, 2, 3, 4)
    return config
