"""``python -m stllava.demo`` (what ``make demo`` runs).

Builds the tiny random-init bundle (reused when already built) and asks it one question about one
embedded VQA-RAD image, printing the prompt and the answer. A random-init model answers nonsense:
the point is that every real code path (tokenizer, image preprocessing, splice, generation) runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from importlib import resources

import torch
from PIL import Image

from stllava.conversation import get_conv_template
from stllava.mm_utils import process_images, tokenizer_image_token
from stllava.model.builder import load_pretrained_model
from stllava.model.tiny import build_tiny_bundle

logger = logging.getLogger("stllava.demo")


def assets_dir() -> str:
    return str(resources.files("stllava") / "assets" / "vqa_rad")


def ensure_bundle(out: str) -> dict[str, str]:
    """Build the tiny bundle under ``out`` unless a finished one is there."""
    marker = os.path.join(out, ".complete")
    paths = {"model": out, "llm": os.path.join(out, "llm"), "vision_tower": os.path.join(out, "vision_tower")}
    if os.path.exists(marker):
        logger.info("reusing tiny bundle at %s", out)
        return paths
    paths = build_tiny_bundle(out)
    open(marker, "w").close()
    return paths


def ask(model_path: str, image_path: str, question: str, max_new_tokens: int = 24) -> tuple[str, str]:
    """Return (prompt, answer) for one greedy answer of ``model_path`` about ``image_path``."""
    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu")
    conv = get_conv_template("v1")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    pixels = process_images([Image.open(image_path).convert("RGB")], processor, model.config)
    out = model.generate(ids, images=pixels, max_new_tokens=max_new_tokens, do_sample=False)
    return prompt, tokenizer.decode(out[0], skip_special_tokens=True).strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="playground/demo", help="where the demo writes its outputs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    bundle = ensure_bundle(os.path.join(args.workdir, "tiny"))
    qa = json.load(open(os.path.join(assets_dir(), "vqa_rad_subset.json")))[0]
    image = os.path.join(assets_dir(), "images", qa["image_name"])
    prompt, answer = ask(bundle["model"], image, qa["question"])
    print(f"image:    {image}")
    print(f"prompt:   {prompt!r}")
    print(f"answer:   {answer!r}  (random-init tiny model; reference answer: {qa['answer']!r})")
    print(f"demo finished in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
