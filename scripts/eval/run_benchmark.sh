#!/usr/bin/env bash
# One zero-shot benchmark evaluation (SPEC §7): convert → answer (greedy, 1 shard/GPU) → merge →
# score. The body of scripts/eval/{vqa_rad,slake,pvqa}.sh: each sets BENCH and the defaults of its
# SRC and IMAGE_FOLDER, then sources this file. It also runs on its own with those three set:
#
#   BENCH=slake SRC=... IMAGE_FOLDER=... MODEL_PATH=... bash scripts/eval/run_benchmark.sh
#
# Environment (default in brackets):
#   BENCH         vqa_rad | slake | pvqa (a benchmark of stllava.eval.convert) [required]
#   SRC           the raw benchmark file [required; the per-benchmark scripts give defaults]
#   IMAGE_FOLDER  the benchmark's images [required; likewise]
#   MODEL_PATH    checkpoint folder to evaluate [playground/checkpoints/stllava-med-7b]
#   MODEL_BASE    base LLM when MODEL_PATH is a LoRA adapter [unset: not passed]
#   CKPT          run name used in output paths [basename of MODEL_PATH]
#   EVAL_ROOT     where converted files, answers and results go [playground/eval]
#   CONV_MODE     conversation template [vicuna_v1]
#   CUDA_VISIBLE_DEVICES  comma list; one answering process per GPU [0]
#   PYTHON        interpreter [python]
# Writes $EVAL_ROOT/$BENCH/{test.json,questions.jsonl,stats.json},
# $EVAL_ROOT/$BENCH/answers/$CKPT/merge.jsonl and $EVAL_ROOT/results/$CKPT/$BENCH/metrics.*;
# compare runs with: python -m stllava.eval.report --run NAME=$EVAL_ROOT/results/$CKPT --out DIR
set -euo pipefail

: "${BENCH:?set BENCH (vqa_rad, slake or pvqa), or run scripts/eval/<benchmark>.sh}"
: "${SRC:?set SRC to the raw $BENCH file, or run scripts/eval/$BENCH.sh for its default}"
: "${IMAGE_FOLDER:?set IMAGE_FOLDER to the $BENCH images, or run scripts/eval/$BENCH.sh for its default}"
MODEL_PATH=${MODEL_PATH:-playground/checkpoints/stllava-med-7b}
MODEL_BASE=${MODEL_BASE:-}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
EVAL_ROOT=${EVAL_ROOT:-playground/eval}
CONV_MODE=${CONV_MODE:-vicuna_v1}
PYTHON=${PYTHON:-python}

DATA_DIR=$EVAL_ROOT/$BENCH
ANSWER_DIR=$DATA_DIR/answers/$CKPT
RESULT_DIR=$EVAL_ROOT/results/$CKPT/$BENCH

# 1. raw benchmark → test.json (ground truth) + questions.jsonl; checks every image exists.
"$PYTHON" -m stllava.eval.convert "$BENCH" --src "$SRC" --out "$DATA_DIR" \
    --image-folder "$IMAGE_FOLDER"

# 2. answer: one process per GPU, each on its chunk of the questions, greedy decoding.
IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
CHUNKS=${#GPULIST[@]}
mkdir -p "$ANSWER_DIR"
pids=()
for IDX in $(seq 0 $((CHUNKS - 1))); do
    CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]} "$PYTHON" -m stllava.eval.model_vqa \
        --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
        --question-file "$DATA_DIR/questions.jsonl" \
        --image-folder "$IMAGE_FOLDER" \
        --answers-file "$ANSWER_DIR/${CHUNKS}_${IDX}.jsonl" \
        --num-chunks "$CHUNKS" --chunk-idx "$IDX" \
        --temperature 0 --conv-mode "$CONV_MODE" &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "error: answering shard $i of $CHUNKS failed; stopping the others" >&2
        for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
        exit 1
    fi
done
MERGED=$ANSWER_DIR/merge.jsonl
: > "$MERGED"
for IDX in $(seq 0 $((CHUNKS - 1))); do
    cat "$ANSWER_DIR/${CHUNKS}_${IDX}.jsonl" >> "$MERGED"
done

# 3. score with the LLaVA-Med metrics (refuses missing or unknown question ids).
"$PYTHON" -m stllava.eval.metrics --gt "$DATA_DIR/test.json" --pred "$MERGED" \
    --out "$RESULT_DIR"
