#!/usr/bin/env bash
# One command for a machine with one GPU (H100/H200): ours against PyTorch on Florence-2-base at 768x768,
# bf16 compute, frozen and full fine-tune steps and generation, printed as the markdown table of
# docs/benchmarks.md, with a profile of each train step of ours (device time per model scope), then a full
# fine-tune at global batch 64 run inside a 40 GiB memory pool. Ends within 8 minutes: each part has its
# own time limit, and the benchmark rewrites its JSON after every row, so a part cut short keeps the rows
# it finished (`--table FILE` prints them). Where the flash kernels (the GPU's default attention) fail on the
# device, the train rows run again with XLA's einsums within their part's time, and so do the parts after.
#
#   bash scripts/device_bench.sh [OUT_DIR]
#   PARITY=1 bash scripts/device_bench.sh    # then also the logits of ours against transformers on the GPU
#   PACK=/path/bench.tgz bash scripts/device_bench.sh /tmp/b   # also pack every log, JSON and profile table
#                                            # (not the raw traces) into one file, for a machine that returns few
#   MODE=ab bash scripts/device_bench.sh     # instead: A/B each formulation choice (florence_jax.hardware)
#                                            # against the GPU's defaults, ours only, same 8-minute bound
#
# Needs jax with CUDA, flax, optax, torch with CUDA and transformers >= 5 on the machine; florence_jax is
# used from this checkout (no install, no grain: the model rows need neither). Wheels in .whl/ (a flax
# release this project is tested with, say) are installed into /tmp/site first, and dropped again if they
# do not import beside the machine's jax. The data row is measured on the CPU machine (it needs grain).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/florence_jax_bench}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # share the GPU with the PyTorch reference in the same process
PY="${PYTHON:-python3}"
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && SITE=/tmp/site
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
check='import jax, flax, optax; from flax import nnx; import florence_jax, train.step, train.state; nnx.Linear(2, 2, rngs=nnx.Rngs(0))'
if [ -n "$SITE" ] && ! "$PY" -c "$check" 2>"$OUT/site_check.log"; then
  echo "!! the carried wheels do not import here (see site_check.log); using the machine's own packages"
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, torch, transformers, flax, optax; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

quiet() { grep -v -E '^(W|I|E)[0-9]{4} |Writing model shards|^ *@ |symbolize'; }
RC=0
run() {  # name, time limit (s), arguments; sets RC to the benchmark's exit status
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$PY" -m scripts.benchmark "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | quiet
  RC=${PIPESTATUS[0]}
  [ "$RC" = 0 ] || { echo "!! $name failed or ran out of time (limit ${limit}s); rows it finished:";
    [ -f "$OUT/$name.json" ] && "$PY" -m scripts.benchmark --table "$OUT/$name.json"; }
}
# The GPU's defaults run the project's Pallas flash kernels, which no GPU has run before this script: where
# they fail here (a part whose log names Pallas or Triton), the parts after it run XLA's einsums in their
# place, so that one failing kernel does not cost the device session every row.
HW=()
EINSUMS=gpu:window_attention=einsum,text_attention=einsum
kernels_failed() {  # name: the part failed and its log names the Pallas kernels
  [ "$RC" != 0 ] && [ "$RC" != 124 ] && grep -qiE 'pallas|triton' "$OUT/$1.log"
}
if [ "${MODE:-}" = ab ]; then
  # Each row builds and compiles ours with one formulation changed from the GPU's defaults; the frozen
  # train step at batch 32 (the vision tower's forward runs in it) and beam-3 decoding. The defaults' row
  # comes first, so a time limit cuts a variant, never the baseline.
  ab() {  # name, time limit (s), hardware spec, arguments
    local name=$1 limit=$2 spec=$3; shift 3
    run "ab_$name" "$limit" --no_reference --hardware "$spec" "$@"
  }
  train=(--only train_frozen --train_batch 32 --repeats 5)
  ab defaults 80 gpu "${train[@]}"
  # the GPU's defaults run the project's Pallas flash kernels for the window attention and for the text
  # encoder's attention with its dropout (since 2026-12-07): XLA:GPU's compile for an H100 reads
  # the step at 58.1 ms of memory traffic with both, and 87.6 with the einsums in their place (the kernels'
  # own work not counted; docs/scale-out.md). These rows measure the einsums instead of each and of both.
  ab einsum_window 55 gpu:window_attention=einsum "${train[@]}"
  ab einsum_text 55 gpu:text_attention=einsum "${train[@]}"
  ab einsum_both 55 gpu:window_attention=einsum,text_attention=einsum "${train[@]}"
  ab grouped_conv 50 gpu:depthwise_conv=grouped "${train[@]}"
  ab sequence_major 45 gpu:attention_layout=sequence_major "${train[@]}"
  # store_vision_residuals and carry_small_scan_params answer XLA:CPU's habits, and XLA:GPU compiles nearly
  # the same program of each (docs/scale-out.md); decode_cache=segments answers XLA:CPU's one-core
  # matrix-vector products. They wait for a run with time to spare (tests/test_device_bench.py keeps the
  # limits within the 8 minutes).
  decode=(--only decode_beam3 --gen_batch 32 --new_tokens 256 --repeats 2)
  ab decode_defaults 40 gpu "${decode[@]}"
  ab decode_cpu_beams 40 gpu:beam_cross_attention=per_beam,beam_cache_copy=row_by_row "${decode[@]}"
  ab decode_vocab_major 35 gpu:lm_head_product=vocab_major "${decode[@]}"
  for f in "$OUT"/ab_*.json; do echo "== $(basename "$f" .json)"; "$PY" -m scripts.benchmark --table "$f" | tail -n +6; done
  exit 0
fi
# --profile: one more step of ours under jax.profiler, printed as device time per model scope and per op
# (trace, ops.md and the step's HLO under $OUT/profile/<row>/), to show where the step falls short.
train=(--only train_frozen,train_full --train_batch 32 --repeats 5 --profile "$OUT/profile")
started=$SECONDS
run train 235 "${train[@]}"
if kernels_failed train; then  # the einsums for the rest, and the train rows again within the part's limit
  HW=(--hardware "$EINSUMS")
  echo "!! the flash kernels failed on this GPU (train.log): the parts below run $EINSUMS"
  left=$((235 - (SECONDS - started)))
  [ "$left" -ge 60 ] && run train_einsums "$left" "${train[@]}" ${HW[@]+"${HW[@]}"}
fi
# Greedy last (its 6.38x was measured on 2026-11-27): the time limit cuts it first.
run generate 115 --only generate_beam3,decode_beam3,generate_greedy --gen_batch 32 --new_tokens 256 --repeats 2 \
  ${HW[@]+"${HW[@]}"}
# A full fine-tune at global batch 64 within 40 GiB: JAX's allocator gets a 40 GiB pool and nothing more
# (preallocated, so the step either runs inside it or fails with out-of-memory). 4 micro-batches of 16
# with full remat; compiled for the CPU the step needs 41.3 GiB, an upper bound for the GPU's compiler; XLA:GPU's
# own compile here (--topology a100, no GPU) of the same update at the DocVQA config's lengths: 8.6 GiB (21d7994).
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [ -n "$total_mib" ]; then
  frac=$("$PY" -c "print(f'{min(0.99, 40 * 1024 / $total_mib):.4f}')")
  echo "== memory: full fine-tune, global batch 64, inside a 40 GiB pool (fraction $frac of $total_mib MiB)"
  XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=$frac \
    run train_full_b64 105 --only train_full --train_batch 64 --grad_accum_steps 4 --remat_policy full \
    --no_reference --no_gemm --repeats 2 ${HW[@]+"${HW[@]}"}
fi
if [ "${PARITY:-0}" = 1 ]; then  # about 2 more minutes: two base-size compiles
  echo "== parity: logits of ours against transformers on this GPU (base size, 768x768)"
  timeout 150 "$PY" -m scripts.device_parity 2>&1 | tee "$OUT/parity.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || echo "!! parity failed or ran out of time"
fi
if [ -n "${PACK:-}" ]; then  # logs, JSON, profile tables and HLO; the raw traces stay behind
  (cd "$OUT" && tar -czf "$PACK" --exclude=plugins --exclude=site_check.log -- *) && echo "packed into $PACK"
fi
