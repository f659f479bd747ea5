"""Stage 1: self-questioning SFT (SQ-LLaVA recipe on LLaVA-Med data), HF Trainer + DeepSpeed.

    python -m stllava.train.train_sft --model_name_or_path M --data_path F --image_folder D ...
    deepspeed stllava/train/train_sft.py --deepspeed scripts/zero3.json ...            (GPUs)
    python -m torch.distributed.run --nproc_per_node 2 stllava/train/train_sft.py ...  (CPU: gloo)

Takes the flags of the published ``sqllava_med.sh`` (``stllava.train.arguments``; ``--help`` lists
this project's flags first). The run:

1. checks the data (``stllava.data.verify``) and applies ``--on_bad_sample``, with the tokenizer
   and image-token count read from the configuration files, before any weight is loaded;
2. loads the model (``stllava.train.model_setup``): a full LLaVA folder, or a plain LLaMA folder +
   ``--vision_tower`` (``--bits 4|8``: the LLM through bitsandbytes); records ``conv_mode``
   (= ``--version``) in the config;
3. makes trainable LLM LoRA, ViT-LoRA and the projector (or what LLaVA's ``--tune_mm_mlp_adapter``
   / ``--freeze_backbone`` / ``--freeze_mm_mlp_adapter`` select), and logs a table of trainable
   parameters per part;
4. trains with :class:`~stllava.train.trainer.LLaVATrainer` and saves the checkpoint layout of
   ``stllava.train.checkpoint`` in every ``checkpoint-N/`` and in ``--output_dir``
   (``stllava.train.finish``).

On a machine without CUDA, ``--use_cpu`` is added and DeepSpeed uses the gloo backend
(``stllava.train.launch``). Bad data or flags print one ``error:`` line and exit 2.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("stllava.train.train_sft")

PROG = "python -m stllava.train.train_sft"


def build_parser():
    """The flags of this entry point (``stllava.train.arguments.SFT_ARGUMENTS``), as the parser it uses."""
    from stllava.train.arguments import SFT_ARGUMENTS, LlavaArgumentParser

    return LlavaArgumentParser(SFT_ARGUMENTS, PROG, __doc__.split("\n\n")[0])


def run_sft(argv: list[str], callbacks: list | None = None) -> str:
    """Run stage-1 SFT with command-line flags ``argv`` (``callbacks``: extra ``TrainerCallback``
    objects, for tests and tools); returns the output folder.

    Raises :class:`stllava.data.verify.BadDataError` (with the report) when the data has bad
    records and ``--on_bad_sample`` is ``stop`` — before any model weight is loaded;
    :class:`~stllava.train.arguments.FlagError` for unsupported flag values.
    """
    from stllava.data.collate import DataCollatorForSupervisedDataset
    from stllava.data.sft import build_sft_dataset
    from stllava.train.finish import train_and_save
    from stllava.train.launch import prepare_run
    from stllava.train.model_setup import load_model_for_training, load_processing, prepare_model
    from stllava.train.trainer import LLaVATrainer, length_image_tokens

    model_args, data_args, training_args = prepare_run(argv, build_parser().parse_args_into_dataclasses)
    training_args.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter  # the trainer saves mm_projector.bin then

    def dataset_for(tokenizer, image_processor, image_tokens):
        return build_sft_dataset(
            data_args.data_path, tokenizer, image_processor, image_folder=data_args.image_folder,
            version=model_args.version, sq_r=data_args.sq_r, seed=training_args.seed,
            image_aspect_ratio=data_args.image_aspect_ratio, on_bad_sample=data_args.on_bad_sample,
            model_max_length=training_args.model_max_length,
            image_tokens=length_image_tokens(training_args, image_tokens), verify_workers=data_args.verify_workers,
            data_vuser_turns=data_args.data_vuser_turns)

    processing = load_processing(model_args, data_args, training_args)
    dataset = dataset_for(*processing) if processing is not None else None  # the data check, before the weights
    model, tokenizer, image_processor, image_tokens = load_model_for_training(model_args, data_args, training_args,
                                                                              processing)
    model = prepare_model(model, training_args, model_args)
    if dataset is None:
        dataset = dataset_for(tokenizer, image_processor, image_tokens)
    collator = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, training_args.model_max_length,
                                                length_image_tokens(training_args, image_tokens))
    trainer = LLaVATrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                           processing_class=tokenizer, image_processor=image_processor, callbacks=callbacks)
    return train_and_save(trainer, "stage-1 SFT")


def main(argv: list[str] | None = None) -> int:
    """The command line: :func:`run_sft` under ``stllava.errors.run_cli``; returns the exit code."""
    from stllava.train.launch import run_entry_point

    return run_entry_point(run_sft, argv)


if __name__ == "__main__":
    sys.exit(main())
