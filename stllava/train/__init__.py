"""Training: arguments, the LLaVA trainer (optimizer groups, sampler, checkpoints), entry points.

Stage 1 (self-questioning SFT): ``python -m stllava.train.train_sft`` (or ``deepspeed
stllava/train/train_sft.py``) with the flags of ``sqllava_med.sh``. See docs/Training.md.
"""
