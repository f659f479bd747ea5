"""Build every checkpoint layout from an in-memory "trained" tiny model (helpers for the tests of
``stllava.model.builder``, ``scripts/merge_lora_weights.py`` and the chat CLI).

The layouts are written here with peft and torch directly, following docs/Method.md#checkpoint-compatibility (and
the released STLLaVA-Med / SQ-LLaVA files for the legacy layout), independently of the trainer's
own saving code; ``test_builder.py`` also checks the layouts a real SFT run writes.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from PIL import Image

LLM_TARGETS = r"model\.layers\.\d+\.(self_attn|mlp)\.[A-Za-z0-9_]+_proj"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ASSET_IMAGE = os.path.join(os.path.dirname(__file__), "..", "stllava", "assets", "vqa_rad", "images",
                           "synpic19605.jpg")


def copy_files(src: str, dst: str, names) -> None:
    os.makedirs(dst, exist_ok=True)
    for n in names:
        if os.path.isfile(os.path.join(src, n)):
            shutil.copy(os.path.join(src, n), os.path.join(dst, n))


def perturb_(params, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def trained_lora_model(model_path: str, seed: int = 1, vit_lora: bool = True):
    """The tiny LLaVA of ``model_path`` wrapped as the SFT trainer wraps it (ViT-LoRA r=4 first, then
    LLM LoRA r=8 by module path), with every LoRA weight and the projector moved off their
    initial values. Returns the PEFT model in eval mode."""
    from peft import LoraConfig, get_peft_model

    from stllava.model import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # LoRA A weights are drawn from the global RNG: seed it, so the model does not depend on which
    # tests ran before (the cluster projector's arg-max can flip on a 1e-6 difference near a tie).
    torch.manual_seed(seed)
    if vit_lora:
        model.get_model().get_vision_tower().enable_lora(r=4, alpha=8, dropout=0.0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLM_TARGETS,
                                                  task_type="CAUSAL_LM"))
    perturb_([p for n, p in peft_model.named_parameters() if "lora_" in n], 0.05, seed)
    perturb_(model.get_model().mm_projector.parameters(), 0.02, seed + 1)
    return peft_model.eval()


def save_lora_layout(peft_model, out: str, model_path: str, tokenizer: bool = True) -> str:
    """Write ``out`` in the contract layout: adapter (LLM LoRA only), non_lora_trainables.bin
    (projector, ``base_model.model.`` prefixed), Vit-lora/, config.json, tokenizer, processor."""
    named = dict(peft_model.named_parameters())
    llm = {k: v.detach().clone() for k, v in named.items() if "lora_" in k and "vision_tower" not in k}
    peft_model.save_pretrained(out, state_dict=llm)
    torch.save({k: v.detach().clone() for k, v in named.items() if "mm_projector" in k},
               os.path.join(out, "non_lora_trainables.bin"))
    tower = peft_model.get_base_model().get_model().get_vision_tower()
    if tower.lora_enabled:
        tower.vision_tower.save_pretrained(os.path.join(out, "Vit-lora"))
    peft_model.get_base_model().config.save_pretrained(out)
    copy_files(model_path, out, ("preprocessor_config.json",) + (TOKENIZER_FILES if tokenizer else ()))
    return out


def sample_inputs(tokenizer, processor, config, question: str = "What is shown in the image?"):
    """``(input_ids [1, T], pixels [1, 3, H, W])`` for one v1 prompt about the asset image."""
    from stllava.conversation import get_conv_template
    from stllava.mm_utils import process_images, tokenizer_image_token

    conv = get_conv_template("v1")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    pixels = process_images([Image.open(ASSET_IMAGE)], processor, config)
    return ids, pixels


@torch.no_grad()
def logits_of(model, ids, pixels) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base(input_ids=ids, images=pixels).logits


@torch.no_grad()
def greedy(model, ids, pixels, n: int = 12) -> list[int]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.generate(ids, images=pixels, max_new_tokens=n, do_sample=False, min_new_tokens=n)[0].tolist()


# ---------------------------------------------------------------------------------------------
# The released (transformers 4 / old peft) layout

def legacy_config(config_dict: dict, vision_tower: str) -> dict:
    """A released-style config.json: model_type llava, rope_theta, no mm_vision_config."""
    raw = {k: v for k, v in config_dict.items() if k not in ("mm_vision_config", "rope_parameters", "dtype",
                                                             "transformers_version")}
    raw.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], rope_theta=10000.0, rope_scaling=None,
               torch_dtype="float32", transformers_version="4.31.0", mm_vision_tower=vision_tower,
               num_latents=256, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, mm_projector_lr=None,
               vision_tower_lr=2e-5)
    return raw


def legacy_clip_folder(src: str, dst: str) -> str:
    """A CLIP tower folder saved the transformers-4 way (``vision_model.`` in every key)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for n in os.listdir(src):
        if n != "model.safetensors":
            shutil.copy(os.path.join(src, n), os.path.join(dst, n))
    sd = load_file(os.path.join(src, "model.safetensors"))
    save_file({"vision_model." + k: v for k, v in sd.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def legacy_full_folder(model_path: str, dst: str, vision_tower: str) -> str:
    """A released full LLaVA folder: legacy config, tower keys with ``vision_model.``, pickled weights."""
    from safetensors.torch import load_file

    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(model_path, "model.safetensors"))
    sd = {k.replace("vision_tower.vision_tower.", "vision_tower.vision_tower.vision_model."): v for k, v in sd.items()}
    torch.save(sd, os.path.join(dst, "pytorch_model.bin"))
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = legacy_config(json.load(f), vision_tower)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    copy_files(model_path, dst, TOKENIZER_FILES + ("preprocessor_config.json",))
    return dst


def save_released_lora_layout(peft_model, out: str, vision_tower: str, with_vit_folder: bool = True) -> str:
    """The layout of a released STLLaVA-Med LoRA run: pickled ``adapter_model.bin`` holding the LLM
    LoRA *and* the ViT-LoRA under the reference's names (transformers-4 ``vision_model.``, adapter
    name kept), old-peft ``adapter_config.json`` with suffix targets, ``non_lora_trainables.bin``,
    ``Vit-lora/`` keyed relative to the reference's CLIPVisionTower wrapper, no tokenizer."""
    os.makedirs(out, exist_ok=True)
    named = dict(peft_model.named_parameters())
    adapter = {}
    for k, v in named.items():
        if "lora_" not in k:
            continue
        if "vision_tower" in k:  # ours: ...vision_tower.vision_tower.base_model.model.encoder...lora_A.default.weight
            k = k.replace("vision_tower.vision_tower.base_model.model.", "vision_tower.vision_tower.vision_model.")
        else:
            k = k.replace(".default.", ".")
        adapter[k] = v.detach().clone()
    torch.save(adapter, os.path.join(out, "adapter_model.bin"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"base_model_name_or_path": "./checkpoints/sqllava-7b", "bias": "none", "enable_lora": None,
                   "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05,
                   "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 8,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   "task_type": "CAUSAL_LM"}, f, indent=2)
    torch.save({k: v.detach().clone() for k, v in named.items() if "mm_projector" in k},
               os.path.join(out, "non_lora_trainables.bin"))
    if with_vit_folder:
        vit = {k.split("vision_tower.vision_tower.base_model.model.", 1)[1]: v.detach().clone()
               for k, v in named.items() if "lora_" in k and "vision_tower" in k}
        vit = {"base_model.model.vision_tower.vision_model." + k.replace(".default.", "."): v for k, v in vit.items()}
        os.makedirs(os.path.join(out, "Vit-lora"), exist_ok=True)
        torch.save(vit, os.path.join(out, "Vit-lora", "adapter_model.bin"))
        with open(os.path.join(out, "Vit-lora", "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "bias": "none",
                       "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                       "base_model_name_or_path": None, "task_type": None}, f, indent=2)
    cfg = peft_model.get_base_model().config.to_dict()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(legacy_config(cfg, vision_tower), f, indent=2)
    return out
