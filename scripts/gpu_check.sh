#!/usr/bin/env bash
# GPU readiness, end to end, on a machine with a CUDA GPU (docs/deployment.md, "Checking a GPU host"):
#   1. a small SFT drafter trained on the GPU (draftloop train-sft);
#   2. correctness on CUDA in bfloat16: greedy output of every drafter vs target-only
#      (differences only at argmax near-ties), rejection sampling and sampled decoding
#      against the target's distribution (benchmarks.gpu_check);
#   3. the speedup table (benchmarks.speedup --device cuda);
#   4. the loop: served traffic, Draft-OPD updates and the gate on the GPU (benchmarks.online --quick);
#   5. the trained drafter exported in both formats vLLM and SGLang load.
# Results go to $OUT (default results/gpu/); exits non-zero at the first failing step.
# Usage: scripts/gpu_check.sh            (DRAFTLOOP_TARGET_MODEL picks the model; default: the embedded one)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OUT=${OUT:-results/gpu}
export DRAFTLOOP_DEVICE=${DRAFTLOOP_DEVICE:-cuda}
export DRAFTLOOP_DTYPE=${DRAFTLOOP_DTYPE:-bfloat16}
export DRAFTLOOP_CACHE_DIR=${DRAFTLOOP_CACHE_DIR:-$PWD/.cache/draftloop}
export DRAFTLOOP_CHECKPOINT_DIR=$OUT/checkpoints
mkdir -p "$OUT"

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "0. CUDA"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), (
    f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch==2.13.0 into the venv "
    "(make setup installs the CPU wheel on machines whose pip finds it first)")
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$VENV/bin/draftloop" fetch-model

step "1. SFT drafter on the GPU"
"$VENV/bin/draftloop" train-sft --num-prompts 256 --max-new-tokens 128 --steps 600 --eval-prompts 8 \
  --checkpoint-dir "$DRAFTLOOP_CHECKPOINT_DIR" 2>&1 | tee "$OUT/train_sft.log"

step "2. correctness on CUDA ($DRAFTLOOP_DTYPE)"
"$PY" -m benchmarks.gpu_check --out "$OUT/correctness.json"

step "3. speedup table"
"$PY" -m benchmarks.speedup --device cuda --dtypes "$DRAFTLOOP_DTYPE" --out "$OUT/speedup.json"

step "4. the loop: serve, Draft-OPD update, gate, publish"
"$PY" -m benchmarks.online --quick --checkpoint-dir "$DRAFTLOOP_CHECKPOINT_DIR" --out "$OUT/online.json"

step "5. export for vLLM and SGLang"
rm -rf "$OUT/export-speculators" "$OUT/export-sglang"
"$VENV/bin/draftloop" export-drafter --format speculators --dtype bfloat16 "$OUT/export-speculators"
"$VENV/bin/draftloop" export-drafter --format sglang --dtype bfloat16 "$OUT/export-sglang"

step "done: results in $OUT"
ls -l "$OUT"
