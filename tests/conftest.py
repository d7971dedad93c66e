"""Shared pytest set-up: 4 fake CPU devices, quiet logs, small shared fixtures."""
import os

# Must be set before JAX initialises its backends.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
    _xla_flags += " --xla_force_host_platform_device_count=4"
# The suite compiles many small programs and runs each a few times: LLVM optimisation level 0
# takes ~35% off every XLA:CPU compile (same arithmetic: fast-math is off at every level).
# Subprocesses of the tests inherit it, so runs compared with each other compile alike.
if "xla_backend_optimization_level" not in _xla_flags:
    _xla_flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _xla_flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ---- A tiny trained run, shared by tests/test_train.py and tests/test_predict.py --------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One uninterrupted tiny run (4 simulated devices): 2 inputs, 32 px, 4 epochs x 3 steps."""
    import datagen
    from runutil import tiny_config

    from histo_jax import train

    root = tmp_path_factory.mktemp("train")
    datagen.write_valid_dataset(str(root / "data"), num_ids=12, per_id=3)
    c = tiny_config(str(root / "data"), str(root / "prepared"), str(root / "jax_cache"))
    workdir = str(root / "run")
    result = train.train_and_evaluate(c, workdir)
    return {"root": root, "config": c, "workdir": workdir, "result": result}
