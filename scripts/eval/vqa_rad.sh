#!/usr/bin/env bash
# VQA-RAD zero-shot evaluation (SPEC §7): convert → answer (greedy, 1 shard/GPU) → score.
#
#   MODEL_PATH=playground/checkpoints/stllava-med-7b bash scripts/eval/vqa_rad.sh
#   CUDA_VISIBLE_DEVICES=0,1,2,3 MODEL_PATH=... bash scripts/eval/vqa_rad.sh    # 4 shards
#
# Environment (default in brackets):
#   SRC           raw VQA-RAD file: testset.json or VQA_RAD_Dataset_Public.json
#                 [playground/data/vqa_rad/testset.json]
#   IMAGE_FOLDER  the VQA-RAD images [playground/data/vqa_rad/images]
#   MODEL_PATH, MODEL_BASE, CKPT, EVAL_ROOT, CONV_MODE, CUDA_VISIBLE_DEVICES, PYTHON: as in
#                 scripts/eval/run_benchmark.sh (the steps this script runs, shared by all benchmarks)
# Writes $EVAL_ROOT/vqa_rad/{test.json,questions.jsonl,stats.json},
# $EVAL_ROOT/vqa_rad/answers/$CKPT/merge.jsonl and $EVAL_ROOT/results/$CKPT/vqa_rad/metrics.*;
# compare runs with: python -m stllava.eval.report --run NAME=$EVAL_ROOT/results/$CKPT --out DIR
set -euo pipefail

BENCH=vqa_rad
SRC=${SRC:-playground/data/vqa_rad/testset.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-playground/data/vqa_rad/images}
# shellcheck source=scripts/eval/run_benchmark.sh
source "$(dirname "${BASH_SOURCE[0]}")/run_benchmark.sh"
