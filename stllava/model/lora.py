"""LoRA merging, written once: wrap a module with a LoRA state dict (peft does the arithmetic; we
only pick the modules and rename the keys), load it, merge it.

The builder (:mod:`stllava.model.builder`) uses it to load the LoRA layouts; a checkpoint folder
merged into one full folder is :mod:`stllava.model.merge`.
"""
from __future__ import annotations

import logging
import re
import warnings

import torch

from stllava.model import checkpoint_layouts as cl

logger = logging.getLogger(__name__)


def _lora_config(state: dict, hyper: dict, source: str, keep_scaling: bool = False):
    """A peft ``LoraConfig`` targeting exactly the modules of ``state``. The rank comes from the
    tensors; with ``keep_scaling`` a rank that differs from ``hyper['r']`` keeps alpha / r."""
    from peft import LoraConfig

    modules = cl.lora_modules(state)
    ranks = set(cl.lora_ranks(state).values())
    r, alpha = hyper["r"], hyper["lora_alpha"]
    if len(ranks) > 1 and not hyper["rank_pattern"]:
        raise ValueError(f"{source}: LoRA weights have several ranks {sorted(ranks)} but the adapter config has "
                         "no rank_pattern saying which module has which")
    if len(ranks) == 1 and ranks != {r}:
        if not (keep_scaling or hyper["rank_pattern"]):
            raise ValueError(f"{source}: LoRA weights have rank {ranks.pop()} but the adapter config says r={r}")
        if keep_scaling:
            (new_r,) = ranks
            alpha, r = alpha * new_r / r, new_r
    target = "(" + "|".join(re.escape(m) for m in modules) + ")"  # exact module paths, nothing else
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, bias="none",
                      use_rslora=hyper["use_rslora"], use_dora=hyper["use_dora"],
                      fan_in_fan_out=hyper["fan_in_fan_out"], rank_pattern=hyper["rank_pattern"],
                      alpha_pattern=hyper["alpha_pattern"])


def merge_lora(module: torch.nn.Module, state: dict, hyper: dict, source: str, keep_scaling: bool = False):
    """Wrap ``module`` with the LoRA of ``state`` (keys as in a PEFT model around ``module``),
    load it, merge it and return the plain merged module. Raises ValueError naming ``source``
    when a tensor of ``state`` has no place in the module or a LoRA weight is left unloaded."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    cfg = _lora_config(state, hyper, source, keep_scaling)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(second time|already).*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(module, cfg)
    res = set_peft_model_state_dict(peft_model, state)
    if res.unexpected_keys:
        raise ValueError(f"{source}: {len(res.unexpected_keys)} tensors do not fit the model "
                         f"({list(res.unexpected_keys)[:4]})")
    lora_names = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    missing = sorted(lora_names & set(res.missing_keys))
    if missing:
        raise ValueError(f"{source}: LoRA weights missing for {missing[:4]}")
    logger.info("merging %d LoRA tensors of %s into %d modules", len(state), source, len(cl.lora_modules(state)))
    return peft_model.merge_and_unload()


def merge_vit_lora(model, state: dict, hyper: dict, source: str, keep_scaling: bool = False) -> None:
    """Merge a ViT-LoRA (keys as :func:`~stllava.model.checkpoint_layouts.vit_lora_key` makes them)
    into ``model``'s CLIP tower, in place. Refuses a model without a tower (ValueError)."""
    tower = model.get_model().get_vision_tower()
    if tower is None:
        raise ValueError(f"{source}: a ViT-LoRA was given but the model has no vision tower")
    tower.vision_tower = merge_lora(tower.clip, state, hyper, source, keep_scaling)
    tower.lora_enabled = False


def read_vit_lora(adapter_dir: str) -> tuple[dict, dict]:
    """``(hyper, state)`` of a ``Vit-lora/`` folder, keys mapped to transformers 5's CLIP.
    Refuses tensors that are not LoRA weights (ValueError)."""
    weights = cl.check_adapter_folder(adapter_dir, "vit_lora")
    raw = cl.load_weights(weights)
    state = {cl.vit_lora_key(k): v for k, v in raw.items() if cl.is_lora_key(k)}
    other = [k for k in raw if not cl.is_lora_key(k)]
    if other:
        raise ValueError(f"{weights}: {len(other)} tensors are not LoRA weights ({other[:4]})")
    return cl.read_lora_config(adapter_dir), state
