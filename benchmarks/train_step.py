"""Model throughput: the full jitted train step and the eval forward, optionally beside PyTorch.

For each number of inputs N and each mode, a FRESH worker process builds the model, compiles
and times it, so that every configuration gets its own peak memory:

* ``train``      ``histo_jax.steps.jit_train_step`` (the trainer's: one program, or the
                 staged chain of ``model.trunk='staged'``, the CPU default) with augmentation
                 OFF (forward, weighted CE, backward, clip to global norm 1.0, OneCycle
                 Adam), state donated;
* ``train_aug``  the same step with the reference augmentation ON (the trainer's step);
* ``eval``       ``histo_jax.steps.make_eval_step`` (eval-mode forward).

``--data_set stain_augment.method=hed --ab`` times ``train_aug`` with and without those data
fields side by side (two alternating JAX workers) and emits their step-time ratio: the cost
of stain augmentation in the trainer's step.

With ``--torch`` a PyTorch worker (``reference/torch_model.py``: the original model and
step: weighted CE, backward, ``clip_grad_norm_(1.0)``, Adam, OneCycleLR; ``--torch_threads``
threads) runs beside each JAX ``train`` / ``eval`` worker. Both stay alive and their timed
steps ALTERNATE (jax, torch, jax, torch ... for ``--rounds`` rounds of ``--steps`` steps), so
machine drift hits both alike; then a ``ratio`` line gives histo_jax / PyTorch.

Output: JSON lines (see benchmarks/README.md for the fields). Usage::

    python benchmarks/train_step.py [--inputs 1,2,3,4] [--modes train,train_aug,eval]
        [--batch 25] [--size 224] [--rounds 3] [--steps 2] [--torch] [--dtype float32]
        [--impl auto|plain|xla_cpu] [--model_set bn_stats=joint,remat=true]

Peak memory is the worker's host RSS high-water mark (``VmHWM``) after compile and at the end;
on GPU / TPU also the device's ``peak_bytes_in_use``. The code is backend-agnostic: on an
accelerator the JAX worker uses the default backend (all its devices, batch sharded).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("train", "train_aug", "eval")
CLASS_WEIGHTS = (0.8, 1.3333334)  # a typical imbalance; only the cost matters here
TOTAL_STEPS = 10_000              # OneCycle length (any value > timed steps)


# --------------------------------------------------------------------------- worker helpers
def _rss_peak_mb() -> float:
    """Host RSS high-water mark of this process (VmHWM), MB; ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_rss_peak() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0), so that the peak of the
    timed steps is measured apart from the compiler's and the first step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _parse_value(v: str):
    """'true'/'false' -> bool, numbers -> int/float, anything else stays a string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _serve(run_steps, info: dict, extra_final=None) -> None:
    """Worker loop: prints ``info`` (ready), then answers ``run K`` / ``quit`` lines on stdin."""
    info["rss_peak_after_first_step_mb"] = round(_rss_peak_mb(), 1)
    _emit(info)
    reset = _reset_rss_peak()
    cpu = {"user": 0.0, "sys": 0.0, "minflt": 0}
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "run":
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            times = run_steps(int(cmd[1]))
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu["user"] += r1.ru_utime - r0.ru_utime
            cpu["sys"] += r1.ru_stime - r0.ru_stime
            cpu["minflt"] += r1.ru_minflt - r0.ru_minflt
            _emit({"times": times})
        elif cmd and cmd[0] == "quit":
            steps_peak = _rss_peak_mb()
            final = {"rss_peak_mb": round(max(steps_peak, info["rss_peak_after_first_step_mb"]), 1),
                     "rss_peak_steps_mb": round(steps_peak, 1) if reset else None,
                     "timed_cpu_user_s": round(cpu["user"], 2),
                     "timed_cpu_sys_s": round(cpu["sys"], 2), "timed_minor_faults": cpu["minflt"]}
            if extra_final:
                final.update(extra_final())
            _emit(final)
            return


def jax_worker(a: argparse.Namespace) -> None:
    """Builds the histo_jax model and step for (N, mode), compiles, then serves timed steps."""
    sys.path.insert(0, str(ROOT))
    from histo_jax import hostenv
    hostenv.keep_step_memory()  # as main.py and predict do

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from histo_jax import optim, parallel, steps
    from histo_jax.config import get_base_config
    from histo_jax.data import augment
    from histo_jax.models import build_model

    cfg = get_base_config()
    cfg.model.dtype = a.dtype
    cfg.model.impl = a.impl
    for kv in filter(None, a.model_set.split(",")):
        k, v = kv.split("=", 1)
        cfg.model[k] = _parse_value(v)
    for kv in filter(None, a.data_set.split(",")):  # e.g. stain_augment.method=hed
        k, v = kv.split("=", 1)
        *path, leaf = k.split(".")
        node = cfg.data
        for part in path:
            node = node[part]
        node[leaf] = _parse_value(v)
    t0 = time.perf_counter()
    model = build_model(cfg.model, a.n, nnx.Rngs(params=0))
    graphs, params, batch_stats = steps.split_model(model)
    del model
    build_s = time.perf_counter() - t0
    if a.release_build_memory:
        hostenv.release_build_memory()  # as the trainer and predict do after building

    mesh = parallel.make_mesh()
    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch, a.n, a.size, a.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (a.batch,)).astype(np.int32)
    images = jax.device_put(images, data)
    copts = steps.compiler_options() if a.compiler_options == "histo_jax" else {}
    if a.mode == "eval":
        fn = jax.jit(steps.make_eval_step(graphs, "none"), in_shardings=(repl, repl, data))
        params, batch_stats = jax.device_put((params, batch_stats), repl)
        args = (params, batch_stats, images)
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile(copts)
        compile_s = time.perf_counter() - t0

        def call():
            return compiled(*args)
    else:
        tx = optim.make_optimizer(cfg.optimizer, TOTAL_STEPS)
        aug = (augment.AugmentConfig.from_config(cfg.data, a.n) if a.mode == "train_aug"
               else None)
        # What the trainer runs: one program, or the staged chain (model.trunk 'staged').
        step = steps.jit_train_step(graphs, tx, aug, "none", jnp.asarray(CLASS_WEIGHTS),
                                    mesh=mesh, compiler_options=copts)
        holder = {"state": jax.device_put(steps.init_train_state(params, batch_stats, tx), repl)}
        del params, batch_stats
        batch = {"images": images, "labels": jax.device_put(labels, data)}
        key = jax.device_put(jax.random.PRNGKey(0), repl)
        t0 = time.perf_counter()
        step.compile(holder["state"], batch, key)
        compile_s = time.perf_counter() - t0

        def call():
            holder["state"], metrics = step(holder["state"], batch, key)
            return metrics
    rss_compile = _rss_peak_mb()
    hostenv.release_free_memory()  # as the trainer and predict do after compiling a step
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first_s = time.perf_counter() - t0

    def run_steps(k: int) -> list[float]:
        out = []
        for _ in range(k):
            t = time.perf_counter()
            jax.block_until_ready(call())
            out.append(time.perf_counter() - t)
        return out

    def device_peak() -> dict:
        stats = [d.memory_stats() or {} for d in jax.local_devices()]
        peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
        return {"device_peak_mb": round(max(peaks) / 2**20, 1)} if peaks else {}

    _serve(run_steps, {
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "build_s": round(build_s, 2), "compile_s": round(compile_s, 2),
        "first_step_s": round(first_s, 3), "rss_peak_compile_mb": round(rss_compile, 1),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "compiler_options": copts}, device_peak)


def torch_worker(a: argparse.Namespace) -> None:
    """Builds the PyTorch reference model and step for (N, mode), then serves timed steps
    (on CUDA when torch sees a GPU, as the original trains; else on the CPU)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from reference import torch_model

    torch.set_num_threads(a.torch_threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = torch_model.MultiInputModule(a.n).to(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((a.batch, a.n, 3, a.size, a.size), generator=gen).to(device)
    labels = torch.randint(0, 2, (a.batch,), generator=gen).to(device)
    # --dtype bfloat16: PyTorch's autocast (float32 weights, bf16 matmuls and convs).
    autocast = torch.bfloat16 if a.dtype == "bfloat16" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if a.mode == "eval":
        model.eval()

        def call():
            with torch.inference_mode(), torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=autocast is not None):
                model(images)
            sync()
    else:
        step = torch_model.make_train_step(model, torch.tensor(CLASS_WEIGHTS, device=device),
                                           TOTAL_STEPS, autocast=autocast)

        def call():
            step(images, labels)  # float(loss) synchronises
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0

    def run_steps(k: int) -> list[float]:
        out = []
        for _ in range(k):
            t = time.perf_counter()
            call()
            out.append(time.perf_counter() - t)
        return out

    def device_peak() -> dict:
        if device.type != "cuda":
            return {}
        return {"device_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}

    _serve(run_steps, {"backend": device.type, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "build_s": round(build_s, 2),
                       "compile_s": 0.0, "first_step_s": round(first_s, 3)}, device_peak)


# --------------------------------------------------------------------------- parent
class Worker:
    """A benchmark worker subprocess speaking the line protocol of :func:`_serve`."""

    def __init__(self, framework: str, n: int, mode: str, a: argparse.Namespace):
        self.framework = framework
        # 'jax_data_set': the JAX worker with --data_set and --ab_model_set; plain 'jax' has
        # --data_set only without --ab.
        data_set = a.data_set if framework == "jax_data_set" or not a.ab else ""
        model_set = ",".join(filter(None, [a.model_set, a.ab_model_set
                                           if framework == "jax_data_set" else ""]))
        worker = "torch" if framework == "torch" else "jax"
        cmd = [a.torch_python if framework == "torch" else sys.executable, str(pathlib.Path(
            __file__).resolve()), "--worker", worker, "--n", str(n), "--mode", mode,
            "--batch", str(a.batch), "--size", str(a.size), "--dtype", a.dtype,
            "--impl", a.impl, "--model_set", model_set, "--data_set", data_set,
            "--torch_threads", str(a.torch_threads), "--compiler_options", a.compiler_options]
        if not a.release_build_memory:
            cmd.append("--no_release_build_memory")
        env = dict(os.environ)
        if worker == "jax" and a.xla_flags is not None:
            env["XLA_FLAGS"] = a.xla_flags
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(ROOT))
        self.info = self._read()
        self.times: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"benchmarks/train_step.py: the {self.framework} worker exited "
                               f"with code {code} before answering (see its stderr above).")
        return json.loads(line)

    def run(self, k: int) -> None:
        self.proc.stdin.write(f"run {k}\n")
        self.proc.stdin.flush()
        self.times += self._read()["times"]

    def finish(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        final = self._read()
        self.proc.wait()
        return final


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure(n: int, mode: str, frameworks: list[str], a: argparse.Namespace) -> dict[str, dict]:
    """Start one worker per framework, alternate timed rounds, return a record per framework."""
    load_before = _load()
    workers = []
    try:
        for fw in frameworks:
            workers.append(Worker(fw, n, mode, a))  # sequential start: compiles never overlap
        for _ in range(a.rounds):
            for w in workers:
                w.run(a.steps)
        records = {}
        for w in workers:
            final = w.finish()
            med = statistics.median(w.times)
            records[w.framework] = {
                "framework": w.framework, "n_inputs": n, "mode": mode, "batch": a.batch,
                "size": a.size, "dtype": a.dtype if w.framework != "torch" or a.dtype == "float32"
                else f"{a.dtype} (autocast)",
                "samples_per_s": round(a.batch / med, 3), "step_median_s": round(med, 4),
                "step_min_s": round(min(w.times), 4), "step_max_s": round(max(w.times), 4),
                "timed_steps": len(w.times), "step_times_s": [round(t, 4) for t in w.times],
                **w.info, **final,
                "load_before": load_before, "load_after": _load()}
        return records
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", default="1,2,3,4", help="comma list of N (number of inputs)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and framework")
    p.add_argument("--dtype", default="float32", help="histo_jax compute dtype")
    p.add_argument("--impl", default="auto", help="histo_jax layer implementation (model.impl): "
                   "auto | plain | xla_cpu")
    p.add_argument("--model_set", default="",
                   help="extra model config fields, 'key=value,...' (e.g. remat=True)")
    p.add_argument("--data_set", default="",
                   help="data config fields for the JAX workers, 'key=value,...' (e.g. "
                        "stain_augment.method=hed); they act in train_aug mode")
    p.add_argument("--ab", action="store_true",
                   help="train_aug: time the step with and without --data_set side by side "
                        "(alternating workers) and emit their ratio (e.g. stain augmentation's cost)")
    p.add_argument("--ab_model_set", default="",
                   help="with --ab: model config fields of the second JAX worker only, e.g. "
                        "trunk=scan (then every mode is timed A/B)")
    p.add_argument("--xla_flags", default=None, help="XLA_FLAGS for the JAX workers")
    p.add_argument("--compiler_options", choices=("histo_jax", "none"), default="histo_jax",
                   help="'histo_jax': steps.compiler_options() (what the trainer should use); "
                        "'none': XLA defaults")
    p.add_argument("--no_release_build_memory", dest="release_build_memory",
                   action="store_false", help="keep the caches of the eager model build "
                   "(hostenv.release_build_memory, which the trainer and predict call)")
    p.add_argument("--torch", action="store_true", help="also run the PyTorch reference")
    p.add_argument("--torch_threads", type=int, default=2)
    default_torch_py = ROOT / ".venv-torch" / "bin" / "python"
    p.add_argument("--torch_python",
                   default=str(default_torch_py) if default_torch_py.exists() else sys.executable,
                   help="interpreter with torch + torchvision for the PyTorch worker")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        (jax_worker if a.worker == "jax" else torch_worker)(a)
        return
    # Both workers inherit the trainer's host allocator setting (huge pages for malloc;
    # histo_jax/hostenv.py): HISTO_JAX_MALLOC_TUNING=0 measures without it.
    sys.path.insert(0, str(ROOT))
    from histo_jax import hostenv
    hostenv.reexec_with_malloc_tuning()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    _emit({"host": platform.node(), "cpus": os.cpu_count(), "cpu": hostenv.cpu_info(),
           "load": _load(),
           "argv": sys.argv[1:], "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")})
    for n in (int(x) for x in a.inputs.split(",")):
        torch_train = None
        for mode in modes:
            frameworks = ["jax"] + (["torch"] if a.torch and mode != "train_aug" else [])
            if a.ab and (mode == "train_aug" or a.ab_model_set):
                frameworks.append("jax_data_set")
            recs = measure(n, mode, frameworks, a)
            for r in recs.values():
                _emit(r)
            if "jax_data_set" in recs:
                b, v = recs["jax"], recs["jax_data_set"]
                _emit({"ratio": f"with/without {' '.join(filter(None, [a.data_set, a.ab_model_set]))}",
                       "n_inputs": n, "mode": mode,
                       "step_time": round(v["step_median_s"] / b["step_median_s"], 4),
                       "step_time_min": round(v["step_min_s"] / b["step_min_s"], 4),
                       # Step k of each worker ran back to back (alternating rounds): the
                       # median of these paired ratios cancels the machine's slow drift.
                       "step_time_paired": round(statistics.median(
                           x / y for x, y in zip(v["step_times_s"], b["step_times_s"])), 4),
                       "with_step_median_s": v["step_median_s"],
                       "without_step_median_s": b["step_median_s"]})
            if "torch" in recs:
                torch_rec = recs["torch"]
                if mode == "train":
                    torch_train = torch_rec
            elif mode == "train_aug" and torch_train is not None:
                torch_rec = torch_train  # the original augments in its DataLoader workers
            else:
                continue
            j = recs["jax"]
            _emit({"ratio": "histo_jax/pytorch", "n_inputs": n, "mode": mode,
                   "speed": round(j["samples_per_s"] / torch_rec["samples_per_s"], 3),
                   "peak_rss": round(j["rss_peak_mb"] / torch_rec["rss_peak_mb"], 3),
                   "jax_samples_per_s": j["samples_per_s"],
                   "torch_samples_per_s": torch_rec["samples_per_s"],
                   "jax_rss_peak_mb": j["rss_peak_mb"], "torch_rss_peak_mb": torch_rec["rss_peak_mb"]})


if __name__ == "__main__":
    main()
