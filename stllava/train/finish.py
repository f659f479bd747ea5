"""The end of a training run, shared by the entry points (``train_sft``, ``train_dpo``).

:func:`train_and_save` trains (resuming when ``--resume_from_checkpoint`` says so, from the last
checkpoint whose files are complete: ``stllava.train.manifest.choose_resume_checkpoint``), saves
the trainer state and the final checkpoint (the layout of ``stllava.train.checkpoint``, in
``--output_dir``, written aside and moved into place after a free-space check:
``stllava.train.saving.save_final``), evaluates the held-out set when the trainer has one (``eval_results.json``) and
reports what a user must know: tokenization mismatches, where the checkpoint is and how to load it.
Under ``--deepspeed`` a checkpoint to resume is first checked against the file hashes saved with it
(``stllava.train.manifest``): DeepSpeed unpickles its files.
"""
from __future__ import annotations

import logging
from typing import Sequence

from stllava.train.launch import resume_from_checkpoint
from stllava.train.manifest import choose_resume_checkpoint, verify_resume_checkpoint
from stllava.train.saving import save_final

logger = logging.getLogger(__name__)


def train_and_save(trainer, stage: str, *, model_base: str | None = None,
                   eval_keys: Sequence[str] = ()) -> str:
    """Run ``trainer`` to the end and save everything; returns the output folder.

    ``stage`` names the run in the logs; ``model_base`` is the base a user loads the checkpoint
    with (logged); ``eval_keys`` are the held-out metrics worth a log line (all are saved).
    Every process must call it (saving gathers ZeRO-3 shards)."""
    args = trainer.args
    resume = resume_from_checkpoint(args)
    if resume:  # a checkpoint whose files are cut short is skipped (True) or refused, trusted or not
        resume = choose_resume_checkpoint(resume, args.output_dir)
    if resume and args.deepspeed:  # DeepSpeed's own resume unpickles (weights_only=False) its files
        verify_resume_checkpoint(resume, trust=getattr(args, "trust_resume_checkpoint", False))
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer)  # free space checked first; written aside, moved into place when complete
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.save_metrics("eval", metrics)
        logger.info("held-out set: %s", ", ".join(f"{k} {metrics.get(k, float('nan')):.3f}" for k in eval_keys))
    mismatches = getattr(trainer.train_dataset, "mismatches", 0)
    if mismatches:
        logger.warning("%d samples had tokenization mismatches (labels ignored) in this process", mismatches)
    logger.info("%s finished; checkpoint in %s%s", stage, args.output_dir,
                f" (load it with model_base {model_base})" if model_base else "")
    return args.output_dir
