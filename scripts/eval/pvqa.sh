#!/usr/bin/env bash
# PathVQA zero-shot evaluation (SPEC §7): convert → answer (greedy, 1 shard/GPU) → score.
#
#   MODEL_PATH=playground/checkpoints/stllava-med-7b bash scripts/eval/pvqa.sh
#   CUDA_VISIBLE_DEVICES=0,1,2,3 MODEL_PATH=... bash scripts/eval/pvqa.sh    # 4 shards
#
# Environment (default in brackets):
#   SRC           PathVQA test file: LXMERT-style pvqa_test.json or an HF-style export
#                 (JSON/JSONL of image, question, answer)
#                 [playground/data/pvqa/qas/pvqa_test.json]
#   IMAGE_FOLDER  folder of <img_id>.jpg test images [playground/data/pvqa/images/test]
#   MODEL_PATH, MODEL_BASE, CKPT, EVAL_ROOT, CONV_MODE, CUDA_VISIBLE_DEVICES, PYTHON: as in
#                 scripts/eval/run_benchmark.sh (the steps this script runs, shared by all benchmarks)
# Writes $EVAL_ROOT/pvqa/{test.json,questions.jsonl,stats.json},
# $EVAL_ROOT/pvqa/answers/$CKPT/merge.jsonl and $EVAL_ROOT/results/$CKPT/pvqa/metrics.*;
# compare runs with: python -m stllava.eval.report --run NAME=$EVAL_ROOT/results/$CKPT --out DIR
set -euo pipefail

BENCH=pvqa
SRC=${SRC:-playground/data/pvqa/qas/pvqa_test.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-playground/data/pvqa/images/test}
# shellcheck source=scripts/eval/run_benchmark.sh
source "$(dirname "${BASH_SOURCE[0]}")/run_benchmark.sh"
