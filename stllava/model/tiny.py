"""Tiny random-init bundles for tests, the demo and smoke runs — no downloads.

``python -m stllava.model.tiny --out DIR`` writes::

    DIR/vision_tower/   CLIPVisionModel + CLIPImageProcessor   (stands in for openai/clip-vit-large-patch14-336)
    DIR/llm/            LlamaForCausalLM + tokenizer            (stands in for vicuna-7b-v1.5)
    DIR/                the LLaVA model tying them (config.json with mm_* fields, weights,
                        tokenizer, image processor)             (stands in for SQ-LLaVA-7B)

The tokenizer is a LLaMA-like SentencePiece model trained locally (unk/bos/eos = 0/1/2).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from stllava import logs
from stllava.model.llava_llama import LlavaLlamaConfig, LlavaLlamaForCausalLM
from stllava.model.vision_tower import clip_processor_class

logger = logging.getLogger(__name__)

# Sizes chosen so one CPU training step takes ~0.1 s yet the model can learn the demo tasks.
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   image_size=112, patch_size=14, projection_dim=64)
TINY_LLM = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024)
HEAD_INIT_STD = 0.2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_image_processor(image_size: int):
    """A CLIP image processor (:func:`~stllava.model.vision_tower.clip_processor_class`) for square
    ``image_size`` images with CLIP's mean and std."""
    return clip_processor_class()(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size},
                                  image_mean=CLIP_MEAN, image_std=CLIP_STD)


def build_tiny_bundle(out_dir: str, seed: int = 0, projector_type: str = "cluster",
                      vision: dict | None = None, llm: dict | None = None) -> dict[str, str]:
    """Write a tiny bundle to ``out_dir``; returns the paths ``{"model", "llm", "vision_tower"}``."""
    out_dir = os.path.abspath(out_dir)
    paths = {"model": out_dir, "llm": os.path.join(out_dir, "llm"),
             "vision_tower": os.path.join(out_dir, "vision_tower")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    from stllava.model.tiny_tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(paths["llm"])

    vcfg = CLIPVisionConfig(**{**TINY_VISION, **(vision or {})})
    tower = CLIPVisionModel(vcfg)
    tower.save_pretrained(paths["vision_tower"])
    processor = tiny_image_processor(vcfg.image_size)
    processor.save_pretrained(paths["vision_tower"])

    lcfg = dict(TINY_LLM, **(llm or {}), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lm = LlamaForCausalLM(LlamaConfig(**lcfg))
    with torch.no_grad():
        # A pretrained LM's output head spans a wide logit range; a random one at std 0.02 caps
        # |logit| near 1.3 after the final RMSNorm, so a LoRA-only run (head frozen, as in the
        # published recipe) could never predict confidently. std 0.2 restores a usable range.
        lm.lm_head.weight.normal_(0.0, HEAD_INIT_STD)
    lm.save_pretrained(paths["llm"])

    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    config = LlavaLlamaConfig(
        **lcfg, mm_vision_tower=paths["vision_tower"], mm_vision_config=vcfg.to_dict(),
        mm_hidden_size=vcfg.hidden_size, mm_projector_type=projector_type,
        mm_projector_clusters=min(256, n_patches), mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, use_mm_proj=True, tokenizer_model_max_length=1024,
        tokenizer_padding_side="right")
    model = LlavaLlamaForCausalLM(config)
    model.model.load_state_dict(lm.model.state_dict(), strict=False)
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.get_model().vision_tower.clip.load_state_dict(tower.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes tokenizer.json only; keep the SentencePiece model next to it too.
    shutil.copy(os.path.join(paths["llm"], "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    processor.save_pretrained(out_dir)
    logger.info("tiny bundle written to %s (LLM %d params, tower %d params, projector %s)", out_dir,
                sum(p.numel() for p in lm.parameters()), sum(p.numel() for p in tower.parameters()),
                projector_type)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write the bundle to")
    ap.add_argument("--seed", type=int, default=0, help="random-init seed")
    ap.add_argument("--projector", default="cluster", help="mm_projector_type (cluster, mlp2x_gelu, linear)")
    logs.add_log_level_arg(ap)
    args = ap.parse_args(argv)
    logs.setup(args.log_level)
    paths = build_tiny_bundle(args.out, seed=args.seed, projector_type=args.projector)
    for k, v in paths.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
