"""End to end: time-to-result of reference epochs, histo_jax vs the original's procedure.

Both sides get the same dataset, splits, number of inputs, batch, 224 px and epochs:

* histo_jax: ``python main.py --config=configs/<n>_scale.py`` with ``num_epochs=E``, random
  init (``model.pretrained=none``: no download here) and a fresh workdir. The dataset is
  prepared beforehand (timed apart, ``prepare_s``): the run reads the fixed prepared dataset.
  With ``--cold_compile`` (default) the run gets an empty JAX compilation cache, as on a first
  run; ``--no-cold_compile`` uses the user's cache.
* the original: ``benchmarks/torch_original.py`` in the PyTorch interpreter: PNG decode and
  resize on every access in DataLoader workers, the reference model, step and evaluation, on
  the ``splits.json`` that the histo_jax run wrote.

Each runs as a subprocess, one after the other; the wall time of each is measured here.
Prints JSON lines: one per side (with the per-epoch figures each reports), then a ratio line.
Runs on the embedded demo dataset unless ``--data_dir``.

    python benchmarks/end_to_end.py [--data_dir DIR] [--inputs 4] [--epochs 1]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {1: "one_scale", 2: "two_scale", 3: "three_scale", 4: "four_scale"}


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def run_histo_jax(a, data_dir: str, workdir: str) -> dict:
    from histo_jax.config import get_base_config
    from histo_jax.data import sources

    cfg = get_base_config().data
    cfg.dir = data_dir
    t0 = time.perf_counter()
    sources.load_dataset(cfg, log=lambda m: None)  # Prepare once (or reuse): the fixed dataset.
    prepare_s = time.perf_counter() - t0
    cmd = [sys.executable, "main.py", f"--config=configs/{CONFIGS[a.inputs]}.py",
           f"--workdir={workdir}", f"--config.data.dir={data_dir}",
           f"--config.num_epochs={a.epochs}", "--config.model.pretrained=none",
           "--config.progress=False"]
    cache = tempfile.mkdtemp(prefix="jaxcache-") if a.cold_compile else ""
    if cache:
        cmd.append(f"--config.compilation_cache_dir={cache}")
    load_before = _load()
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, cwd=str(ROOT), check=True)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    epochs = [{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("epoch/")}
              for r in rows if any(k.startswith("epoch/") for k in r)]
    with open(os.path.join(workdir, "metrics.json")) as f:
        test = json.load(f)
    return {"framework": "histo_jax", "n_inputs": a.inputs, "epochs": epochs,
            "prepare_s": round(prepare_s, 2), "cold_compile": a.cold_compile,
            "test_macro_f1": test["macro_f1"], "total_s": round(wall, 2),
            "load_before": load_before, "load_after": _load()}


def run_torch(a, data_dir: str, workdir: str) -> dict:
    cmd = [a.torch_python, str(ROOT / "benchmarks" / "torch_original.py"), f"--data_dir={data_dir}",
           f"--splits={os.path.join(workdir, 'splits.json')}", f"--inputs={a.inputs}",
           f"--epochs={a.epochs}", f"--workers={a.torch_workers}", f"--threads={a.torch_threads}"]
    load_before = _load()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=str(ROOT / "benchmarks"), check=True, stdout=subprocess.PIPE,
                         text=True)
    wall = time.perf_counter() - t0
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec.update(process_wall_s=round(wall, 2), load_before=load_before, load_after=_load())
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="", help="dataset folder (default: the demo dataset)")
    p.add_argument("--inputs", type=int, default=4, choices=sorted(CONFIGS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--cold_compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workdir", default="", help="histo_jax run folder (default: a temp dir)")
    default_torch_py = ROOT / ".venv-torch" / "bin" / "python"
    p.add_argument("--torch_python",
                   default=str(default_torch_py) if default_torch_py.exists() else sys.executable)
    p.add_argument("--torch_workers", type=int, default=2, help="DataLoader workers (original: 2)")
    p.add_argument("--torch_threads", type=int, default=2)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from histo_jax import train

    data_dir = os.path.abspath(a.data_dir) if a.data_dir else train.ensure_demo_dataset()
    workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="e2e-histo_jax-"))
    if os.path.isdir(workdir) and os.listdir(workdir):
        p.error(f"--workdir {workdir} is not empty: main.py would resume or skip a finished run "
                "there, and the timing would be meaningless. Give a new or empty folder.")
    _emit({"host": os.uname().nodename, "cpus": os.cpu_count(), "load": _load(),
           "data_dir": data_dir, "workdir": workdir, "argv": sys.argv[1:],
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")})
    jx = run_histo_jax(a, data_dir, workdir)
    _emit(jx)
    tr = run_torch(a, data_dir, workdir)
    _emit(tr)
    _emit({"ratio": "pytorch/histo_jax time-to-result", "n_inputs": a.inputs, "epochs": a.epochs,
           "total": round(tr["process_wall_s"] / jx["total_s"], 2),
           "first_epoch_train": round(tr["epochs"][0]["train_s"] / jx["epochs"][0]["train_s"], 2)
           if jx["epochs"] and "train_s" in jx["epochs"][0] else None})


if __name__ == "__main__":
    from histo_jax import hostenv
    hostenv.reexec_with_malloc_tuning()  # As main.py runs (histo_jax/hostenv.py).
    main()
