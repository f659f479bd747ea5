"""Stage 3: DPO on self-made preference pairs, HF Trainer + DeepSpeed (SPEC §6).

    python -m stllava.train.train_dpo --model_name_or_path STAGE1 --data_path dpo.json --image_folder D ...
    deepspeed stllava/train/train_dpo.py --deepspeed scripts/zero3.json ...            (GPUs)
    python -m torch.distributed.run --nproc_per_node 2 stllava/train/train_dpo.py ...  (CPU: gloo)

Takes the flags of the published ``dpo_finetune.sh`` (those of stage 1, ``--version v1``) plus the
DPO ones of :class:`~stllava.train.dpo_trainer.DPOTrainingArguments` (``--dpo_beta``,
``--dpo_loss_type``, ``--ref_model``, ``--precompute_ref_log_probs``, ``--ref_log_probs_path``)
and ``--model_base``. The run:

1. **the start model** is the stage-1 model, merged. ``--model_name_or_path`` is either a full
   folder (a merged stage-1 model: what the published script used, with ``--vision_tower`` /
   ``--pretrain_mm_mlp_adapter`` re-loading the stage-1 tower and projector, as in stage 1), or a
   stage-1 LoRA output with ``--model_base`` (adapter + ``non_lora_trainables.bin`` + ``Vit-lora/``).
   The latter is merged by ``stllava.model.builder`` and written once to ``<output_dir>/start_model/``
   (reused by reruns): the DPO checkpoints are LoRA folders on top of it, so it is their
   ``--model-base`` (their config names it in ``dpo_start_model``);
2. like the reference, DPO then trains NEW adapters on the merged start model: LLM LoRA, ViT-LoRA
   (dropout 0.1) and the projector (``stllava.train.train_sft.make_trainable``), and the start
   model is the DPO reference (``--ref_model``, see ``stllava.train.dpo_trainer``);
3. checks the pairs (``stllava.data.preference``) and applies ``--on_bad_sample``;
4. trains with :class:`~stllava.train.dpo_trainer.LlavaDPOTrainer`, saving the stage-1 checkpoint
   layout in every ``checkpoint-N/`` and in ``--output_dir``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers

from stllava.train.arguments import DataArguments, ModelArguments
from stllava.train.dpo_trainer import REF_CACHE_NAME, DPOTrainingArguments, read_ref_cache
from stllava.train.launch import prepare_run, resume_from_checkpoint
from stllava.train.train_sft import cast_unpartitioned, compute_dtype, load_model_for_training, make_trainable

logger = logging.getLogger("stllava.train.train_dpo")

START_DIR = "start_model"
START_MARKER = "stllava_start_model.json"


@dataclass
class DPOModelArguments(ModelArguments):
    version: str = field(default="v1", metadata={"help": "Conversation template of the pairs (the published run: v1)."})
    model_base: str | None = field(default=None, metadata={
        "help": "Base folder of a LoRA-layout stage-1 checkpoint given as --model_name_or_path (the model stage 1 "
                "started from); the merged start model is written to <output_dir>/start_model/."})


def parse_dpo_args(argv: list[str] | None = None):
    """``(DPOModelArguments, DataArguments, DPOTrainingArguments)`` from ``argv``; unknown flags raise."""
    parser = transformers.HfArgumentParser((DPOModelArguments, DataArguments, DPOTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def materialize_start_model(model_path: str, model_base: str | None, out_dir: str, dtype: torch.dtype) -> str:
    """The folder of the start model: ``model_path`` itself when it is a full folder without
    ``Vit-lora/``; otherwise (LoRA or projector-only layout + ``model_base``, or a ViT-LoRA to merge)
    the merged model written to ``out_dir/start_model`` on the main process, or reused when a previous
    run wrote it from the same sources. Every process must call it. Raises the builder's
    CheckpointLayoutError when the layout is incomplete (e.g. a LoRA folder without ``--model_base``)."""
    from stllava.model import checkpoint_layouts as cl

    layout = cl.detect_layout(model_path, model_base)
    if layout.kind == "full" and not layout.vit_lora:
        return model_path
    target = os.path.join(out_dir, START_DIR)
    source = {"model_name_or_path": os.path.abspath(model_path),
              "model_base": os.path.abspath(model_base) if model_base else None, "dtype": str(dtype)}
    marker = os.path.join(target, START_MARKER)
    if _is_main():
        done = os.path.isfile(marker) and json.load(open(marker)) == source
        if done:
            logger.info("reusing the merged start model %s", target)
        else:
            _write_merged(model_path, model_base, target, dtype, layout.kind)
            with open(marker, "w") as f:
                json.dump(source, f, indent=1)
    _barrier()
    return target


def _write_merged(model_path: str, model_base: str | None, target: str, dtype: torch.dtype, kind: str) -> None:
    import shutil

    from stllava.model import checkpoint_layouts as cl
    from stllava.model.builder import load_pretrained_model
    from stllava.train.checkpoint import zero3_init_disabled

    logger.info("merging the stage-1 %s checkpoint %s (base %s) into %s", kind, model_path, model_base, target)
    with zero3_init_disabled():
        tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base, device="cpu", dtype=dtype)
    os.makedirs(target, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if processor is not None:
        processor.save_pretrained(target)
    for src in (model_path, model_base):  # the slow tokenizer's SentencePiece model, when save_pretrained omits it
        if src and os.path.isfile(os.path.join(src, "tokenizer.model")) \
                and not os.path.isfile(os.path.join(target, "tokenizer.model")):
            shutil.copy(os.path.join(src, "tokenizer.model"), os.path.join(target, "tokenizer.model"))
    assert cl.detect_layout(target).kind == "full"
    del model


def ref_cache_fingerprint(model_args, data_args, training_args, dtype: torch.dtype, source: dict) -> dict:
    """What precomputed reference log-probs depend on: the data file (path and SHA-256), the start
    model's sources, the weights re-loaded over it, the template, image handling, length and dtype."""
    h = hashlib.sha256()
    with open(data_args.data_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    def absolute(p):
        return os.path.abspath(p) if p and os.path.exists(p) else p

    return {"data_path": os.path.abspath(data_args.data_path), "data_sha256": h.hexdigest(),
            "image_folder": absolute(data_args.image_folder), **{k: absolute(v) for k, v in source.items()},
            "vision_tower": absolute(model_args.vision_tower),
            "pretrain_mm_mlp_adapter": absolute(model_args.pretrain_mm_mlp_adapter), "version": model_args.version,
            "image_aspect_ratio": data_args.image_aspect_ratio, "model_max_length": training_args.model_max_length,
            "dtype": str(dtype)}


def resolve_ref_mode(training_args) -> str:
    """``--ref_model``, or its default: adapter_disabled with ``--lora_enable``, separate otherwise."""
    return training_args.ref_model or ("adapter_disabled" if training_args.lora_enable else "separate")


def _set_ref_mode(model_args, data_args, training_args) -> None:
    """Write :func:`resolve_ref_mode` into ``--ref_model``; refuses (ValueError) adapter_disabled
    without ``--lora_enable``."""
    training_args.ref_model = resolve_ref_mode(training_args)
    if training_args.ref_model == "adapter_disabled" and not training_args.lora_enable:
        raise ValueError("--ref_model adapter_disabled needs --lora_enable True; use --ref_model separate")


def build_dpo_trainer(argv: list[str], callbacks: list | None = None):
    """Everything of a DPO run before training, from command-line flags ``argv``: returns the
    :class:`~stllava.train.dpo_trainer.LlavaDPOTrainer` (model, reference, data and collator in
    place). ``callbacks``: extra ``TrainerCallback`` objects (tests, tools). :func:`run_dpo` trains it.

    Raises :class:`stllava.data.verify.BadDataError` (with the report) when pairs are bad and
    ``--on_bad_sample`` is ``stop``; ValueError for unsupported flag values.
    """
    from stllava.data.preference import DataCollatorForPreferenceDataset, build_preference_dataset
    from stllava.train.checkpoint import format_trainable_summary, trainable_summary
    from stllava.train.dpo_trainer import LlavaDPOTrainer

    model_args, data_args, training_args = prepare_run(argv, parse_dpo_args, check=_set_ref_mode)
    ref_mode = training_args.ref_model

    dtype = compute_dtype(training_args)
    source = {"start_model": model_args.model_name_or_path, "model_base": model_args.model_base}
    model_args.model_name_or_path = materialize_start_model(model_args.model_name_or_path, model_args.model_base,
                                                           training_args.output_dir, dtype)
    start_model = os.path.abspath(model_args.model_name_or_path)
    fingerprint = ref_cache_fingerprint(model_args, data_args, training_args, dtype, source)

    model, tokenizer, image_processor, image_tokens = load_model_for_training(model_args, data_args, training_args)
    def pairs(path: str):
        return build_preference_dataset(
            path, tokenizer, image_processor, image_folder=data_args.image_folder,
            version=model_args.version, image_aspect_ratio=data_args.image_aspect_ratio,
            on_bad_sample=data_args.on_bad_sample, model_max_length=training_args.model_max_length,
            image_tokens=image_tokens, verify_workers=data_args.verify_workers)

    dataset = pairs(data_args.data_path)
    eval_dataset = None
    if training_args.eval_data_path:
        if training_args.precompute_ref_log_probs:
            raise ValueError("--eval_data_path needs a live reference: drop --precompute_ref_log_probs")
        eval_dataset = pairs(training_args.eval_data_path)

    ref_model = None
    cache_path = training_args.ref_log_probs_path or os.path.join(training_args.output_dir, REF_CACHE_NAME)
    cached = training_args.precompute_ref_log_probs and read_ref_cache(cache_path, fingerprint, dataset.indices)
    if ref_mode == "separate" and not cached:
        if training_args.deepspeed:  # a second ZeRO-3-partitioned load; DeepSpeed shards it as the policy
            ref_model = load_model_for_training(model_args, data_args, training_args)[0]
        else:
            ref_model = copy.deepcopy(model)
    model = make_trainable(model, training_args)
    if training_args.deepspeed:
        cast_unpartitioned(model, dtype)
    logger.info("trainable parameters per part:\n%s", format_trainable_summary(trainable_summary(model)))

    collator = DataCollatorForPreferenceDataset(tokenizer.pad_token_id, training_args.model_max_length, image_tokens)
    trainer = LlavaDPOTrainer(model=model, ref_model=ref_model, args=training_args, train_dataset=dataset,
                              eval_dataset=eval_dataset,
                              data_collator=collator, processing_class=tokenizer, image_processor=image_processor,
                              ref_log_probs_fingerprint=fingerprint, start_model=start_model, callbacks=callbacks)
    return trainer


def train_and_save(trainer) -> str:
    """Train a :func:`build_dpo_trainer` trainer (resuming when ``--resume_from_checkpoint`` says so),
    save its state and the final checkpoint; returns the output folder."""
    training_args = trainer.args
    trainer.train(resume_from_checkpoint=resume_from_checkpoint(training_args))
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.save_metrics("eval", metrics)
        logger.info("held-out pairs: reward accuracy %.3f, margin %.3f",
                    metrics.get("eval_rewards/accuracies", float("nan")),
                    metrics.get("eval_rewards/margins", float("nan")))
    if trainer.train_dataset.mismatches:
        logger.warning("%d samples had tokenization mismatches (labels ignored) in this process",
                       trainer.train_dataset.mismatches)
    logger.info("stage-3 DPO finished; checkpoint in %s (load it with model_base %s)", training_args.output_dir,
                trainer.start_model)
    return training_args.output_dir


def run_dpo(argv: list[str], callbacks: list | None = None) -> str:
    """Run stage-3 DPO with command-line flags ``argv`` in this process (or as one rank of a
    launcher); returns the output folder. Raises as :func:`build_dpo_trainer`."""
    return train_and_save(build_dpo_trainer(argv, callbacks))


def main() -> None:
    run_dpo(sys.argv[1:])


if __name__ == "__main__":
    main()
