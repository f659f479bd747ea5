#!/usr/bin/env bash
# SLAKE-en zero-shot evaluation (SPEC §7): convert → answer (greedy, 1 shard/GPU) → score.
#
#   MODEL_PATH=playground/checkpoints/stllava-med-7b bash scripts/eval/slake.sh
#   CUDA_VISIBLE_DEVICES=0,1,2,3 MODEL_PATH=... bash scripts/eval/slake.sh    # 4 shards
#
# Environment (default in brackets):
#   SRC           SLAKE raw test file (Slake1.0/test.json); English questions are kept
#                 [playground/data/slake/test.json]
#   IMAGE_FOLDER  SLAKE image root (Slake1.0/imgs) [playground/data/slake/imgs]
#   MODEL_PATH, MODEL_BASE, CKPT, EVAL_ROOT, CONV_MODE, CUDA_VISIBLE_DEVICES, PYTHON: as in
#                 scripts/eval/run_benchmark.sh (the steps this script runs, shared by all benchmarks)
# Writes $EVAL_ROOT/slake/{test.json,questions.jsonl,stats.json},
# $EVAL_ROOT/slake/answers/$CKPT/merge.jsonl and $EVAL_ROOT/results/$CKPT/slake/metrics.*;
# compare runs with: python -m stllava.eval.report --run NAME=$EVAL_ROOT/results/$CKPT --out DIR
set -euo pipefail

BENCH=slake
SRC=${SRC:-playground/data/slake/test.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-playground/data/slake/imgs}
# shellcheck source=scripts/eval/run_benchmark.sh
source "$(dirname "${BASH_SOURCE[0]}")/run_benchmark.sh"
