"""The Python steps of benchmarks/gpu.sh: what is missing, the machine's line, the timed demo.

    python benchmarks/gpu_env.py missing        # setup.cfg requirements not installed
    python benchmarks/gpu_env.py describe       # one JSON line: host, CPU, GPUs, versions
    python benchmarks/gpu_env.py demo FLAGS...  # main.py FLAGS in a fresh workdir: one JSON line
"""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def missing_requirements() -> list[str]:
    """install_requires entries of setup.cfg whose distribution is not installed."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = []
    for req in cfg["options"]["install_requires"].split("\n"):
        req = req.split("#")[0].strip()
        if not req:
            continue
        name = re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(req)
    return out


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def describe() -> dict:
    sys.path.insert(0, str(ROOT))
    from histo_jax import hostenv
    import jax
    return {"script": "benchmarks/gpu.sh", "host": platform.node(), "cpus": os.cpu_count(),
            "cpu": hostenv.cpu_info(), "gpus": _gpus(), "jax_backend": jax.default_backend(),
            "jax_devices": [d.device_kind for d in jax.devices()],
            "versions": {n: _version(n) for n in ("jax", "jaxlib", "flax", "torch", "torchvision")},
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def demo(flags: list[str]) -> dict:
    """Runs main.py with ``flags`` in a fresh workdir; its wall time and each cell's result."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "demo")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *flags,
                               f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cells = []
        for path in sorted(pathlib.Path(workdir).rglob("metrics.json")):
            if not (path.parent / "config.json").exists():
                continue
            with open(path) as f:
                m = json.load(f)
            with open(path.parent / "config.json") as f:
                n = json.load(f)["num_inputs"]
            cells.append({"num_inputs": n, "macro_f1": m.get("macro_f1"),
                          "accuracy": m.get("accuracy"), "best_epoch": m.get("best_epoch"),
                          "epochs_trained": m.get("epochs_trained")})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-5000:])
    return {"demo": "main.py " + " ".join(flags), "returncode": proc.returncode,
            "wall_s": round(wall, 1), "cells": cells}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("missing", "describe", "demo"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "missing":
        print(" ".join(missing_requirements()))
        return 0
    record = describe() if argv[0] == "describe" else demo(argv[1:])
    print(json.dumps(record), flush=True)
    return record.get("returncode", 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
