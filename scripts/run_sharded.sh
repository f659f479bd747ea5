#!/usr/bin/env bash
# Run a generating tool as one process per GPU, each on its chunk of the work, then merge the
# chunk files in order into one output file.
#
#   bash scripts/run_sharded.sh OUT MODULE [ARGS...]
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3 bash scripts/run_sharded.sh playground/selftrain/questions.jsonl \
#       stllava.selftrain.questions --model-path CKPT --image-folder IMAGES --n-questions 5
#
# MODULE: stllava.eval.model_vqa, stllava.selftrain.questions or stllava.selftrain.answers (they
# share --out, --num-chunks and --chunk-idx; see stllava/tooling.py). Process K runs on GPU K of
# CUDA_VISIBLE_DEVICES as `$PYTHON -m MODULE ARGS... --out <OUT without .jsonl>.chunkKofN.jsonl
# --num-chunks N --chunk-idx K`. When every process has succeeded, the chunk files are
# concatenated in chunk order into OUT (written to a temporary file, then renamed). No output
# depends on the chunking (items are seeded one by one), so OUT equals what one process writes.
# Each chunk file resumes like any output of these tools: after a failure, rerun the same command
# (same GPU count); pass --overwrite in ARGS to start every chunk over.
#
# Environment (default in brackets):
#   CUDA_VISIBLE_DEVICES  comma list of GPUs; one process per entry [0]
#   PYTHON                interpreter [this checkout's .venv/bin/python when it exists, else python]
# Exit: 0 merged; 1 a chunk failed (the others are stopped, nothing is merged); 2 bad usage.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash scripts/run_sharded.sh OUT MODULE [ARGS...]  (see the header of this file)" >&2
    exit 2
fi
OUT=$1
MODULE=$2
shift 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python; fi
fi

IFS=',' read -ra GPUS <<< "${CUDA_VISIBLE_DEVICES:-0}"
N=${#GPUS[@]}
BASE=${OUT%.jsonl}
mkdir -p "$(dirname "$OUT")"
PIDS=()
for K in $(seq 0 $((N - 1))); do
    CUDA_VISIBLE_DEVICES=${GPUS[$K]} "$PYTHON" -m "$MODULE" "$@" --out "$BASE.chunk${K}of$N.jsonl" \
        --num-chunks "$N" --chunk-idx "$K" &
    PIDS+=($!)
done

# Poll every process so that the first failure stops the others at once, whichever chunk it is.
remaining=$N
while [ "$remaining" -gt 0 ]; do
    for K in "${!PIDS[@]}"; do
        pid=${PIDS[$K]}
        if [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null; then continue; fi
        if wait "$pid"; then
            PIDS[K]=""
            remaining=$((remaining - 1))
        else
            echo "error: chunk $K of $N ($MODULE on GPU ${GPUS[$K]}) failed; stopping the others" >&2
            for other in "${PIDS[@]}"; do
                if [ -n "$other" ]; then kill "$other" 2>/dev/null || true; fi
            done
            wait 2>/dev/null || true
            exit 1
        fi
    done
    sleep 0.2
done

: > "$OUT.tmp"
for K in $(seq 0 $((N - 1))); do
    # A chunk past the last non-empty one writes no file (e.g. 3 items in 4 chunks).
    if [ -f "$BASE.chunk${K}of$N.jsonl" ]; then cat "$BASE.chunk${K}of$N.jsonl" >> "$OUT.tmp"; fi
done
mv "$OUT.tmp" "$OUT"
echo "merged $N chunk(s) into $OUT ($(wc -l < "$OUT") records)"
