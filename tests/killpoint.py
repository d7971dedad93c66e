"""Runs main.py and SIGKILLs it at a named point: the test hook of the kill -9 tests.

    HISTO_JAX_KILL_AT=<point> HISTO_JAX_MALLOC_TUNING=0 python tests/killpoint.py <main.py flags>
    HISTO_JAX_FAIL_AT=checkpoint ...   # the first latest-state save fails: ENOSPC
    (neither set: main.py as it is)

Points (``k`` counts within this process, default 1):

- ``compile``: while the train step is traced for compilation;
- ``batch:k``: when the k-th training batch is fetched (mid-epoch);
- ``checkpoint``: inside the first latest-state save, after the data iterator's file is
  written and before Orbax finalises the step;
- ``validation:k``: at the start of the k-th validation;
- ``test_outputs``: after ``test_predictions.csv``, while the pictures are written.

The patches are installed before main.py runs (in this process: the malloc-tuning restart
must be off, or it would start main.py again without them).
"""

import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    name, _, arg = point.partition(":")
    calls, nth = [0], int(arg or 1)

    def reached() -> bool:
        calls[0] += 1
        return calls[0] == nth

    if name == "compile":
        from histo_jax import steps
        make = steps.jit_train_step

        class DyingStep:  # the trainer compiles the step ahead (or on its first call)
            def compile(self, *a):
                _die()

            def __call__(self, *a):
                _die()

        def make_dying(*args, **kwargs):
            make(*args, **kwargs)
            return DyingStep()
        steps.jit_train_step = make_dying
    elif name == "batch":
        from histo_jax import parallel
        global_batch = parallel.global_batch

        def dying_batch(mesh, local):
            if "mask" not in local and reached():  # training batches have no mask
                _die()
            return global_batch(mesh, local)
        parallel.global_batch = dying_batch
    elif name == "checkpoint":
        import grain
        handler = grain.checkpoint.CheckpointHandler
        save = handler.save

        def dying_save(self, *args, **kwargs):
            save(self, *args, **kwargs)
            _die()
        handler.save = dying_save
    elif name == "validation":
        from histo_jax import train
        evaluate = train.evaluate_dataset

        def dying_evaluate(*args, desc="eval", **kwargs):
            if desc == "validation" and reached():
                _die()
            return evaluate(*args, desc=desc, **kwargs)
        train.evaluate_dataset = dying_evaluate
    elif name == "test_outputs":
        from histo_jax import plots
        plots.confusion_matrix = lambda *a, **k: _die()
    else:
        raise SystemExit(f"killpoint.py: unknown point {point!r}")


def install_failure(point: str) -> None:
    if point != "checkpoint":
        raise SystemExit(f"killpoint.py: unknown failure point {point!r}")
    import errno

    import grain
    handler = grain.checkpoint.CheckpointHandler

    def failing_save(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    handler.save = failing_save


if __name__ == "__main__":
    if os.environ.get("HISTO_JAX_KILL_AT"):
        install(os.environ["HISTO_JAX_KILL_AT"])
    if os.environ.get("HISTO_JAX_FAIL_AT"):
        install_failure(os.environ["HISTO_JAX_FAIL_AT"])
    main = os.path.join(REPO, "main.py")
    sys.argv = [main, *sys.argv[1:]]
    runpy.run_path(main, run_name="__main__")
