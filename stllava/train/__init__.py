"""Training: arguments, the LLaVA trainers (optimizer groups, sampler, checkpoints), entry points.

Stage 1 (self-questioning SFT): ``python -m stllava.train.train_sft`` (or ``deepspeed
stllava/train/train_sft.py``) with the flags of ``sqllava_med.sh``; stage 3 (DPO):
``python -m stllava.train.train_dpo`` with those of ``dpo_finetune.sh``. The two entry points are
thin and share ``launch`` (start-up), ``model_setup`` (the model) and ``finish`` (the end of a
run). See docs/Training.md.
"""
