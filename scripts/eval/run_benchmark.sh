#!/usr/bin/env bash
# Zero-shot evaluation on one benchmark (docs/Evaluation.md): convert → answer (greedy, one process per GPU)
# → merge → score.
#
#   MODEL_PATH=playground/checkpoints/stllava-med-7b bash scripts/eval/run_benchmark.sh vqa_rad
#   CUDA_VISIBLE_DEVICES=0,1,2,3 MODEL_PATH=... bash scripts/eval/run_benchmark.sh slake    # 4 shards
#   bash scripts/eval/vqa_rad.sh | slake.sh | pvqa.sh      # the same, the benchmark named by the script
#
# Arguments: BENCHMARK (vqa_rad | slake | pvqa), then any flags for stllava.eval.model_vqa
# (e.g. --overwrite to re-answer a file written with other settings, --batch-size 32).
# Environment (default in brackets):
#   SRC           the raw benchmark file (see docs/Evaluation.md)
#                 [vqa_rad: playground/data/vqa_rad/testset.json (or VQA_RAD_Dataset_Public.json);
#                  slake: playground/data/slake/test.json (English questions are kept);
#                  pvqa: playground/data/pvqa/qas/pvqa_test.json (or an HF-style export)]
#   IMAGE_FOLDER  the benchmark's images [vqa_rad: playground/data/vqa_rad/images;
#                 slake: playground/data/slake/imgs; pvqa: playground/data/pvqa/images/test]
#   MODEL_PATH    checkpoint folder to evaluate [playground/checkpoints/stllava-med-7b]
#   MODEL_BASE    base LLM when MODEL_PATH is a LoRA adapter [unset: not passed]
#   CKPT          run name used in output paths [basename of MODEL_PATH]
#   EVAL_ROOT     where converted files, answers and results go [playground/eval]
#   CONV_MODE     conversation template [unset: the one the checkpoint records, else vicuna_v1]
#   CUDA_VISIBLE_DEVICES  comma list; one answering process per GPU [0]
#   PYTHON        interpreter [this checkout's .venv/bin/python when it exists, else python]
# Writes $EVAL_ROOT/$BENCH/{test.json,questions.jsonl,stats.json},
# $EVAL_ROOT/$BENCH/answers/$CKPT/merge.jsonl (and its merge.chunkKofN.jsonl shards) and
# $EVAL_ROOT/results/$CKPT/$BENCH/metrics.*; compare runs with:
#   python -m stllava.eval.report --run NAME=$EVAL_ROOT/results/$CKPT --out DIR
set -euo pipefail

BENCH=${1:-}
case "$BENCH" in
    vqa_rad) SRC=${SRC:-playground/data/vqa_rad/testset.json}
             IMAGE_FOLDER=${IMAGE_FOLDER:-playground/data/vqa_rad/images} ;;
    slake)   SRC=${SRC:-playground/data/slake/test.json}
             IMAGE_FOLDER=${IMAGE_FOLDER:-playground/data/slake/imgs} ;;
    pvqa)    SRC=${SRC:-playground/data/pvqa/qas/pvqa_test.json}
             IMAGE_FOLDER=${IMAGE_FOLDER:-playground/data/pvqa/images/test} ;;
    *) echo "usage: bash scripts/eval/run_benchmark.sh vqa_rad|slake|pvqa [model_vqa flags]" \
            "(got '$BENCH'; see the header of this file)" >&2
       exit 2 ;;
esac
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python; fi
fi
export PYTHON
MODEL_PATH=${MODEL_PATH:-playground/checkpoints/stllava-med-7b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
EVAL_ROOT=${EVAL_ROOT:-playground/eval}
DATA_DIR=$EVAL_ROOT/$BENCH
ANSWERS=$DATA_DIR/answers/$CKPT/merge.jsonl
RESULT_DIR=$EVAL_ROOT/results/$CKPT/$BENCH

# 1. raw benchmark → test.json (ground truth) + questions.jsonl; checks every image exists.
"$PYTHON" -m stllava.eval.convert "$BENCH" --src "$SRC" --out "$DATA_DIR" --image-folder "$IMAGE_FOLDER"

# 2. answer, greedy: one process per GPU on its chunk of the questions, chunks merged in order.
bash "$REPO/scripts/run_sharded.sh" "$ANSWERS" stllava.eval.model_vqa \
    --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
    --question-file "$DATA_DIR/questions.jsonl" --image-folder "$IMAGE_FOLDER" \
    --temperature 0 ${CONV_MODE:+--conv-mode "$CONV_MODE"} "$@"

# 3. score with the LLaVA-Med metrics (refuses missing or unknown question ids).
"$PYTHON" -m stllava.eval.metrics --gt "$DATA_DIR/test.json" --pred "$ANSWERS" --out "$RESULT_DIR"
