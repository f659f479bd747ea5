"""Stage 1: self-questioning SFT (SQ-LLaVA recipe on LLaVA-Med data), HF Trainer + DeepSpeed.

    python -m stllava.train.train_sft --model_name_or_path M --data_path F --image_folder D ...
    deepspeed stllava/train/train_sft.py --deepspeed scripts/zero3.json ...            (GPUs)
    python -m torch.distributed.run --nproc_per_node 2 stllava/train/train_sft.py ...  (CPU: gloo)

Takes the flags of the published ``sqllava_med.sh`` (``stllava.train.arguments``). The run:

1. loads the model: a full LLaVA folder, or a plain LLaMA folder + ``--vision_tower`` (a tower
   and a new projector are attached; ``--pretrain_mm_mlp_adapter`` fills the projector). With a
   full folder, ``--vision_tower`` reloads the tower weights and ``--pretrain_mm_mlp_adapter`` the
   projector, as the reference does;
2. makes trainable, selected by module path: LoRA on every LLM Linear except ``lm_head``
   (``model.layers.N.(self_attn|mlp).*``), ViT-LoRA on the CLIP encoder (a nested PEFT model,
   attached before the LLM one, which therefore never wraps tower modules), the projector; logs
   a table of trainable parameters per part;
3. checks the data (``stllava.data.verify``) and applies ``--on_bad_sample``;
4. trains with :class:`~stllava.train.trainer.LLaVATrainer` and saves the checkpoint layout of
   ``stllava.train.checkpoint`` in every ``checkpoint-N/`` and in ``--output_dir``.

On a machine without CUDA, ``--use_cpu`` is added and DeepSpeed uses the gloo backend
(``stllava.train.launch``, the start-up shared with ``train_dpo``).
"""
from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings

import torch
import transformers

logger = logging.getLogger("stllava.train.train_sft")

# LoRA targets of the LLM, by module path (vision tower and projector live elsewhere; lm_head excluded).
LLM_LORA_TARGETS = r"model\.layers\.\d+\.(self_attn|mlp)\.[A-Za-z0-9_]+_proj"


def attn_implementation(requested: str | None) -> str:
    """``requested``, else flash_attention_2 when flash-attn is importable and CUDA is present, else sdpa."""
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def compute_dtype(training_args) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def load_tokenizer(path: str, model_max_length: int):
    """The model's slow LLaMA tokenizer, right padding, pad = unk (LLaVA's v1 setup)."""
    tok = transformers.LlamaTokenizer.from_pretrained(path, model_max_length=model_max_length, padding_side="right")
    tok.pad_token = tok.unk_token
    return tok


def _projector_weights(path: str) -> dict[str, torch.Tensor]:
    from stllava.model.weights import load_state_dict_file

    sd = load_state_dict_file(path)
    sd = {k.split("mm_projector.", 1)[1]: v for k, v in sd.items() if "mm_projector." in k}
    if not sd:
        raise ValueError(f"--pretrain_mm_mlp_adapter {path} holds no '*mm_projector.*' weights")
    return sd


def attach_vision(model, model_args, dtype: torch.dtype) -> None:
    """Give ``model`` its tower and projector (see the module docstring, step 1). Works under ZeRO-3."""
    from transformers import CLIPVisionModel

    from stllava.train.checkpoint import load_state_dict_maybe_zero3, zero3_init_disabled

    inner = model.get_model()
    if inner.get_vision_tower() is None:
        if not model_args.vision_tower:
            raise ValueError(f"{model_args.model_name_or_path} has no vision tower: pass --vision_tower "
                             "(a CLIP folder or hub id) to attach one")
        logger.info("attaching vision tower %s and a new %s projector", model_args.vision_tower,
                    model_args.mm_projector_type)
        # Built unpartitioned: DeepSpeed converts (and broadcasts) these parameters at engine start.
        with zero3_init_disabled():
            inner.initialize_vision_modules(
                model_args.vision_tower, select_layer=model_args.mm_vision_select_layer,
                select_feature=model_args.mm_vision_select_feature, projector_type=model_args.mm_projector_type,
                pretrain_mm_mlp_adapter=model_args.pretrain_mm_mlp_adapter)
        inner.vision_tower.to(dtype=dtype)
        inner.mm_projector.to(dtype=dtype)
        return
    have = getattr(model.config, "mm_projector_type", None)
    if model_args.mm_projector_type and have and model_args.mm_projector_type != have:
        raise ValueError(f"--mm_projector_type {model_args.mm_projector_type} but {model_args.model_name_or_path} "
                         f"has a {have!r} projector; pass --mm_projector_type {have}")
    if model_args.vision_tower:
        logger.info("loading vision tower weights from %s", model_args.vision_tower)
        with zero3_init_disabled():
            sd = CLIPVisionModel.from_pretrained(model_args.vision_tower).state_dict()
        load_state_dict_maybe_zero3(inner.vision_tower.clip, sd, f"vision tower weights of {model_args.vision_tower}")
        model.config.mm_vision_tower = model_args.vision_tower
    if model_args.pretrain_mm_mlp_adapter:
        logger.info("loading projector weights from %s", model_args.pretrain_mm_mlp_adapter)
        load_state_dict_maybe_zero3(inner.mm_projector, _projector_weights(model_args.pretrain_mm_mlp_adapter),
                                    f"projector weights of {model_args.pretrain_mm_mlp_adapter}")


def llm_lora_target_names(model) -> list[str]:
    """Names of the Linear modules LLM LoRA wraps: every ``nn.Linear`` matching
    :data:`LLM_LORA_TARGETS`. Raises when a Linear of the LLM would be missed or a tower /
    projector module matched (the regex and the model disagree)."""
    pat = re.compile(LLM_LORA_TARGETS)
    chosen, missed = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        in_llm = not any(k in name for k in ("vision_tower", "mm_projector")) and name != "lm_head"
        if pat.fullmatch(name):
            if not in_llm:
                raise AssertionError(f"LoRA target pattern matched {name}, outside the LLM")
            chosen.append(name)
        elif in_llm:
            missed.append(name)
    if missed:
        raise ValueError(f"LLM Linear layers outside the LoRA pattern {LLM_LORA_TARGETS!r}: {missed[:5]}")
    if not chosen:
        raise ValueError("no LLM Linear layer matches the LoRA pattern; is this a LLaMA model?")
    return chosen


def make_trainable(model, training_args):
    """Freeze, then attach ViT-LoRA (first) and LLM LoRA, unfreeze the projector; returns the model
    to train (a PEFT model with ``--lora_enable``)."""
    tower = model.get_model().get_vision_tower()
    if training_args.lora_enable:
        model.requires_grad_(False)
    else:  # full fine-tuning of the LLM; the tower's own weights stay frozen
        model.requires_grad_(True)
        tower.requires_grad_(False)
    if training_args.vit_lora_enable:
        tower.enable_lora(training_args.lora_r_vit, training_args.lora_alpha_vit, training_args.lora_dropout_vit)
    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model

        targets = llm_lora_target_names(model)
        logger.info("LLM LoRA on %d Linear layers (%s ...)", len(targets), ", ".join(targets[:3]))
        cfg = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha, target_modules=LLM_LORA_TARGETS,
                         lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias, task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # The nested ViT-LoRA PEFT model makes peft warn about "a second time"; the pattern
            # above keeps the two apart.
            warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
            model = get_peft_model(model, cfg)
    model.get_model().mm_projector.requires_grad_(True)  # (PEFT forwards get_model to the base model)
    return model


def cast_unpartitioned(model, dtype: torch.dtype) -> None:
    """Cast floating parameters that ZeRO-3 has not partitioned yet (LoRA weights, which peft
    keeps in float32, and modules built outside ``zero.Init``) to ``dtype``: DeepSpeed wants one
    dtype across the model and keeps its own float32 master copy of trainable weights."""
    from stllava.train.checkpoint import is_zero3_param

    for p in model.parameters():
        if not is_zero3_param(p) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def load_model_for_training(model_args, data_args, training_args):
    """Load the model to train and set it up for the data: ``from_pretrained`` of
    ``--model_name_or_path`` (ZeRO-3-partitioned under an active DeepSpeed config),
    :func:`attach_vision`, the config fields the checkpoints record, the tokenizer and the image
    processor. Shared by SFT and DPO (``stllava.train.train_dpo``); trainable parts are not chosen
    here (:func:`make_trainable`). Returns ``(model, tokenizer, image_processor, image_tokens)``."""
    from stllava.model import LlavaLlamaForCausalLM
    from stllava.model.builder import load_image_processor

    dtype = compute_dtype(training_args)
    attn = attn_implementation(model_args.attn_implementation)
    logger.info("loading %s (dtype %s, attention %s)", model_args.model_name_or_path, dtype, attn)
    model = LlavaLlamaForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    if training_args.deepspeed:
        from transformers.integrations import is_deepspeed_zero3_enabled

        from stllava.train.checkpoint import is_zero3_param

        logger.info("DeepSpeed ZeRO-3: %s; parameters partitioned at load: %s", is_deepspeed_zero3_enabled(),
                    any(is_zero3_param(p) for p in model.parameters()))
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.model_max_length)

    attach_vision(model, model_args, dtype)
    cfg = model.config
    cfg.image_aspect_ratio = data_args.image_aspect_ratio
    cfg.mm_use_im_start_end = model_args.mm_use_im_start_end
    cfg.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    cfg.mm_projector_lr = training_args.mm_projector_lr
    cfg.tokenizer_model_max_length = training_args.model_max_length
    cfg.tokenizer_padding_side = "right"
    processor_src = model_args.vision_tower or model_args.model_name_or_path
    image_processor = load_image_processor(processor_src, cfg)
    image_tokens = model.get_model().get_vision_tower().num_patches
    return model, tokenizer, image_processor, image_tokens


def run_sft(argv: list[str]) -> str:
    """Run stage-1 SFT with command-line flags ``argv``; returns the output folder.

    Raises :class:`stllava.data.verify.BadDataError` (with the report) when the data has bad
    records and ``--on_bad_sample`` is ``stop``; ValueError for unsupported flag values.
    """
    from stllava.data.collate import DataCollatorForSupervisedDataset
    from stllava.data.sft import build_sft_dataset
    from stllava.train.arguments import parse_args
    from stllava.train.checkpoint import format_trainable_summary, trainable_summary
    from stllava.train.launch import prepare_run, resume_from_checkpoint
    from stllava.train.trainer import LLaVATrainer

    model_args, data_args, training_args = prepare_run(argv, parse_args)

    dtype = compute_dtype(training_args)
    model, tokenizer, image_processor, image_tokens = load_model_for_training(model_args, data_args, training_args)

    model = make_trainable(model, training_args)
    if training_args.deepspeed:
        cast_unpartitioned(model, dtype)
    logger.info("trainable parameters per part:\n%s", format_trainable_summary(trainable_summary(model)))

    dataset = build_sft_dataset(
        data_args.data_path, tokenizer, image_processor, image_folder=data_args.image_folder,
        version=model_args.version, sq_r=data_args.sq_r, seed=training_args.seed,
        image_aspect_ratio=data_args.image_aspect_ratio, on_bad_sample=data_args.on_bad_sample,
        model_max_length=training_args.model_max_length, image_tokens=image_tokens,
        verify_workers=data_args.verify_workers)
    collator = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, training_args.model_max_length, image_tokens)
    trainer = LLaVATrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                           processing_class=tokenizer, image_processor=image_processor)

    trainer.train(resume_from_checkpoint=resume_from_checkpoint(training_args))
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if dataset.mismatches:
        logger.warning("%d samples had tokenization mismatches (labels ignored) in this process", dataset.mismatches)
    logger.info("stage-1 SFT finished; checkpoint in %s", training_args.output_dir)
    return training_args.output_dir


def main() -> None:
    run_sft(sys.argv[1:])


if __name__ == "__main__":
    main()
