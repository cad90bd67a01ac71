#!/usr/bin/env bash
# One command for a machine with one GPU (H100/H200): ours against PyTorch on Florence-2-base at 768x768,
# bf16 compute, frozen and full fine-tune steps and generation, printed as the markdown table of
# docs/benchmarks.md. Ends within 8 minutes (each part has its own time limit).
#
#   bash scripts/device_bench.sh [OUT_DIR]
#
# Needs jax with CUDA, flax, optax, torch with CUDA and transformers >= 5 on the machine; florence_jax is
# used from this checkout (no install, no grain: the model rows need neither). The data row is measured on
# the CPU machine instead (it needs grain).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/florence_jax_bench}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # share the GPU with the PyTorch reference in the same process
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, torch, transformers, flax, optax; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', transformers.__version__)"

run() {  # name, time limit (s), arguments
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$PY" -m scripts.benchmark "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" \
    | grep -v -E '^(W|I)[0-9]{4} ' || echo "!! $name failed or ran out of time (limit ${limit}s)"
}
run train   240 --only train_frozen,train_full --train_batch 32 --repeats 5
run generate 200 --only generate_greedy,generate_beam3,decode_beam3 --gen_batch 32 --new_tokens 256 --repeats 3
echo "== memory check: a full fine-tune at global batch 64 in 40 GB"
timeout 60 "$PY" -m scripts.benchmark --only train_full --train_batch 64 --repeats 2 --no_reference \
  --remat_policy dots --json "$OUT/train_full_b64.json" 2>&1 | grep -v -E '^(W|I)[0-9]{4} ' | tail -4 \
  || echo "!! batch-64 check failed or ran out of time"
