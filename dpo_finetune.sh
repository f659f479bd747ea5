#!/usr/bin/env bash
# STLLaVA-Med stage 3: DPO on the self-made preference pairs (stllava.selftrain.build_pairs output).
#
# The flags below are those of the published dpo_finetune.sh (stage 1's, with --version v1,
# --learning_rate 5e-6, --vision_tower_lr 2e-5, batch 4 x accumulation 16, 1 epoch; ViT-LoRA
# dropout 0.1 is the DPO default). Paths and sizes can be overridden with environment variables
# (defaults = the published run, except the start model, see MODEL):
#
#   MODEL         ./checkpoints/medical/sqllava-med-7b-lora   the stage-1 model: our sqllava_med.sh output (a LoRA
#                                                              folder, needs MODEL_BASE), or a merged full folder
#                                                              (the published run: MODEL_BASE="" and the two below)
#   MODEL_BASE    ./checkpoints/sqllava-7B-v1.5-1200k         base of a LoRA-layout MODEL ("" for a full folder)
#   VISION_TOWER  ""     tower weights to load over MODEL's (published: the merged stage-1 tower folder)
#   PROJECTOR     ""     projector weights to load over MODEL's (published: stage 1's non_lora_trainables.bin)
#   DATA          ./playground/data/stllava_med_dpo.json      pairs: {"id","image","chosen_conversations","reject_conversations"}
#   IMAGES        ./playground/data/pmc_images
#   OUT           ./checkpoints/medical/stllava-med-7b-dpo-lora
#   NUM_GPUS 4   EPOCHS 1   BATCH 4 (per device)   ACCUM 16   MAX_LEN 2048   SAVE_STEPS 50000
#   WORKERS 8    REPORT_TO wandb    ZERO ./scripts/zero3.json
#   BETA 0.1     LOSS sigmoid (or ipo, hinge)    REF_MODEL adapter_disabled (or separate: the published
#                full second copy)               PRECOMPUTE False (True: reference log-probs computed once)
#   LAUNCHER      deepspeed | torchrun | python (python: one process, no launcher; scripts/launch_common.sh)
#   NNODES 1  NODE_RANK 0  MASTER_ADDR 127.0.0.1  MASTER_PORT 29500  HOSTFILE  NO_SSH   several nodes
#                 (NUM_GPUS = processes per node; docs/Training.md "Several nodes", scripts/slurm/)
#   PYTHON        python         EXTRA  extra flags appended as-is (e.g. "--max_steps 10")
#
# Hardware of the paper's run: 4x A100 80GB (10 CPU cores, 64 GB RAM, a 5 h 20 min slot).
# Effective batch = NUM_GPUS x BATCH x ACCUM = 256 pairs; ~10k pairs x 1 epoch = ~40 optimizer steps.
# Each pair is two sequences (chosen, rejected) run as one batch of 2 x BATCH rows.
#
# What happens: a LoRA-layout MODEL is merged (LLM LoRA, projector, ViT-LoRA) and written once to
# OUT/start_model/; DPO then trains NEW LoRA (r 128) + ViT-LoRA (r 32) adapters and the projector on
# top of the merged model, as the reference did. The reference log-probs come from the start
# weights only (REF_MODEL=adapter_disabled: the policy with its adapters off and a frozen copy of
# the start projector, no second model copy). The paths above are checked first (a missing one stops
# the script with one line naming its variable, exit status 2); the pairs are checked next, before any
# weight is loaded or merged (missing/corrupt images, bad roles, differing questions, too long; stop
# with a report, or EXTRA="--on_bad_sample skip"). Every SAVE_STEPS and at the end, OUT (and
# OUT/checkpoint-N) receive the stage-1 layout: adapter_model.safetensors + adapter_config.json,
# non_lora_trainables.bin, Vit-lora/, config.json, tokenizer, preprocessor_config.json. Load the
# result with --model-base <the start model> (OUT/start_model for a LoRA-layout MODEL, else MODEL;
# config.json names it in "dpo_start_model").
# Logged every step: loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected},
# ref_logps/{chosen,rejected}. On a machine without CUDA the run uses the CPU (gloo); see docs/Training.md.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-./checkpoints/medical/sqllava-med-7b-lora}
MODEL_BASE=${MODEL_BASE-./checkpoints/sqllava-7B-v1.5-1200k}
VISION_TOWER=${VISION_TOWER:-}
PROJECTOR=${PROJECTOR:-}
DATA=${DATA:-./playground/data/stllava_med_dpo.json}
IMAGES=${IMAGES:-./playground/data/pmc_images}
OUT=${OUT:-./checkpoints/medical/stllava-med-7b-dpo-lora}
NUM_GPUS=${NUM_GPUS:-4}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-16}
MAX_LEN=${MAX_LEN:-2048}
SAVE_STEPS=${SAVE_STEPS:-50000}
WORKERS=${WORKERS:-8}
REPORT_TO=${REPORT_TO:-wandb}
ZERO=${ZERO:-./scripts/zero3.json}
BETA=${BETA:-0.1}
LOSS=${LOSS:-sigmoid}
REF_MODEL=${REF_MODEL:-adapter_disabled}
PRECOMPUTE=${PRECOMPUTE:-False}
EXTRA=${EXTRA:-}

# shellcheck source=scripts/launch_common.sh
source ./scripts/launch_common.sh  # LAUNCHER, PYTHON
select_launcher train_dpo  # sets launch=(...)
# Inputs first, before any launcher starts a rank (one line naming the variable, exit status 2).
check_input dpo_finetune.sh MODEL dir hub
check_input dpo_finetune.sh MODEL_BASE dir hub
check_input dpo_finetune.sh VISION_TOWER dir hub
check_input dpo_finetune.sh PROJECTOR file
check_input dpo_finetune.sh DATA file
check_input dpo_finetune.sh IMAGES dir
check_input dpo_finetune.sh ZERO file
optional=()
if [ -n "$MODEL_BASE" ]; then optional+=(--model_base "$MODEL_BASE"); fi
if [ -n "$VISION_TOWER" ]; then optional+=(--vision_tower "$VISION_TOWER"); fi
if [ -n "$PROJECTOR" ]; then optional+=(--pretrain_mm_mlp_adapter "$PROJECTOR"); fi

# shellcheck disable=SC2086  # EXTRA is a list of flags
"${launch[@]}" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed "$ZERO" \
    --model_name_or_path "$MODEL" \
    "${optional[@]}" \
    --version v1 \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --mm_projector_type cluster \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length False \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH" \
    --per_device_eval_batch_size 12 \
    --gradient_accumulation_steps "$ACCUM" \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 5 \
    --learning_rate 5e-6 \
    --vision_tower_lr 2e-5 \
    --vit_lora_enable \
    --lora_alpha_vit 64 \
    --lora_r_vit 32 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length "$MAX_LEN" \
    --gradient_checkpointing True \
    --dataloader_num_workers "$WORKERS" \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    --data_aug False \
    --dpo_beta "$BETA" \
    --dpo_loss_type "$LOSS" \
    --ref_model "$REF_MODEL" \
    --precompute_ref_log_probs "$PRECOMPUTE" \
    $EXTRA
