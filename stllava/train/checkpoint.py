"""What a training checkpoint holds, how it is gathered under ZeRO-3, and how it is read back.

A checkpoint folder (every ``checkpoint-N/`` and the final ``output_dir``) is usable on its own:

    adapter_config.json, adapter_model.safetensors   LLM LoRA (PEFT), no vision-tower keys
    non_lora_trainables.bin                          trainable non-LoRA weights (the projector),
                                                     keys ``base_model.model.model.mm_projector.*``
    Vit-lora/                                        PEFT adapter folder of the CLIP tower
    config.json                                      the LLaVA config (model_type ``llava_llama``)
    tokenizer files, preprocessor_config.json

(without ``--lora_enable``, the full model weights replace the first three lines' LLM parts).
Under ZeRO-3 every parameter is sharded; :func:`gather_state_dict` gathers the trainable ones with
``deepspeed.zero.GatheredParameters`` (all ranks must call it; rank 0 writes). The parameter
names decide which part a weight belongs to (:func:`param_part`), so the optimizer groups, the
trainable summary and the saved files all agree.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable

import torch
from torch import nn

from stllava.model.checkpoint_layouts import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, CONFIG, NON_LORA, VIT_LORA_DIR
from stllava.model.checkpoint_layouts import PROJECTOR as MM_PROJECTOR

logger = logging.getLogger(__name__)


# Parts of the model, by parameter name.
LLM, LLM_LORA, PROJECTOR, VISION, VIT_LORA = "llm", "llm_lora", "projector", "vision_tower", "vit_lora"
PART_LABELS = {LLM_LORA: "LLM LoRA", PROJECTOR: "projector", VIT_LORA: "ViT-LoRA", LLM: "LLM (full)",
               VISION: "vision tower (full)"}


def param_part(name: str) -> str:
    """Which part parameter ``name`` (any wrapping: plain, PEFT, nested PEFT) belongs to."""
    if "mm_projector" in name:
        return PROJECTOR
    if "vision_tower" in name:
        return VIT_LORA if "lora_" in name else VISION
    return LLM_LORA if "lora_" in name else LLM


def numel(p: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "frozen": n}}`` parameter counts per part (see :func:`param_part`)."""
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        d = out.setdefault(param_part(name), {"trainable": 0, "frozen": 0})
        d["trainable" if p.requires_grad else "frozen"] += numel(p)
    return out


def format_trainable_summary(summary: dict[str, dict[str, int]]) -> str:
    """A small table: trainable parameters per part, then frozen, then totals."""
    lines = [f"{'part':<22}{'trainable':>15}{'frozen':>16}"]
    for part in (LLM_LORA, PROJECTOR, VIT_LORA, LLM, VISION):
        if part in summary:
            d = summary[part]
            lines.append(f"{PART_LABELS[part]:<22}{d['trainable']:>15,}{d['frozen']:>16,}")
    tt = sum(d["trainable"] for d in summary.values())
    tf = sum(d["frozen"] for d in summary.values())
    lines.append(f"{'total':<22}{tt:>15,}{tf:>16,}  ({100.0 * tt / max(1, tt + tf):.3f}% trainable)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# ZeRO-3 gathering

def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gather_state_dict(named_params: Iterable[tuple[str, torch.Tensor]], chunk: int = 64) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``named_params``. ZeRO-3 partitioned ones are gathered with
    ``deepspeed.zero.GatheredParameters`` ``chunk`` tensors at a time (bounded memory): every rank
    must call this with the same list. Returns the dict on every rank."""
    named = list(named_params)
    out: dict[str, torch.Tensor] = {}
    zero = [(n, p) for n, p in named if is_zero3_param(p)]
    for n, p in named:
        if not is_zero3_param(p):
            out[n] = p.detach().cpu().clone()
    if zero:
        import deepspeed

        for k in range(0, len(zero), chunk):
            part = zero[k:k + chunk]
            with deepspeed.zero.GatheredParameters([p for _, p in part]):
                for n, p in part:
                    out[n] = p.data.detach().cpu().clone()
    return {n: out[n] for n, _ in named}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered trainable parameters of ``model``, keyed as ``model.named_parameters()`` names them."""
    return gather_state_dict([(n, p) for n, p in model.named_parameters() if p.requires_grad])


@contextlib.contextmanager
def zero3_init_disabled():
    """Build modules unpartitioned even while a ZeRO-3 ``HfDeepSpeedConfig`` is active (HF's
    ``from_pretrained`` would otherwise partition them at construction). DeepSpeed converts such
    parameters when the engine starts, broadcasting rank 0's values."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def load_state_dict_maybe_zero3(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "weights") -> None:
    """``module.load_state_dict(state_dict, strict=True)``, also when ``module`` is ZeRO-3
    partitioned (gathered, modified on rank 0, re-partitioned). Every rank must call it."""
    params = [p for p in module.parameters() if is_zero3_param(p)]
    if not params:
        _strict_load(module, state_dict, what)
        return
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if rank == 0:
            _strict_load(module, state_dict, what)


def _strict_load(module: nn.Module, state_dict: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what} do not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------------------------------------
# Saving

def _inner_peft_prefix(model: nn.Module, inner: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is inner:
            return name + "."
    raise ValueError("the ViT-LoRA PEFT model is not a submodule of the model being saved")


def _vision_tower(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_model().get_vision_tower() if hasattr(base, "get_model") else None


def save_bytes(model: nn.Module, projector_only: bool = False) -> int:
    """Bytes of the weights a save of ``model`` writes: its trainable parameters with LoRA (PEFT)
    or ``projector_only``, all of them for full fine-tuning (full sizes also under ZeRO-3)."""
    partial = projector_only or hasattr(model, "peft_config")
    return sum(numel(p) * p.element_size() for p in model.parameters() if p.requires_grad or not partial)


def split_trainable_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a trainable state dict into ``{"llm_lora", "vit_lora", "non_lora"}`` by parameter name."""
    out = {"llm_lora": {}, "vit_lora": {}, "non_lora": {}}
    for k, v in state.items():
        part = param_part(k)
        out["vit_lora" if part == VIT_LORA else "llm_lora" if part == LLM_LORA else "non_lora"][k] = v
    return out


def save_llava_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], output_dir: str, *, tokenizer=None,
                          image_processor=None, config_updates: dict | None = None) -> list[str]:
    """Write the checkpoint files (see the module docstring) from the gathered trainable ``state``.

    ``model`` is the PEFT-wrapped model (or the plain one for full fine-tuning, in which case
    ``state`` must be the full state dict). Call on the main process only; returns the written paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    written = []
    parts = split_trainable_state(state)
    is_peft = hasattr(model, "peft_config")
    base = model.get_base_model() if is_peft else model
    tower = _vision_tower(model)

    if is_peft:
        # save_embedding_layers=False: "auto" reloads the base config only to compare vocab sizes.
        model.save_pretrained(output_dir, state_dict=parts["llm_lora"], safe_serialization=True,
                              save_embedding_layers=False)
        written += [ADAPTER_CONFIG, ADAPTER_SAFETENSORS]
        torch.save(parts["non_lora"], os.path.join(output_dir, NON_LORA))
        written.append(NON_LORA)
    else:
        full = {k: v for k, v in state.items() if param_part(k) != VIT_LORA}
        if tower is not None and getattr(tower, "lora_enabled", False):
            # Undo the PEFT wrapping of the tower in the key names: the file then loads into the
            # plain model, and the adapter goes to Vit-lora/.
            full = {k.replace("vision_tower.vision_tower.base_model.model.", "vision_tower.vision_tower.")
                    .replace(".base_layer.", "."): v for k, v in full.items()}
        base.save_pretrained(output_dir, state_dict=full, safe_serialization=True)
        written.append("model.safetensors")

    if tower is not None and getattr(tower, "lora_enabled", False):
        prefix = _inner_peft_prefix(model, tower.vision_tower)
        vit = {k[len(prefix):]: v for k, v in parts["vit_lora"].items() if k.startswith(prefix)}
        if len(vit) != len(parts["vit_lora"]):
            raise ValueError(f"ViT-LoRA weights outside {prefix!r}: "
                             f"{[k for k in parts['vit_lora'] if not k.startswith(prefix)][:3]}")
        vit_dir = os.path.join(output_dir, VIT_LORA_DIR)
        for cfg in tower.vision_tower.peft_config.values():  # a tower built from config has no name
            cfg.base_model_name_or_path = cfg.base_model_name_or_path or tower.vision_tower_name
        tower.vision_tower.save_pretrained(vit_dir, state_dict=vit, safe_serialization=True,
                                           save_embedding_layers=False)
        written.append(VIT_LORA_DIR + "/")

    written += _save_config_and_processors(base, output_dir, tokenizer, image_processor, config_updates)
    logger.info("saved %s to %s (%d LLM LoRA, %d ViT-LoRA, %d other tensors)", ", ".join(written),
                output_dir, len(parts["llm_lora"]), len(parts["vit_lora"]), len(parts["non_lora"]))
    return written


def _save_config_and_processors(base: nn.Module, output_dir: str, tokenizer, image_processor,
                                config_updates: dict | None) -> list[str]:
    """Write ``config.json`` (with ``config_updates``, ``use_cache`` on), the tokenizer and the image
    processor; returns what was written."""
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.use_cache = True
    config.architectures = [type(base).__name__]
    for k, v in (config_updates or {}).items():
        setattr(config, k, v)
    config.save_pretrained(output_dir)
    written = [CONFIG]
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
        written.append("tokenizer")
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
        written.append("preprocessor_config.json")
    return written


def save_projector_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], output_dir: str, *, tokenizer=None,
                              image_processor=None, config_updates: dict | None = None) -> list[str]:
    """Projector pretraining (LLaVA's ``--tune_mm_mlp_adapter``): write ``mm_projector.bin`` (the
    gathered projector weights of ``state``, keys ``model.mm_projector.*``: the file
    ``--pretrain_mm_mlp_adapter`` reads), ``config.json``, tokenizer and image processor. Refuses
    (ValueError) a ``state`` holding anything but projector weights. Call on the main process only;
    returns the written paths. (LLaVA wrote its intermediate ones to ``mm_projector/checkpoint-N.bin``;
    here every ``checkpoint-N/`` is a complete projector-only folder.)"""
    other = [k for k in state if param_part(k) != PROJECTOR]
    if other or not state:
        raise ValueError(f"projector-only checkpoint: the trainable weights are not the projector's ({other[:3]})")
    os.makedirs(output_dir, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, os.path.join(output_dir, MM_PROJECTOR))
    written = [MM_PROJECTOR] + _save_config_and_processors(model, output_dir, tokenizer, image_processor,
                                                           config_updates)
    logger.info("saved %s to %s (%d projector tensors)", ", ".join(written), output_dir, len(state))
    return written


# ---------------------------------------------------------------------------------------------
# Loading (resume without DeepSpeed; DeepSpeed restores its own shards)

def load_projector_checkpoint(model: nn.Module, ckpt_dir: str) -> int:
    """Load ``ckpt_dir/mm_projector.bin`` into ``model``'s projector (resume of a projector-only
    run); returns the number of tensors. Raises ValueError naming the file when it is missing or
    does not fit."""
    from stllava.model.weights import load_projector_weights

    f = os.path.join(ckpt_dir, MM_PROJECTOR)
    if not os.path.isfile(f):
        raise ValueError(f"{ckpt_dir} holds no {MM_PROJECTOR}; it is not a checkpoint of a --tune_mm_mlp_adapter run")
    sd = load_projector_weights(f)
    _strict_load(model.get_model().mm_projector, sd, f"projector weights of {f}")
    return len(sd)

def load_llava_trainables(model: nn.Module, ckpt_dir: str) -> dict[str, int]:
    """Load a checkpoint's LLM LoRA, ``non_lora_trainables.bin`` and ``Vit-lora/`` into ``model``
    (already wrapped the same way) in place. Returns tensor counts per file; raises ValueError
    naming the file when a file is missing or its keys do not fit the model."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from stllava.model.weights import load_state_dict_file

    counts = {}
    if hasattr(model, "peft_config"):
        f = os.path.join(ckpt_dir, ADAPTER_SAFETENSORS)
        if not os.path.isfile(f):
            raise ValueError(f"{ckpt_dir} holds no {ADAPTER_SAFETENSORS}; it is not a LoRA checkpoint of this run")
        res = set_peft_model_state_dict(model, load_file(f))
        if res.unexpected_keys:
            raise ValueError(f"{f}: keys not in the model: {res.unexpected_keys[:5]}")
        counts[ADAPTER_SAFETENSORS] = len(load_file(f))
        f = os.path.join(ckpt_dir, NON_LORA)
        if os.path.isfile(f):
            sd = load_state_dict_file(f)
            params = dict(model.named_parameters())
            unknown = [k for k in sd if k not in params]
            if unknown:
                raise ValueError(f"{f}: keys not in the model: {unknown[:5]}")
            with torch.no_grad():
                for k, v in sd.items():
                    params[k].copy_(v)
            counts[NON_LORA] = len(sd)
    tower = _vision_tower(model)
    if tower is not None and getattr(tower, "lora_enabled", False):
        f = os.path.join(ckpt_dir, VIT_LORA_DIR, ADAPTER_SAFETENSORS)
        if not os.path.isfile(f):
            raise ValueError(f"{ckpt_dir} holds no {VIT_LORA_DIR}/{ADAPTER_SAFETENSORS} but ViT-LoRA is enabled")
        sd = load_file(f)
        res = set_peft_model_state_dict(tower.vision_tower, sd)
        if res.unexpected_keys:
            raise ValueError(f"{f}: keys not in the vision tower: {res.unexpected_keys[:5]}")
        counts[VIT_LORA_DIR] = len(sd)
    logger.info("restored trainable weights from %s: %s", ckpt_dir, counts)
    return counts
