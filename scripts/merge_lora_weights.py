"""Merge a LoRA checkpoint (LLM LoRA + projector + ViT-LoRA) into one full model folder.

    python scripts/merge_lora_weights.py --model-path OUT/checkpoint-N --model-base BASE \\
        --save-model-path MERGED [--vit-lora OUT/Vit-lora] [--dtype float16]

``--model-path`` is any layout ``stllava.model.builder.load_pretrained_model`` reads (a LoRA run's
output, a released STLLaVA-Med folder, a projector-only folder); ``--vit-lora`` defaults to
``MODEL_PATH/Vit-lora`` when present. The result holds config.json (model_type ``llava_llama``,
with the tower's shape in ``mm_vision_config``), ``model.safetensors`` (LLM + projector + merged
tower), tokenizer and ``preprocessor_config.json``, and loads with ``model_base=None``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
logger = logging.getLogger("stllava.merge_lora_weights")


def merge(model_path: str, model_base: str | None, save_model_path: str, vit_lora: str | None = None,
          dtype: str = "float16") -> str:
    """Load ``model_path`` (+ base, + ViT-LoRA) merged on the CPU and save it as one full folder.

    Returns ``save_model_path``. Refuses (ValueError) to write into the input folders or into a
    non-empty folder.
    """
    from stllava.model.builder import load_pretrained_model

    out = os.path.abspath(save_model_path)
    for src in (model_path, model_base, vit_lora):
        if src and os.path.realpath(src) == os.path.realpath(out):
            raise ValueError(f"--save-model-path {save_model_path} is an input folder; choose a new folder")
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--save-model-path {save_model_path} exists and is not empty; choose a new folder")
    tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base=model_base, device="cpu",
                                                           lora_pt=vit_lora, dtype=DTYPES[dtype])
    tower = model.get_model().get_vision_tower()
    if tower is not None:
        model.config.mm_vision_config = tower.config.to_dict()  # the merged folder needs no hub lookup
    model.config.use_cache = True
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="the checkpoint folder to merge (LoRA, projector-only, ...)")
    ap.add_argument("--model-base", default=None, help="the base folder the checkpoint was trained from")
    ap.add_argument("--vit-lora", default=None, help="a Vit-lora/ adapter folder (default: MODEL_PATH/Vit-lora)")
    ap.add_argument("--save-model-path", required=True, help="the new, full checkpoint folder")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="dtype of the saved weights")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    out = merge(args.model_path, args.model_base, args.save_model_path, args.vit_lora, args.dtype)
    print(f"merged {args.model_path} (base {args.model_base}) into {out} in {time.time() - t0:.1f} s; "
          f"load it with load_pretrained_model({out!r})")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
    main()
