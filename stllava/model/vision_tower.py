"""CLIP vision tower with optional ViT-LoRA (SPEC §2).

The tower returns the hidden state of layer ``mm_vision_select_layer`` (default -2); feature
``patch`` drops the CLS token, ``cls_patch`` keeps it. Unlike the published code, the forward does
not run under ``torch.no_grad()`` whenever any tower parameter is trainable, so ViT-LoRA weights
really receive gradients.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

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
        n = (self.config.image_size // self.config.patch_size) ** 2
        return n + (1 if self.select_feature == "cls_patch" else 0)


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
