"""The end of a training run, shared by the entry points (``train_sft``, ``train_dpo``).

:func:`train_and_save` trains (resuming when ``--resume_from_checkpoint`` says so), saves the
trainer state and the final checkpoint (the layout of ``stllava.train.checkpoint``, in
``--output_dir``), evaluates the held-out set when the trainer has one (``eval_results.json``) and
reports what a user must know: tokenization mismatches, where the checkpoint is and how to load it.
"""
from __future__ import annotations

import logging
from typing import Sequence

from stllava.train.launch import resume_from_checkpoint

logger = logging.getLogger(__name__)


def train_and_save(trainer, stage: str, *, model_base: str | None = None,
                   eval_keys: Sequence[str] = ()) -> str:
    """Run ``trainer`` to the end and save everything; returns the output folder.

    ``stage`` names the run in the logs; ``model_base`` is the base a user loads the checkpoint
    with (logged); ``eval_keys`` are the held-out metrics worth a log line (all are saved).
    Every process must call it (saving gathers ZeRO-3 shards)."""
    args = trainer.args
    trainer.train(resume_from_checkpoint=resume_from_checkpoint(args))
    trainer.save_state()
    trainer.save_model(args.output_dir)
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
