"""CLIP vision tower with optional ViT-LoRA (docs/Method.md#vision-tower).

The tower returns the hidden state of layer ``mm_vision_select_layer`` (default -2); feature
``patch`` drops the CLS token, ``cls_patch`` keeps it. The forward keeps gradients whenever any
tower parameter is trainable (no ``torch.no_grad()`` then), so ViT-LoRA weights really learn
(docs/Differences.md#vit-lora-gradients).
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from stllava.errors import StllavaError
from stllava.model.checkpoint_layouts import ADAPTER_CONFIG

logger = logging.getLogger(__name__)

VIT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SELECT_FEATURES = ("patch", "cls_patch")


class CLIPVisionTower(nn.Module):
    """Wraps ``CLIPVisionModel`` as ``self.vision_tower`` so state-dict keys read
    ``model.vision_tower.vision_tower.*`` as in released LLaVA checkpoints."""

    def __init__(self, vision_tower: str, select_layer: int = -2, select_feature: str = "patch",
                 vision_config: dict | CLIPVisionConfig | None = None):
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} (from the model config) is not one of {SELECT_FEATURES}"
            )
        self.vision_tower_name = vision_tower
        self.select_layer = select_layer
        self.select_feature = select_feature
        if vision_config is None:
            # A hub id or local folder (released checkpoints only store the name).
            vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_tower = CLIPVisionModel(vision_config)
        self.vision_tower.requires_grad_(False)
        self.lora_enabled = False

    # ----------------------------------------------------------------------------------------
    def load_model(self, path: str | None = None) -> None:
        """Load pretrained CLIP weights from ``path`` (default: the tower name), in place."""
        src = path or self.vision_tower_name
        loaded = CLIPVisionModel.from_pretrained(src)
        missing, unexpected = self.clip.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lora_" not in k]:
            raise ValueError(f"vision tower weights at {src!r} do not match the tower config: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    @property
    def clip(self) -> CLIPVisionModel:
        """The plain CLIPVisionModel, under a PEFT wrapper when ViT-LoRA is on."""
        vt = self.vision_tower
        return vt.get_base_model() if hasattr(vt, "get_base_model") else vt

    def enable_lora(self, r: int = 32, alpha: int = 64, dropout: float = 0.2):
        """Wrap the CLIP encoder's Linear layers with LoRA (peft). Returns the PeftModel."""
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=VIT_LORA_TARGETS,
                         bias="none")
        self.vision_tower = get_peft_model(self.vision_tower, cfg)
        self.lora_enabled = True
        return self.vision_tower

    def load_lora(self, adapter_dir: str, trainable: bool = False):
        """Attach a saved ``Vit-lora/`` PEFT adapter folder."""
        from peft import PeftModel

        if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
            raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json; expected a PEFT Vit-lora folder")
        self.vision_tower = PeftModel.from_pretrained(self.vision_tower, adapter_dir, is_trainable=trainable)
        self.lora_enabled = True
        return self.vision_tower

    # ----------------------------------------------------------------------------------------
    def feature_select(self, outputs) -> torch.Tensor:
        feats = outputs.hidden_states[self.select_layer]
        return feats[:, 1:] if self.select_feature == "patch" else feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] → features [N, P, D]."""
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            out = self.vision_tower(pixel_values=images.to(dtype=self.dtype, device=self.device),
                                    output_hidden_states=True)
            return self.feature_select(out).to(images.dtype if images.is_floating_point() else self.dtype)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.clip.config

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.embeddings.patch_embedding.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return count_image_tokens(self.config, self.select_feature)

    def load_lora_weights(self, path: str) -> int:
        """Fill the enabled ViT-LoRA (:meth:`enable_lora`) from ``path``: a saved ``Vit-lora/``
        folder (its ``adapter_model.safetensors`` or ``.bin``) or such a weights file. Keys may be
        PEFT's saved form (``base_model.model.encoder...lora_A.weight``) or carry the model's prefix
        (``...vision_tower.vision_tower.``) and adapter name. Returns the number of tensors loaded.
        Raises :class:`ViTLoraWeightsError` naming the file when it holds no ViT-LoRA weights,
        weights of other modules, or another rank than the enabled adapter."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        from stllava.model.checkpoint_layouts import ADAPTER_SAFETENSORS
        from stllava.model.weights import load_state_dict_file

        if not self.lora_enabled:
            raise ViTLoraWeightsError(f"{path}: enable the ViT-LoRA (--vit_lora_enable) before loading its weights")
        f = path
        if os.path.isdir(path):
            f = next((os.path.join(path, n) for n in (ADAPTER_SAFETENSORS, "adapter_model.bin")
                      if os.path.isfile(os.path.join(path, n))), None)
            if f is None:
                raise ViTLoraWeightsError(f"{path} holds no {ADAPTER_SAFETENSORS} or adapter_model.bin; give a saved "
                                          "Vit-lora/ folder (or its weights file)")
        sd = {}
        for k, v in load_state_dict_file(f).items():
            if "lora_" not in k:
                continue
            k = k.split("vision_tower.vision_tower.", 1)[-1].replace(".default.", ".")
            sd[k if k.startswith("base_model.model.") else "base_model.model." + k] = v
        expected = get_peft_model_state_dict(self.vision_tower)
        unknown = [k for k in sd if k not in expected]
        if not sd or unknown:
            raise ViTLoraWeightsError(f"{f} holds no ViT-LoRA weights of this tower (first unknown keys: "
                                      f"{unknown[:3]}); give a Vit-lora/ folder saved by stllava or SQ-LLaVA")
        bad = [k for k in sd if tuple(sd[k].shape) != tuple(expected[k].shape)]
        if bad:
            k = bad[0]
            raise ViTLoraWeightsError(f"{f}: {k} has shape {tuple(sd[k].shape)} but the ViT-LoRA's is "
                                      f"{tuple(expected[k].shape)}; set --lora_r_vit to the saved adapter's rank")
        missing = [k for k in expected if k not in sd]
        if missing:
            raise ViTLoraWeightsError(f"{f} lacks ViT-LoRA weights the tower has, e.g. {missing[0]}")
        set_peft_model_state_dict(self.vision_tower, sd)
        logger.info("ViT-LoRA started from %s (%d tensors)", f, len(sd))
        return len(sd)


class ViTLoraWeightsError(StllavaError, ValueError):
    """A ViT-LoRA weights file (``--pretrain_lora``) does not fit the enabled adapter."""


def count_image_tokens(vision_config, select_feature: str = "patch") -> int:
    """Features one image gives: (image_size // patch_size)² patches, plus the CLS token for
    ``cls_patch``. ``vision_config`` is a ``CLIPVisionConfig`` or its dict."""
    get = vision_config.get if isinstance(vision_config, dict) else functools.partial(getattr, vision_config)
    n = (get("image_size") // get("patch_size")) ** 2
    return n + (1 if select_feature == "cls_patch" else 0)


def build_vision_tower(config) -> CLIPVisionTower:
    """Build the tower named by ``config.mm_vision_tower`` (a hub id or a local folder; no name
    whitelist). Weights are not loaded here: a full checkpoint carries them, otherwise call
    :meth:`CLIPVisionTower.load_model`."""
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("model config has no 'mm_vision_tower'; set it to a CLIP hub id or a local folder")
    return CLIPVisionTower(
        name,
        select_layer=getattr(config, "mm_vision_select_layer", -2),
        select_feature=getattr(config, "mm_vision_select_feature", "patch"),
        vision_config=getattr(config, "mm_vision_config", None),
    )


def clip_processor_class() -> type:
    """``CLIPImageProcessor`` when torchvision is installed, else ``CLIPImageProcessorPil``, the PIL
    processor transformers 5 would fall back to anyway (same preprocessing). Only the class used is
    imported: touching ``transformers.CLIPImageProcessor`` without torchvision prints a fallback
    warning, so no module of this package imports it at load time."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor
