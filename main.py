"""histo_jax entry point: trains one run, or the scales x runs grid when the config asks for it.

    python main.py --config=configs/four_scale.py --workdir=runs/four_scale
    python main.py --config=configs/four_scale.py --config.data.dir=/data/thyroid --config.run=2
    python main.py --config=configs/grid.py --config.data.dir=/data/thyroid --workdir=runs/grid

Rerunning a command with the same workdir resumes it. Without --config.data.dir the
embedded demo dataset is used (generated on first use).
"""

import logging as std_logging
import os

from histo_jax import hostenv

if __name__ == "__main__":  # First, before JAX starts threads: see histo_jax/hostenv.py.
    hostenv.reexec_with_malloc_tuning()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from histo_jax import grid, parallel, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, pictures. "
                    "Default: runs/<config file name>.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # libraries: warnings only; histo_jax: info
    std_logging.getLogger("histo_jax").setLevel(std_logging.INFO)
    parallel.maybe_initialize_distributed()
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0])
    if config.grid.num_inputs:
        grid.run_grid(config, workdir)
    else:
        train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
