"""The model of a training run, shared by the entry points (``train_sft``, ``train_dpo``).

1. :func:`load_model_for_training` loads ``--model_name_or_path``: a full LLaVA folder, or a plain
   LLaMA folder + ``--vision_tower`` (a tower and a new projector are attached;
   ``--pretrain_mm_mlp_adapter`` fills the projector). With a full folder, ``--vision_tower``
   reloads the tower weights and ``--pretrain_mm_mlp_adapter`` the projector, as the published
   scripts expect (:func:`attach_vision`). It records in the config what the checkpoints must carry: the
   data setup and the conversation template (``conv_mode`` = ``--version``, which the generating
   tools default to).
2. :func:`make_trainable` chooses the trainable parts by module path: LoRA on every LLM Linear
   except ``lm_head`` (``model.layers.N.(self_attn|mlp).*``), ViT-LoRA on the CLIP encoder (a
   nested PEFT model, attached before the LLM one, which therefore never wraps tower modules), the
   projector.
3. :func:`cast_unpartitioned` gives DeepSpeed one dtype across the model.

:func:`load_processing` reads what the data need (tokenizer, image processor, image tokens) from
configuration files alone, so the entry points check the data before loading any weights.
LLaVA's ``--bits 4|8`` (QLoRA) loads the LLM through bitsandbytes (:func:`kbit_quantization_config`)
and :func:`prepare_model` prepares it for k-bit training.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import warnings

import torch

from stllava.train.arguments import FlagError

logger = logging.getLogger(__name__)

# Modules --bits leaves unquantized, as module-path prefixes (transformers 5 matches a pattern from
# the start of a module's name or as its suffix, so a bare "mm_projector" would match nothing).
KBIT_SKIP_MODULES = ["model.mm_projector", "model.vision_tower", "lm_head"]

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
    """The dtype weights are loaded and trained in: bfloat16 with ``--bf16``, float16 with
    ``--fp16``, else float32."""
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def attach_vision(model, model_args, dtype: torch.dtype) -> None:
    """Give ``model`` its tower and projector (see the module docstring, step 1). Works under ZeRO-3.
    Refuses (:class:`~stllava.train.arguments.FlagError`) a model without a tower and no
    ``--vision_tower``, and a ``--mm_projector_type`` other than the model's projector."""
    from transformers import CLIPVisionModel

    from stllava.model.weights import load_projector_weights
    from stllava.train.checkpoint import load_state_dict_maybe_zero3, zero3_init_disabled

    inner = model.get_model()
    if inner.get_vision_tower() is None:
        if not model_args.vision_tower:
            raise FlagError(f"{model_args.model_name_or_path} has no vision tower: pass --vision_tower "
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
        raise FlagError(f"--mm_projector_type {model_args.mm_projector_type} but {model_args.model_name_or_path} "
                        f"has a {have!r} projector; pass --mm_projector_type {have}")
    if model_args.vision_tower:
        logger.info("loading vision tower weights from %s", model_args.vision_tower)
        with zero3_init_disabled():
            sd = CLIPVisionModel.from_pretrained(model_args.vision_tower).state_dict()
        load_state_dict_maybe_zero3(inner.vision_tower.clip, sd, f"vision tower weights of {model_args.vision_tower}")
        model.config.mm_vision_tower = model_args.vision_tower
    if model_args.pretrain_mm_mlp_adapter:
        logger.info("loading projector weights from %s", model_args.pretrain_mm_mlp_adapter)
        load_state_dict_maybe_zero3(inner.mm_projector, load_projector_weights(model_args.pretrain_mm_mlp_adapter),
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


def make_trainable(model, training_args, model_args=None):
    """Freeze, then attach ViT-LoRA (first; started from ``--pretrain_lora`` when given) and LLM
    LoRA, unfreeze the projector; returns the model to train (a PEFT model with ``--lora_enable``).

    LLaVA's flags (read with getattr, so any namespace works): ``--tune_mm_mlp_adapter`` (model_args)
    trains the projector alone; ``--freeze_backbone`` (model_args) freezes the LLM body, leaving
    ``lm_head`` trainable in full fine-tuning (with LoRA only the adapters train anyway);
    ``--freeze_mm_mlp_adapter`` (training_args) keeps the projector frozen. Raises
    :class:`~stllava.train.arguments.FlagError` when nothing is left to train."""
    tune_projector = getattr(model_args, "tune_mm_mlp_adapter", False)
    freeze_backbone = getattr(model_args, "freeze_backbone", False)
    tower = model.get_model().get_vision_tower()
    model.requires_grad_(False)
    if not (training_args.lora_enable or tune_projector):  # full fine-tuning of the LLM
        if freeze_backbone:  # LLaVA: model.model.requires_grad_(False); what lies outside it (lm_head) trains
            for name, p in model.named_parameters():
                p.requires_grad_(not name.startswith("model."))
        else:  # the tower's own weights stay frozen
            model.requires_grad_(True)
            tower.requires_grad_(False)
    elif freeze_backbone:
        logger.info("--freeze_backbone: the LLM is frozen anyway (only adapters / the projector train)")
    if training_args.vit_lora_enable:
        tower.enable_lora(training_args.lora_r_vit, training_args.lora_alpha_vit, training_args.lora_dropout_vit)
        if getattr(model_args, "pretrain_lora", None):
            tower.load_lora_weights(model_args.pretrain_lora)
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
    # (PEFT forwards get_model to the base model)
    model.get_model().mm_projector.requires_grad_(not getattr(training_args, "freeze_mm_mlp_adapter", False))
    if not any(p.requires_grad for p in model.parameters()):
        raise FlagError("nothing left to train: --freeze_mm_mlp_adapter froze the projector and no LoRA or LLM "
                        "weight trains; drop it or add --lora_enable True")
    return model


def cast_unpartitioned(model, dtype: torch.dtype) -> int:
    """Cast floating parameters that ZeRO-3 has not partitioned yet (LoRA weights, which peft
    keeps in float32, and modules built outside ``zero.Init``) to ``dtype``: DeepSpeed wants one
    dtype across the model and keeps its own float32 master copy of trainable weights.
    Partitioned parameters and integer buffers are left alone. Returns how many were cast."""
    from stllava.train.checkpoint import is_zero3_param

    cast = 0
    for p in model.parameters():
        if not is_zero3_param(p) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def kbit_quantization_config(training_args):
    """The ``BitsAndBytesConfig`` of ``--bits 4|8`` (LLaVA's: ``--double_quant``, ``--quant_type``,
    compute dtype from ``--bf16``/``--fp16``), or None for ``--bits 16``. Only the LLM's Linear
    layers are quantized: the tower, the projector and ``lm_head`` stay in the compute dtype (the
    same parts the inference loader keeps unquantized). Availability is checked first
    (:func:`stllava.train.arguments.check_kbit_training`)."""
    if training_args.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    from stllava.train.arguments import check_kbit_training

    check_kbit_training(training_args)
    return BitsAndBytesConfig(load_in_4bit=training_args.bits == 4, load_in_8bit=training_args.bits == 8,
                              llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
                              llm_int8_skip_modules=KBIT_SKIP_MODULES,
                              bnb_4bit_compute_dtype=compute_dtype(training_args),
                              bnb_4bit_use_double_quant=training_args.double_quant,
                              bnb_4bit_quant_type=training_args.quant_type)


def load_processing(model_args, data_args, training_args):
    """What the data need, from configuration files only (no weights): ``(tokenizer,
    image_processor, image_tokens)``, so the data check can run before the model loads. The tower
    is the model's (its ``mm_vision_config``) or, for a plain LLaMA folder, ``--vision_tower``'s.
    Returns None when ``--model_name_or_path`` is not a local folder (a hub id): then
    :func:`load_model_for_training` derives them from the loaded model."""
    import os

    from transformers import CLIPVisionConfig

    from stllava.model.builder import load_image_processor, load_tokenizer
    from stllava.model.llava_llama import load_llava_config
    from stllava.model.vision_tower import count_image_tokens

    if not os.path.isdir(model_args.model_name_or_path):
        return None
    cfg = load_llava_config(model_args.model_name_or_path)
    if getattr(cfg, "mm_vision_tower", None):
        vision = getattr(cfg, "mm_vision_config", None) or CLIPVisionConfig.from_pretrained(cfg.mm_vision_tower)
        feature = getattr(cfg, "mm_vision_select_feature", "patch")
    elif model_args.vision_tower:
        vision, feature = CLIPVisionConfig.from_pretrained(model_args.vision_tower), model_args.mm_vision_select_feature
    else:
        raise FlagError(f"{model_args.model_name_or_path} has no vision tower: pass --vision_tower "
                        "(a CLIP folder or hub id) to attach one")
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.model_max_length, training=True)
    image_processor = load_image_processor(model_args.vision_tower or model_args.model_name_or_path, cfg)
    return tokenizer, image_processor, count_image_tokens(vision, feature)


def load_model_for_training(model_args, data_args, training_args, processing=None):
    """Load the model to train and set it up for the data: ``from_pretrained`` of
    ``--model_name_or_path`` (ZeRO-3-partitioned under an active DeepSpeed config; through
    bitsandbytes with ``--bits 4|8``, :func:`kbit_quantization_config`), :func:`attach_vision`, the
    config fields every checkpoint records (``conv_mode`` = ``--version`` among them), the
    tokenizer and the image processor (``processing``: :func:`load_processing`'s, reused; the
    model's tower must then give as many image tokens). Trainable parts are not chosen here
    (:func:`make_trainable`). Returns ``(model, tokenizer, image_processor, image_tokens)``."""
    from stllava.model import LlavaLlamaForCausalLM
    from stllava.model.builder import load_image_processor, load_tokenizer

    dtype = compute_dtype(training_args)
    attn = attn_implementation(model_args.attn_implementation)
    quant = kbit_quantization_config(training_args)
    kw = {"quantization_config": quant, "device_map": {"": training_args.device}} if quant is not None else {}
    logger.info("loading %s (dtype %s, attention %s%s)", model_args.model_name_or_path, dtype, attn,
                f", {training_args.bits}-bit LLM" if quant is not None else "")
    model = LlavaLlamaForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype, attn_implementation=attn,
                                                  **kw)
    model.config.use_cache = False
    if training_args.deepspeed:
        from transformers.integrations import is_deepspeed_zero3_enabled

        from stllava.train.checkpoint import is_zero3_param

        logger.info("DeepSpeed ZeRO-3: %s; parameters partitioned at load: %s", is_deepspeed_zero3_enabled(),
                    any(is_zero3_param(p) for p in model.parameters()))

    attach_vision(model, model_args, dtype)
    cfg = model.config
    cfg.image_aspect_ratio = data_args.image_aspect_ratio
    cfg.mm_use_im_start_end = model_args.mm_use_im_start_end
    cfg.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    cfg.mm_projector_lr = training_args.mm_projector_lr
    cfg.tokenizer_model_max_length = training_args.model_max_length
    cfg.tokenizer_padding_side = "right"
    cfg.conv_mode = model_args.version  # the template this model learns: the tools' default
    image_tokens = model.get_model().get_vision_tower().num_patches
    if processing is not None:
        tokenizer, image_processor, expected = processing
        if expected != image_tokens:  # the data were checked with the configs' count: they must agree
            raise RuntimeError(f"the configuration promised {expected} image tokens but the model's tower gives "
                               f"{image_tokens}")
    else:
        tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.model_max_length, training=True)
        image_processor = load_image_processor(model_args.vision_tower or model_args.model_name_or_path, cfg)
    return model, tokenizer, image_processor, image_tokens


def prepare_model(model, training_args, model_args=None):
    """Prepare a ``--bits 4|8`` model for k-bit training (peft's ``prepare_model_for_kbit_training``:
    fp32 norms and head, inputs that carry gradients; the tower and projector return to the compute
    dtype, as in LLaVA), then :func:`make_trainable` (``model_args``: LLaVA's trainable-part flags),
    then :func:`cast_unpartitioned` under DeepSpeed; records LLaVA's ``tune_mm_mlp_adapter`` /
    ``freeze_mm_mlp_adapter`` in the config, logs the trainable parameters per part and returns the
    model to train."""
    from stllava.train.checkpoint import format_trainable_summary, trainable_summary

    if getattr(training_args, "bits", 16) in (4, 8):
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing stays the Trainer's (--gradient_checkpointing), as without --bits.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        dtype = compute_dtype(training_args)
        model.get_model().get_vision_tower().to(dtype=dtype)
        model.get_model().mm_projector.to(dtype=dtype)
    model.config.tune_mm_mlp_adapter = bool(getattr(model_args, "tune_mm_mlp_adapter", False))
    model.config.freeze_mm_mlp_adapter = bool(getattr(training_args, "freeze_mm_mlp_adapter", False))
    model = make_trainable(model, training_args, model_args)
    if training_args.deepspeed:
        cast_unpartitioned(model, compute_dtype(training_args))
    logger.info("trainable parameters per part:\n%s", format_trainable_summary(trainable_summary(model)))
    return model
