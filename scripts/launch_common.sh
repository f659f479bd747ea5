#!/usr/bin/env bash
# Launcher selection shared by sqllava_med.sh and dpo_finetune.sh, which source it from the repo
# root after setting NUM_GPUS. Environment (default in brackets):
#   LAUNCHER  deepspeed | torchrun | python (python: one process, no launcher) [deepspeed]
#   PYTHON    interpreter of the torchrun and python launchers [python]
# `select_launcher ENTRY` sets the array `launch` to the command that runs stllava/train/ENTRY.py:
#   deepspeed  deepspeed --num_gpus $NUM_GPUS stllava/train/ENTRY.py
#   torchrun   $PYTHON -m torch.distributed.run --standalone --nproc_per_node $NUM_GPUS stllava/train/ENTRY.py
#   python     $PYTHON -m stllava.train.ENTRY
# and stops the script (exit status 2) on any other LAUNCHER.

LAUNCHER=${LAUNCHER:-deepspeed}
PYTHON=${PYTHON:-python}

select_launcher() {
    local entry=$1
    case "$LAUNCHER" in
        deepspeed) launch=(deepspeed --num_gpus "$NUM_GPUS" "stllava/train/$entry.py") ;;
        torchrun)  launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" "stllava/train/$entry.py") ;;
        python)    launch=("$PYTHON" -m "stllava.train.$entry") ;;
        *) echo "LAUNCHER must be deepspeed, torchrun or python (got '$LAUNCHER')" >&2; exit 2 ;;
    esac
}
