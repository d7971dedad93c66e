#!/usr/bin/env bash
# The GPU benchmark in one command, for a CUDA machine (aimed at < 8 min on one GPU):
#
#   bash benchmarks/gpu.sh [OUT.jsonl]
#
# 1. Python: $PYTHON (default python3) when it already has CUDA JAX (a GPU device) and a
#    CUDA PyTorch; else a venv (.venv-gpu) with jax[cuda12] and torch + torchvision from
#    PyTorch's CUDA index ($GPU_SH_TORCH_INDEX). Offline: GPU_SH_WHEELS=DIR installs from the
#    wheels in DIR only. histo_jax itself goes in with --no-deps, plus the requirements of
#    setup.cfg that are missing (the frameworks that are there are kept).
# 2. benchmarks/train_step.py, histo_jax beside the PyTorch reference (alternating steps):
#    train and eval, N = 1 and 4, float32 and bfloat16 (PyTorch: autocast).
# 3. One demo training (main.py --config=configs/demo.py on the embedded demo data), timed,
#    with each cell's test metrics.
#
# Every JSON line goes to OUT (default benchmarks/gpu-<date>.jsonl): first one describing
# the machine, then the benchmark's lines, then the demo's.
#
# GPU_SH_CHECK=1 is this script's CPU check (tests/test_benchmarks.py): nothing installed,
# the tiny encoder at 32 px, N = 1, bf16 in eval only, PyTorch only where importable, a
# 1-epoch demo.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-benchmarks/gpu-$(date +%Y%m%d-%H%M%S).jsonl}
CHECK=${GPU_SH_CHECK:-0}
PY=${PYTHON:-python3}
: >"$OUT"
say() { echo "gpu.sh: $*" >&2; }

has_gpu_stack() {
  "$1" - <<'EOF' 2>/dev/null
import jax, torch
assert jax.default_backend() == "gpu" and torch.cuda.is_available()
EOF
}

pip_install() {  # pip_install PYTHON ARGS...: from GPU_SH_WHEELS only when it is set
  local py=$1; shift
  if [[ -n ${GPU_SH_WHEELS:-} ]]; then
    "$py" -m pip install -q --no-index --find-links "$GPU_SH_WHEELS" "$@"
  else
    "$py" -m pip install -q "$@"
  fi
}

if [[ $CHECK != 1 ]]; then
  if ! has_gpu_stack "$PY"; then
    say "$PY lacks CUDA JAX or CUDA PyTorch: installing them into .venv-gpu"
    python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    pip_install "$PY" --upgrade pip
    pip_install "$PY" "jax[cuda12]"
    if [[ -n ${GPU_SH_WHEELS:-} ]]; then
      pip_install "$PY" torch torchvision
    else
      "$PY" -m pip install -q torch torchvision \
        --index-url "${GPU_SH_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
    fi
    has_gpu_stack "$PY" || { say "no GPU visible to JAX and PyTorch after the install"; exit 1; }
  fi
  missing=$("$PY" benchmarks/gpu_env.py missing)
  if [[ -n $missing ]]; then
    say "installing histo_jax's missing requirements: $missing"
    # shellcheck disable=SC2086
    pip_install "$PY" $missing
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

"$PY" benchmarks/gpu_env.py describe >>"$OUT"

bench=(--inputs 1,4 --modes train,eval --rounds 5 --steps 5)
torch_flag=(--torch --torch_python "$PY")
if [[ $CHECK == 1 ]]; then
  bench=(--inputs 1 --modes train,eval --rounds 1 --steps 1 --size 32
         --model_set variant=tiny --compiler_options none)
  "$PY" -c "import torch" 2>/dev/null || torch_flag=()
fi
for dtype in float32 bfloat16; do
  modes=()
  # The check times bf16 in eval only: its train step is the same code with another flag.
  [[ $CHECK == 1 && $dtype == bfloat16 ]] && modes=(--modes eval)
  say "train_step.py ${bench[*]} ${modes[*]:-} --dtype $dtype ${torch_flag[*]:-}"
  "$PY" benchmarks/train_step.py "${bench[@]}" "${modes[@]}" "${torch_flag[@]}" --dtype "$dtype" \
    >>"$OUT"
done

demo=(--config=configs/demo.py)
if [[ $CHECK == 1 ]]; then
  demo+=(--config.num_epochs=1 "--config.grid.num_inputs=(1,)" --config.data.image_size=32
         --config.progress=False --config.compilation_cache_dir=)
fi
say "demo training: main.py ${demo[*]}"
"$PY" benchmarks/gpu_env.py demo "${demo[@]}" >>"$OUT"
say "wrote $OUT ($(wc -l <"$OUT") JSON lines)"
