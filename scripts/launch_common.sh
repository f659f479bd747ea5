#!/usr/bin/env bash
# Launcher selection shared by sqllava_med.sh and dpo_finetune.sh, which source it from the repo
# root after setting NUM_GPUS (processes per node). Environment (default in brackets):
#   LAUNCHER     deepspeed | torchrun | python (python: one process, no launcher) [deepspeed]
#   PYTHON       interpreter of the torchrun and python launchers [python]
#   NNODES       nodes in the job [1]; NODE_RANK this node's index, 0-based [0]
#   MASTER_ADDR  address of node 0 [127.0.0.1]; MASTER_PORT its rendezvous port [29500]
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" per line) for LAUNCHER=deepspeed on several nodes
#   NO_SSH       1: with LAUNCHER=deepspeed and HOSTFILE, start only this node's ranks (one launcher
#                per node, e.g. one srun task per node) instead of reaching the others over ssh/pdsh
# `select_launcher ENTRY` sets the array `launch` to the command that runs stllava/train/ENTRY.py:
#   deepspeed, one node    deepspeed --num_gpus $NUM_GPUS stllava/train/ENTRY.py
#   deepspeed, HOSTFILE    deepspeed --hostfile $HOSTFILE --num_nodes $NNODES --num_gpus $NUM_GPUS
#                          --master_addr $MASTER_ADDR --master_port $MASTER_PORT
#                          [--no_ssh --node_rank $NODE_RANK] stllava/train/ENTRY.py
#   torchrun, one node     $PYTHON -m torch.distributed.run --standalone --nproc_per_node $NUM_GPUS stllava/train/ENTRY.py
#   torchrun, NNODES > 1   $PYTHON -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK
#                          --master_addr $MASTER_ADDR --master_port $MASTER_PORT --nproc_per_node $NUM_GPUS ...
#                          (run the script once on every node, each with its NODE_RANK)
#   python                 $PYTHON -m stllava.train.ENTRY
# and stops the script (exit status 2, one line) on any other LAUNCHER or an inconsistent node setting.
# docs/Training.md ("Several nodes") has a Slurm example (scripts/slurm/).

LAUNCHER=${LAUNCHER:-deepspeed}
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
NO_SSH=${NO_SSH:-0}

launch_error() {
    echo "$(basename "$0"): error: $1" >&2
    exit 2
}

select_launcher() {
    local entry=$1
    [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || launch_error "NNODES=$NNODES is not a positive integer; set NNODES to the number of nodes"
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] || \
        launch_error "NODE_RANK=$NODE_RANK is not in [0, NNODES=$NNODES); set NODE_RANK to this node's index"
    case "$LAUNCHER" in
        deepspeed)
            if [ -n "$HOSTFILE" ]; then
                [ -f "$HOSTFILE" ] || launch_error "HOSTFILE=$HOSTFILE is not an existing file; write one line 'host slots=N' per node"
                launch=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$NUM_GPUS"
                        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
                if [ "$NO_SSH" = 1 ]; then launch+=(--no_ssh --node_rank "$NODE_RANK"); fi
                launch+=("stllava/train/$entry.py")
            elif [ "$NNODES" -gt 1 ]; then
                launch_error "LAUNCHER=deepspeed with NNODES=$NNODES needs HOSTFILE (one line 'host slots=N' per node); or use LAUNCHER=torchrun"
            else
                launch=(deepspeed --num_gpus "$NUM_GPUS" "stllava/train/$entry.py")
            fi ;;
        torchrun)
            if [ "$NNODES" -gt 1 ]; then
                launch=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
                        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NUM_GPUS"
                        "stllava/train/$entry.py")
            else
                launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" "stllava/train/$entry.py")
            fi ;;
        python)
            [ "$NNODES" = 1 ] || launch_error "LAUNCHER=python runs one process; NNODES=$NNODES needs LAUNCHER=torchrun or deepspeed"
            launch=("$PYTHON" -m "stllava.train.$entry") ;;
        *) launch_error "LAUNCHER must be deepspeed, torchrun or python (got '$LAUNCHER')" ;;
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
