"""Load a model for inference: ``load_pretrained_model`` → (tokenizer, model, image_processor, context_len).

This first version loads a full checkpoint folder (ours, or a merged one). LoRA folders,
``Vit-lora/``, projector-only files and the released STLLaVA-Med layout are added by the
checkpoint issue on top of the same entry point.
"""
from __future__ import annotations

import logging
import os

import torch
from transformers import CLIPImageProcessor, LlamaTokenizer

from stllava.model.llava_llama import LlavaLlamaForCausalLM, load_llava_config

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """'cuda' falls back to 'cpu' (with a warning) when no GPU is present."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        return "cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        logger.warning("device 'mps' requested but not available; using cpu")
        return "cpu"
    return device


def load_tokenizer(path: str) -> LlamaTokenizer:
    tok = LlamaTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # LLaVA pads with unk
    return tok


def load_image_processor(model_path: str, config) -> CLIPImageProcessor:
    """The processor saved with the checkpoint, else the one of ``mm_vision_tower``."""
    for src in (model_path, getattr(config, "mm_vision_tower", None)):
        if src and os.path.isfile(os.path.join(src, "preprocessor_config.json")):
            return CLIPImageProcessor.from_pretrained(src)
    return CLIPImageProcessor.from_pretrained(config.mm_vision_tower)


def load_pretrained_model(model_path: str, model_base: str | None = None, model_name: str | None = None,
                          load_8bit: bool = False, load_4bit: bool = False, device_map="auto",
                          device: str = "cuda", lora_pt: str | None = None, dtype=None):
    """Return ``(tokenizer, model, image_processor, context_len)`` for a full checkpoint folder."""
    if model_base is not None or lora_pt is not None:
        raise NotImplementedError("LoRA / base-model layouts are not supported by this loader yet")
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    config = load_llava_config(model_path)
    model = LlavaLlamaForCausalLM.from_pretrained(model_path, config=config, dtype=dtype)
    model.to(device).eval()
    tokenizer = load_tokenizer(model_path)
    image_processor = load_image_processor(model_path, config) if getattr(config, "mm_vision_tower", None) else None
    context_len = getattr(config, "tokenizer_model_max_length", None) or getattr(config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len
