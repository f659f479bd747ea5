"""``LlavaLlamaForCausalLM``: LLaMA/Vicuna with a CLIP tower and a projector (docs/Method.md#model).

Registered with the Auto classes under ``model_type = "llava_llama"``: transformers owns
``"llava"`` (its native LLaVA), so released configs that say ``"llava"`` with ``mm_vision_tower``
are mapped to ours by :func:`load_llava_config` instead of re-registering that name.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from stllava.model.checkpoint_layouts import ConfigError
from stllava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from stllava.model.projector import PROJECTOR_CHOICES, is_projector_type

logger = logging.getLogger(__name__)

MODEL_TYPE = "llava_llama"
# Fields a multimodal config must carry (docs/Method.md#checkpoint-compatibility).
MM_DEFAULTS = {
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "cluster",
    "image_aspect_ratio": "pad",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "use_mm_proj": True,
}


@dataclass
class LlavaCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``labels`` [B, L]: the labels the model laid out with its
    input (an image's positions IGNORE_INDEX, rows right-padded), aligned with ``logits``."""

    labels: torch.LongTensor | None = None


class LlavaLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._init_multimodal(config)


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def _init_weights(self, module):
        # Modules of the CLIP tower are initialised the CLIP way (class embedding, position ids).
        tower = self.get_model().get_vision_tower() if hasattr(self, "model") else None
        if tower is not None and type(module).__module__.startswith("transformers.models.clip"):
            return tower.clip._init_weights(module)
        return super()._init_weights(module)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, images=None, logits_to_keep=0,
                compute_loss: bool = True, **kwargs) -> CausalLMOutputWithPast:
        """Causal-LM forward; with ``images``, each ``IMAGE_TOKEN_INDEX`` in ``input_ids`` becomes
        the image's projected features (labels there are IGNORE_INDEX).

        With ``labels``, returns a :class:`LlavaCausalLMOutput` whose ``labels`` are laid out like
        ``logits`` (the model's own splice: what DPO sums its log-probs over, as TRL's
        ``concatenated_forward`` takes labels from the model); ``compute_loss=False`` skips the
        cross-entropy (a B × L × vocab float32 pass) when only those labels are wanted."""
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds, attention_mask, pos, labels = self.prepare_inputs_labels_for_multimodal(
                input_ids, attention_mask, labels, images, align="left")
            position_ids = pos if pos is not None else position_ids
            input_ids = None
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, inputs_embeds=inputs_embeds, labels=labels if compute_loss else None,
                              use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        if labels is None or not isinstance(out, CausalLMOutputWithPast):
            return out
        return LlavaCausalLMOutput(**out, labels=labels)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate from prompt ids (left-padded for batches) and images; returns only the new
        tokens (transformers 5 semantics for ``inputs_embeds``)."""
        if "inputs_embeds" in kwargs:
            return super().generate(attention_mask=attention_mask, **kwargs)
        if inputs is None:
            raise ValueError("generate needs prompt ids (`inputs`)")
        embeds, attention_mask, _, _ = self.prepare_inputs_labels_for_multimodal(
            inputs, attention_mask, None, images, align="right")
        return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """Load ours, a released ``"model_type": "llava"`` folder, or a plain LLaMA folder
        (the latter gets no vision modules until ``initialize_vision_modules``)."""
        if config is None and os.path.isdir(str(pretrained_model_name_or_path)):
            config = load_llava_config(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)


def load_llava_config(path: str) -> LlavaLlamaConfig:
    """Read ``path/config.json`` as a :class:`LlavaLlamaConfig`.

    Accepts our own ``llava_llama`` configs, released LLaVA/SQ-LLaVA/STLLaVA-Med configs
    (``"model_type": "llava"`` with ``mm_vision_tower``) and plain ``llama`` configs. Refuses
    (:class:`~stllava.model.checkpoint_layouts.ConfigError`, naming the file and the fix)
    transformers' native LLaVA layout (``text_config``/``vision_config``), another model type, a
    multimodal config without ``mm_hidden_size`` and an ``mm_projector_type`` no projector has.
    ``auto_map`` (code in the folder that transformers would import with ``trust_remote_code``)
    is dropped with a warning: stllava builds its own classes and never runs a checkpoint's code.
    """
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path} holds no config.json (files: {sorted(os.listdir(path))[:20]})")
    with open(cfg_file) as f:
        raw = json.load(f)
    mtype = raw.get("model_type")
    if mtype == "llava" and "mm_vision_tower" not in raw:
        raise ConfigError(
            f"{cfg_file}: model_type 'llava' without 'mm_vision_tower' is transformers' native LLaVA "
            "layout; load it with transformers.LlavaForConditionalGeneration, not stllava")
    if mtype not in (MODEL_TYPE, "llava", "llama"):
        raise ConfigError(f"{cfg_file}: model_type {mtype!r} is not one of 'llava_llama', 'llava' "
                          "(released STLLaVA-Med/SQ-LLaVA) or 'llama'")
    if "auto_map" in raw:
        logger.warning("%s names remote code (auto_map %s); ignored: stllava never imports a checkpoint's code",
                       cfg_file, raw["auto_map"])
    raw = {k: v for k, v in raw.items()
           if k not in ("model_type", "architectures", "transformers_version", "auto_map")}
    if "rope_theta" in raw and "rope_parameters" not in raw:  # transformers 4.x layout
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta")}
        scaling = raw.pop("rope_scaling", None)
        if scaling:
            raw["rope_parameters"].update(scaling)
    if raw.get("mm_vision_tower"):
        for k, v in MM_DEFAULTS.items():
            raw.setdefault(k, v)
        if "mm_hidden_size" not in raw:
            raise ConfigError(f"{cfg_file}: 'mm_vision_tower' is set but 'mm_hidden_size' is missing; "
                              "add the vision width (1024 for CLIP ViT-L/14)")
        if not is_projector_type(raw["mm_projector_type"]):
            raise ConfigError(f"mm_projector_type {raw['mm_projector_type']!r} is not a projector stllava builds "
                              f"({', '.join(PROJECTOR_CHOICES)})", file=cfg_file,
                              fix="set mm_projector_type to the projector the checkpoint was trained with "
                                  "(e.g. mlp2x_gelu, or cluster for SQ-LLaVA / STLLaVA-Med)")
    return LlavaLlamaConfig(**raw)


AutoConfig.register(MODEL_TYPE, LlavaLlamaConfig)
AutoModelForCausalLM.register(LlavaLlamaConfig, LlavaLlamaForCausalLM)
