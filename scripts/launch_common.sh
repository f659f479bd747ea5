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

# `check_input SCRIPT VAR KIND [hub]` stops the script (exit status 2, one line naming VAR) when
# the value of the variable VAR is not an existing local KIND (file | dir). With `hub`, a value
# shaped like a model hub id (org/name, no leading ./ or /) is let through for from_pretrained
# to fetch, unless HF_HUB_OFFLINE=1. An empty value is left to the caller (an optional input).
# Why here: a missing local folder would otherwise reach from_pretrained, which tries the hub from
# every rank (hundreds of lines of retries) before a raw OSError.
check_input() {
    local script=$1 var=$2 kind=$3 hub=${4:-} value
    value=${!var}
    if [ -z "$value" ]; then return 0; fi
    if [ "$kind" = file ] && [ -f "$value" ]; then return 0; fi
    if [ "$kind" = dir ] && [ -d "$value" ]; then return 0; fi
    if [ -n "$hub" ] && [ ! -e "$value" ] && [ "${HF_HUB_OFFLINE:-0}" != 1 ] \
        && [[ "$value" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then return 0; fi
    local what="an existing $([ "$kind" = dir ] && echo folder || echo file)"
    if [ -n "$hub" ]; then what="$what or a model hub id (org/name; HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0})"; fi
    echo "$script: error: $var=$value is not $what; set $var to the right path" >&2
    exit 2
}
