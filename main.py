"""histo_jax entry point: trains one run, the scales x runs grid, or the cross-site
study (train on site A, test on site B: histo_jax/cross_site.py), as the config asks.

    python main.py --config=configs/four_scale.py --workdir=runs/four_scale
    python main.py --config=configs/four_scale.py --config.data.dir=/data/thyroid --config.run=2
    python main.py --config=configs/grid.py --config.data.dir=/data/thyroid --workdir=runs/grid

Rerunning a command with the same workdir resumes it (or reports the finished result). A
workdir holds one run: a command of another configuration or data is refused (unless
--discard_old_run moves the old run aside), and so is a second process on a busy workdir;
these refusals and failed writes are reported without a traceback (exit status 1).
In a multi-host run, a process that fails stops the others within config.failure_timeout_s
(default 30 s); they exit with status 3, naming it and its error (histo_jax/failstop.py).
Without --config.data.dir the embedded demo dataset is used (generated on first use).
"""

import logging as std_logging
import os

from histo_jax import hostenv

if __name__ == "__main__":  # First, before JAX starts threads: see histo_jax/hostenv.py.
    hostenv.reexec_with_malloc_tuning()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from histo_jax import cross_site, failstop, grid, parallel, train  # noqa: E402
from histo_jax import workdir as workdir_lib  # noqa: E402
from histo_jax.data.layout import DataValidationError  # noqa: E402
from histo_jax.stain import StainError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, pictures. "
                    "Default: runs/<config file name>.")
flags.DEFINE_bool("discard_old_run", False, "When --workdir (or a grid cell) holds results of "
                  "another configuration or data, move them to <workdir>.discarded-<time>/ and "
                  "start afresh, instead of refusing. A run of this configuration is resumed "
                  "as usual.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # libraries: warnings only; histo_jax: info
    std_logging.getLogger("histo_jax").setLevel(std_logging.INFO)
    config = FLAGS.config
    hostenv.keep_step_memory()  # XLA:CPU: step buffers stay resident (histo_jax/hostenv.py)
    parallel.maybe_initialize_distributed(config.failure_timeout_s)
    workdir = FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0])
    try:
        with failstop.reporting():  # multi-host: the other processes learn of a failure first
            if "cross_site" in config:
                cross_site.run_cross_site(config, workdir, discard_old_run=FLAGS.discard_old_run)
            elif config.grid.num_inputs:
                grid.run_grid(config, workdir, discard_old_run=FLAGS.discard_old_run)
            else:
                train.train_and_evaluate(config, workdir, discard_old_run=FLAGS.discard_old_run)
    except (workdir_lib.WorkdirError, train.NonFiniteLossError, DataValidationError,
            StainError) as e:
        # What is wrong, with which file, and what to do: the message says it all.
        failstop.exit_after_failure(e, f"\nhisto_jax: {e}")
    except Exception as e:
        if failstop.active() is None:
            raise
        failstop.exit_after_failure(e)  # its traceback, then the others are told
    if failstop.active() is not None:
        failstop.active().finished()


if __name__ == "__main__":
    app.run(main)
