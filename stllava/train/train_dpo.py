"""Stage 3: DPO on self-made preference pairs, HF Trainer + DeepSpeed (docs/Method.md#dpo).

    python -m stllava.train.train_dpo --model_name_or_path STAGE1 --data_path dpo.json --image_folder D ...
    deepspeed stllava/train/train_dpo.py --deepspeed scripts/zero3.json ...            (GPUs)
    python -m torch.distributed.run --nproc_per_node 2 stllava/train/train_dpo.py ...  (CPU: gloo)

Takes the flags of the published ``dpo_finetune.sh`` (those of stage 1, ``--version v1``) plus the
DPO ones of :class:`~stllava.train.arguments.DPOTrainingArguments` (``--dpo_beta``,
``--dpo_loss_type``, ``--label_smoothing``, ``--ref_model``, ``--precompute_ref_log_probs``, ``--ref_log_probs_path``)
and ``--model_base``. The run:

1. **the start model** is the stage-1 model, merged. ``--model_name_or_path`` is either a full
   folder (a merged stage-1 model: what the published script used, with ``--vision_tower`` /
   ``--pretrain_mm_mlp_adapter`` re-loading the stage-1 tower and projector, as in stage 1), or a
   stage-1 LoRA output with ``--model_base`` (adapter + ``non_lora_trainables.bin`` + ``Vit-lora/``).
   The latter is merged by ``stllava.model.merge`` and written once to ``<output_dir>/start_model/``
   (reused by reruns): the DPO checkpoints are LoRA folders on top of it, so it is their
   ``--model-base`` (their config names it in ``dpo_start_model``);
2. as the recipe does, DPO then trains NEW adapters on the merged start model: LLM LoRA, ViT-LoRA
   (dropout 0.1) and the projector (``stllava.train.model_setup``), and the start
   model is the DPO reference (``--ref_model``, see ``stllava.train.dpo_trainer``);
3. checks the pairs (``stllava.data.preference``) and applies ``--on_bad_sample`` — before the
   start model is merged or loaded;
4. trains with :class:`~stllava.train.dpo_trainer.LlavaDPOTrainer`, saving the stage-1 checkpoint
   layout (``conv_mode`` = ``--version`` in its config) in every ``checkpoint-N/`` and in
   ``--output_dir`` (``stllava.train.finish``).

Bad data or flags print one ``error:`` line and exit 2.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys

import torch

from stllava import artifacts
from stllava.train.arguments import DPO_ARGUMENTS, DPO_PROG, FlagError, LlavaArgumentParser
from stllava.train.ref_cache import REF_CACHE_NAME, read_ref_cache, ref_cache_fingerprint

logger = logging.getLogger("stllava.train.train_dpo")

PROG = DPO_PROG
START_DIR = "start_model"
START_MARKER = "stllava_start_model.json"


def build_parser():
    """The flags of this entry point (``stllava.train.arguments.DPO_ARGUMENTS``), as the parser it uses."""
    return LlavaArgumentParser(DPO_ARGUMENTS, PROG, __doc__.split("\n\n")[0])


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def materialize_start_model(model_path: str, model_base: str | None, out_dir: str, dtype: torch.dtype) -> str:
    """The folder of the start model: ``model_path`` itself when it is a full folder without
    ``Vit-lora/``; otherwise (LoRA or projector-only layout + ``model_base``, or a ViT-LoRA to merge)
    the model merged by :func:`stllava.model.merge.merge_checkpoint` into ``out_dir/start_model`` on
    the main process, or reused when a previous run merged it from the same sources (its
    :mod:`stllava.artifacts` marker; a stale or unfinished one is replaced). Every process must
    call it. Raises the builder's CheckpointLayoutError when the layout is incomplete (e.g. a LoRA
    folder without ``--model_base``)."""
    from stllava.model import checkpoint_layouts as cl
    from stllava.model.merge import merge_checkpoint
    from stllava.train.checkpoint import zero3_init_disabled

    layout = cl.detect_layout(model_path, model_base)
    if layout.kind == "full" and not layout.vit_lora:
        return model_path
    target = os.path.join(out_dir, START_DIR)
    source = {"model_name_or_path": os.path.abspath(model_path),
              "model_base": os.path.abspath(model_base) if model_base else None, "dtype": str(dtype)}
    marker = os.path.join(target, START_MARKER)
    if _is_main():
        try:  # a start model merged from other sources is merged again, never refused
            reuse, why = artifacts.check_marker(marker, source), "no marker: an unfinished merge"
        except artifacts.ArtifactError as e:
            reuse, why = False, e.reason
        if reuse:
            logger.info("reusing the merged start model %s", target)
        else:
            if os.path.isdir(target):
                logger.info("replacing %s (%s)", target, why)
                shutil.rmtree(target)
            logger.info("merging the stage-1 %s checkpoint %s (base %s) into %s", layout.kind, model_path,
                        model_base, target)
            with zero3_init_disabled():  # a plain model on the CPU, also under an active ZeRO-3 config
                merge_checkpoint(model_path, model_base, target, dtype=dtype)
            artifacts.write_marker(marker, source)
    _barrier()
    return target


def resolve_ref_mode(training_args) -> str:
    """``--ref_model``, or its default: adapter_disabled with ``--lora_enable``, separate otherwise."""
    return training_args.ref_model or ("adapter_disabled" if training_args.lora_enable else "separate")


def _set_ref_mode(model_args, data_args, training_args) -> None:
    """Write :func:`resolve_ref_mode` into ``--ref_model``; refuses (FlagError) adapter_disabled
    without ``--lora_enable``, ``--tune_mm_mlp_adapter`` (projector pretraining is an SFT stage)
    and ``--loss_averaging`` other than its default (the DPO loss is a mean over each
    micro-batch's pairs, as published); refuses (LossSettingsError) a ``--dpo_beta`` /
    ``--dpo_loss_type`` / ``--label_smoothing`` out of range, before any model is loaded."""
    from stllava.train.dpo_loss import check_loss_settings

    check_loss_settings(training_args.dpo_beta, training_args.dpo_loss_type, training_args.label_smoothing)
    if model_args.tune_mm_mlp_adapter:
        raise FlagError("--tune_mm_mlp_adapter (projector pretraining) is a stage of SFT: run it with "
                        "python -m stllava.train.train_sft --version plain")
    if training_args.loss_averaging != "tokens":
        raise FlagError("--loss_averaging applies to the SFT cross-entropy; the DPO loss is already the mean over "
                        "each micro-batch's pairs, as published")
    training_args.ref_model = resolve_ref_mode(training_args)
    if training_args.ref_model == "adapter_disabled" and not training_args.lora_enable:
        raise FlagError("--ref_model adapter_disabled needs --lora_enable True; use --ref_model separate")


def build_dpo_trainer(argv: list[str], callbacks: list | None = None):
    """Everything of a DPO run before training, from command-line flags ``argv``: returns the
    :class:`~stllava.train.dpo_trainer.LlavaDPOTrainer` (model, reference, data and collator in
    place). ``callbacks``: extra ``TrainerCallback`` objects (tests, tools). :func:`run_dpo` trains it.

    Raises :class:`stllava.data.verify.BadDataError` (with the report) when pairs are bad and
    ``--on_bad_sample`` is ``stop``; :class:`~stllava.train.arguments.FlagError` for unsupported
    flag values.
    """
    from stllava.data.preference import DataCollatorForPreferenceDataset, build_preference_dataset
    from stllava.train.dpo_trainer import LlavaDPOTrainer
    from stllava.train.launch import prepare_run
    from stllava.train.model_setup import compute_dtype, load_model_for_training, load_processing, prepare_model
    from stllava.train.trainer import length_image_tokens

    model_args, data_args, training_args = prepare_run(argv, build_parser().parse_args_into_dataclasses,
                                                       check=_set_ref_mode)
    ref_mode = training_args.ref_model
    if training_args.eval_data_path and training_args.precompute_ref_log_probs:
        raise FlagError("--eval_data_path needs a live reference: drop --precompute_ref_log_probs")

    def pairs(path: str, tokenizer, image_processor, image_tokens):
        return build_preference_dataset(
            path, tokenizer, image_processor, image_folder=data_args.image_folder,
            version=model_args.version, image_aspect_ratio=data_args.image_aspect_ratio,
            on_bad_sample=data_args.on_bad_sample, model_max_length=training_args.model_max_length,
            image_tokens=length_image_tokens(training_args, image_tokens), verify_workers=data_args.verify_workers)

    def all_pairs(*processing):
        return (pairs(data_args.data_path, *processing),
                pairs(training_args.eval_data_path, *processing) if training_args.eval_data_path else None)

    # The pairs are checked before the start model is merged or loaded (a stage-1 folder carries
    # the tokenizer and the tower's config), unless the start model is a hub id.
    processing = load_processing(model_args, data_args, training_args)
    datasets = all_pairs(*processing) if processing is not None else None

    dtype = compute_dtype(training_args)
    source = {"start_model": model_args.model_name_or_path, "model_base": model_args.model_base}
    model_args.model_name_or_path = materialize_start_model(model_args.model_name_or_path, model_args.model_base,
                                                           training_args.output_dir, dtype)
    start_model = os.path.abspath(model_args.model_name_or_path)
    fingerprint = ref_cache_fingerprint(model_args, data_args, training_args, dtype, source)

    model, tokenizer, image_processor, image_tokens = load_model_for_training(model_args, data_args, training_args,
                                                                              processing)
    dataset, eval_dataset = datasets if datasets is not None else all_pairs(tokenizer, image_processor, image_tokens)

    ref_model = None
    cache_path = training_args.ref_log_probs_path or os.path.join(training_args.output_dir, REF_CACHE_NAME)
    cached = training_args.precompute_ref_log_probs and read_ref_cache(cache_path, fingerprint, dataset.indices)
    if ref_mode == "separate" and not cached:
        if training_args.deepspeed:  # a second ZeRO-3-partitioned load; DeepSpeed shards it as the policy
            ref_model = load_model_for_training(model_args, data_args, training_args)[0]
        else:
            ref_model = copy.deepcopy(model)
    model = prepare_model(model, training_args, model_args)

    collator = DataCollatorForPreferenceDataset(tokenizer.pad_token_id, training_args.model_max_length,
                                                length_image_tokens(training_args, image_tokens))
    trainer = LlavaDPOTrainer(model=model, ref_model=ref_model, args=training_args, train_dataset=dataset,
                              eval_dataset=eval_dataset,
                              data_collator=collator, processing_class=tokenizer, image_processor=image_processor,
                              ref_log_probs_fingerprint=fingerprint, start_model=start_model, callbacks=callbacks)
    return trainer


def train_and_save(trainer) -> str:
    """Train a :func:`build_dpo_trainer` trainer to the end and save it (``stllava.train.finish``);
    returns the output folder."""
    from stllava.train.finish import train_and_save as finish

    return finish(trainer, "stage-3 DPO", model_base=trainer.start_model,
                  eval_keys=("eval_rewards/accuracies", "eval_rewards/margins"))


def run_dpo(argv: list[str], callbacks: list | None = None) -> str:
    """Run stage-3 DPO with command-line flags ``argv`` in this process (or as one rank of a
    launcher); returns the output folder. Raises as :func:`build_dpo_trainer`."""
    return train_and_save(build_dpo_trainer(argv, callbacks))


def main(argv: list[str] | None = None) -> int:
    """The command line: :func:`run_dpo` under ``stllava.errors.run_cli``; returns the exit code."""
    from stllava.train.launch import run_entry_point

    return run_entry_point(run_dpo, argv)


if __name__ == "__main__":
    sys.exit(main())
