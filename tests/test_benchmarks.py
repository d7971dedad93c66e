"""The CPU parts of benchmarks/gpu.sh (GPU_SH_CHECK=1): the machine's line, the side-by-side
train / eval benchmark in float32 and bfloat16, and the timed demo training, in one file of
JSON lines. (The installs and the full sizes need a CUDA machine.)"""

import json
import os
import subprocess
import sys

from histo_jax import hostenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_info_reads_vendor_model_and_the_vector_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n"
                       "flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: other\n")
    assert hostenv.cpu_info(str(cpuinfo)) == {
        "vendor": "GenuineIntel", "model": "Intel Xeon",
        "flags": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}


def test_gpu_script_cpu_check_writes_every_line(tmp_path):
    out = tmp_path / "gpu.jsonl"
    env = dict(os.environ, GPU_SH_CHECK="1", PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               XLA_FLAGS="", HISTO_JAX_MALLOC_TUNING="0")  # one CPU device: batch 25
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    machine = lines[0]
    assert machine["script"] == "benchmarks/gpu.sh" and machine["jax_backend"] == "cpu"
    assert set(machine["cpu"]) == {"vendor", "model", "flags"} and machine["versions"]["jax"]
    headers = [x for x in lines if "argv" in x]
    assert len(headers) == 2 and all("cpu" in h and "load" in h for h in headers)
    jax_runs = {(x["dtype"], x["mode"]) for x in lines
                if x.get("framework") == "jax" and x["samples_per_s"] > 0}
    assert jax_runs == {("float32", "train"), ("float32", "eval"), ("bfloat16", "eval")}
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    ratios = [x for x in lines if x.get("ratio") == "histo_jax/pytorch"]
    assert len(ratios) == (3 if has_torch else 0)
    demo = lines[-1]
    assert demo["returncode"] == 0 and demo["wall_s"] > 0
    assert [c["num_inputs"] for c in demo["cells"]] == [1]
    assert 0.0 <= demo["cells"][0]["macro_f1"] <= 1.0 and demo["cells"][0]["epochs_trained"] == 1
