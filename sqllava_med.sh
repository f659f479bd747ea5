#!/usr/bin/env bash
# STLLaVA-Med stage 1: self-questioning SFT (SQ-LLaVA recipe) on LLaVA-Med instruction data.
#
# The flags below are those of the published sqllava_med.sh; paths and sizes can be overridden
# with environment variables (defaults = the published run):
#
#   MODEL         ./checkpoints/sqllava-7B-v1.5-1200k      full SQ-LLaVA model folder (or a plain Vicuna)
#   VISION_TOWER  ZachSun/sqllava-7B-vit-L-336-1200k        CLIP tower whose weights replace the model's
#   PROJECTOR     $MODEL/mm_projector.bin                   projector weights ("" to keep the model's)
#   DATA          ./playground/data/llava_med_instruct_60k_inline_mention.json
#   IMAGES        ./playground/data/llava_med_images
#   OUT           ./checkpoints/medical/sqllava-med-7b-lora
#   NUM_GPUS 4   EPOCHS 3   BATCH 8 (per device)   ACCUM 4   MAX_LEN 2048   SAVE_STEPS 50000
#   WORKERS 8    REPORT_TO wandb    ZERO ./scripts/zero3.json    SQ_R 0.5
#   LAUNCHER      deepspeed | torchrun | python (python: one process, no launcher; scripts/launch_common.sh)
#   NNODES 1  NODE_RANK 0  MASTER_ADDR 127.0.0.1  MASTER_PORT 29500  HOSTFILE  NO_SSH   several nodes
#                 (NUM_GPUS = processes per node; docs/Training.md "Several nodes", scripts/slurm/)
#   PYTHON        python         EXTRA  extra flags appended as-is (e.g. "--max_steps 10")
#
# Hardware of the paper's run: 4x A100 80GB (the job asked for 10 CPU cores, 64 GB RAM and a
# 20 h 20 min slot). Effective batch = NUM_GPUS x BATCH x ACCUM = 128 sequences of up to 2048
# positions (576 of them image patches): 60k records x 3 epochs = ~1,400 optimizer steps.
# LoRA r=128 on the LLM (~320M trainable), ViT-LoRA r=32, the cluster projector trainable at
# 2e-5 and the ViT-LoRA at 5e-5; bf16, ZeRO-3, gradient checkpointing.
#
# What happens: the paths above are checked (a missing one stops the script with one line naming its
# variable, exit status 2); the data are checked next, before any weight is loaded (missing/corrupt
# images, bad roles, <image> mismatches, too long; the run stops with a report, or add
# EXTRA="--on_bad_sample skip"); the trainable
# parameters per part are logged; every SAVE_STEPS and at the end, OUT (and OUT/checkpoint-N)
# receive adapter_model.safetensors + adapter_config.json (LLM LoRA), non_lora_trainables.bin
# (projector), Vit-lora/, config.json, the tokenizer and preprocessor_config.json. Resume with
# EXTRA="--resume_from_checkpoint OUT/checkpoint-N". Loss is logged every step.
# On a machine without CUDA the run uses the CPU (gloo) and ignores --tf32; see docs/Training.md.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-./checkpoints/sqllava-7B-v1.5-1200k}
VISION_TOWER=${VISION_TOWER:-ZachSun/sqllava-7B-vit-L-336-1200k}
PROJECTOR=${PROJECTOR-$MODEL/mm_projector.bin}
DATA=${DATA:-./playground/data/llava_med_instruct_60k_inline_mention.json}
IMAGES=${IMAGES:-./playground/data/llava_med_images}
OUT=${OUT:-./checkpoints/medical/sqllava-med-7b-lora}
NUM_GPUS=${NUM_GPUS:-4}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-4}
MAX_LEN=${MAX_LEN:-2048}
SAVE_STEPS=${SAVE_STEPS:-50000}
WORKERS=${WORKERS:-8}
REPORT_TO=${REPORT_TO:-wandb}
ZERO=${ZERO:-./scripts/zero3.json}
SQ_R=${SQ_R:-0.5}
EXTRA=${EXTRA:-}

# shellcheck source=scripts/launch_common.sh
source ./scripts/launch_common.sh  # LAUNCHER, PYTHON
select_launcher train_sft  # sets launch=(...)
# Inputs first, before any launcher starts a rank (one line naming the variable, exit status 2).
check_input sqllava_med.sh MODEL dir hub
check_input sqllava_med.sh VISION_TOWER dir hub
check_input sqllava_med.sh PROJECTOR file
check_input sqllava_med.sh DATA file
check_input sqllava_med.sh IMAGES dir
check_input sqllava_med.sh ZERO file
projector=()
if [ -n "$PROJECTOR" ]; then projector=(--pretrain_mm_mlp_adapter "$PROJECTOR"); fi

# shellcheck disable=SC2086  # EXTRA is a list of flags
"${launch[@]}" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed "$ZERO" \
    --model_name_or_path "$MODEL" \
    --version v1_sq \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "$VISION_TOWER" \
    "${projector[@]}" \
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
    --per_device_eval_batch_size 6 \
    --gradient_accumulation_steps "$ACCUM" \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 2 \
    --learning_rate 2e-4 \
    --vision_tower_lr 5e-5 \
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
    --sq_r "$SQ_R" \
    $EXTRA
