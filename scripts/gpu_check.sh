#!/usr/bin/env bash
# The GPU check (issue 15): one prepared script for a machine with one CUDA GPU, under 8 minutes.
#
#   scripts/gpu_check.sh              # on the GPU machine (from the repository root or anywhere)
#   scripts/gpu_check.sh --dry-run    # the same steps on CPU at tiny sizes: checks the script itself
#
# It prints, and keeps (each step's output NAME.log, the JSON results) in $GPU_CHECK_OUT (default
# ./gpu_check/):
#   1. parity: flash-attention-2 vs sdpa logits, bf16, 7B-shaped model with 4 LLM layers
#      (scripts/bench_7b.py parity; skipped with a message when flash-attn is not installed);
#   2. sft: the stage-1 training step on a 7B-shaped model with 8 LLM layers (random init, bf16,
#      LoRA r 128 + ViT-LoRA r 32, gradient checkpointing, 8 samples x 2048 positions per step as
#      sqllava_med.sh): tokens/s and MFU (scripts/bench_sft.py --7b);
#   3. generate: batched greedy generation tokens/s at batch 1..32, 7B-shaped, 8 LLM layers
#      (scripts/bench_7b.py generate);
#   4. projector: the cluster projector's training step against the published formulation, fp32
#      batch 2 and bf16 batch 8 (scripts/bench_projector.py --backward).
# Each step has its own time limit (together 7.5 min); a step that fails or runs out of
# time is reported and the next one runs. Exit status: 0 when every step passed (a skip passes),
# 1 otherwise. Without CUDA (and without --dry-run) it says so and exits 0.
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT="${GPU_CHECK_OUT:-$ROOT/gpu_check}"
mkdir -p "$OUT"

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine: nothing to measure." \
         "Run it on a machine with one CUDA GPU (scripts/gpu_check.sh --dry-run checks the script on CPU)."
    exit 0
  fi
  "$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__)'
  PARITY=(parity --json "$OUT/parity.json")
  SFT=(--7b --llm_layers 8 --batch 8 --seq 2048 --steps 3 --warmup 1 --json "$OUT/sft.json")
  GEN=(generate --json "$OUT/generate.json")
  PROJ32=(--device cuda --batch 2 --backward --repeats 5)
  PROJ16=(--device cuda --dtype bfloat16 --batch 8 --backward --repeats 5)
  LIMITS=(75 150 105 60 60)
else
  echo "gpu_check --dry-run: the same steps on CPU at tiny sizes (no GPU numbers)"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  PARITY=(parity --tiny --device cpu --kernels sdpa eager --json "$OUT/parity.json")
  SFT=(--7b --tiny_shape --device cpu --batch 2 --seq 128 --steps 1 --warmup 0 --json "$OUT/sft.json")
  GEN=(generate --tiny --device cpu --batches 1 2 --new_tokens 4 --repeats 1 --json "$OUT/generate.json")
  PROJ32=(--small --tokens 64 --centers 16 --batch 1 --modes train --repeats 1)
  PROJ16=(--small --tokens 64 --centers 16 --dtype bfloat16 --batch 1 --modes train --repeats 1)
  LIMITS=(120 120 120 120 120)
fi

FAILED=()
step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  echo; echo "=== $name (limit ${limit}s)"
  local start=$SECONDS rc
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    echo "=== $name: done in $((SECONDS - start)) s"
  else
    if [ "$rc" = 124 ]; then echo "=== $name: out of time after ${limit}s"; else echo "=== $name: failed (exit $rc)"; fi
    FAILED+=("$name")
  fi
}

step parity "${LIMITS[0]}" "$PY" scripts/bench_7b.py "${PARITY[@]}"
step sft "${LIMITS[1]}" "$PY" scripts/bench_sft.py "${SFT[@]}"
step generate "${LIMITS[2]}" "$PY" scripts/bench_7b.py "${GEN[@]}"
step projector-fp32 "${LIMITS[3]}" "$PY" scripts/bench_projector.py "${PROJ32[@]}"
step projector-bf16 "${LIMITS[4]}" "$PY" scripts/bench_projector.py "${PROJ16[@]}"

echo
if [ "${#FAILED[@]}" = 0 ]; then
  echo "gpu_check: all steps done; results in $OUT"
  exit 0
fi
echo "gpu_check: FAILED: ${FAILED[*]} (results of the others in $OUT)"
exit 1
