"""Tiny learnable toy datasets for tests, benchmarks (``scripts/bench_*.py``) and smoke runs.

The task: a red or blue picture, "What colour is the image?" → the colour, so the answer can only
be learned by looking at the image. Not a dataset of the method: the demo and the study use the
phantoms of :mod:`stllava.demo.phantoms`.
"""
from __future__ import annotations

import json
import os
import random

from PIL import Image

TOY_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def write_colour_dataset(out_dir: str, n: int = 16, n_text: int = 0, seed: int = 0,
                         image_size: tuple[int, int] = (40, 28)) -> tuple[str, str]:
    """Write ``n`` image records (a red or blue picture, non-square so ``pad`` matters;
    "What colour is the image?" → the colour; a second turn for VUSER conversion) and ``n_text``
    text-only records to ``out_dir`` (LLaVA-Med SFT format, ``toy_sft.json``). Returns
    ``(data_path, image_folder)``."""
    rng = random.Random(seed)
    folder = os.path.join(out_dir, "images")
    os.makedirs(folder, exist_ok=True)
    records = []
    names = sorted(TOY_COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        base = TOY_COLOURS[colour]
        im = Image.new("RGB", image_size, tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in base))
        fname = f"toy_{i:04d}.png"
        im.save(os.path.join(folder, fname))
        records.append({"id": f"toy-{i}", "image": fname, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": colour},
            {"from": "human", "value": "Is the image red?"},
            {"from": "gpt", "value": "Yes" if colour == "red" else "No"},
        ]})
    for j in range(n_text):
        records.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": f"How many kidneys does a person have? ({j})"},
            {"from": "gpt", "value": "two"},
        ]})
    data_path = os.path.join(out_dir, "toy_sft.json")
    with open(data_path, "w") as f:
        json.dump(records, f, indent=1)
    return data_path, folder


def write_colour_preference_dataset(out_dir: str, n: int = 16, seed: int = 0,
                                    image_size: tuple[int, int] = (40, 28)) -> tuple[str, str]:
    """Write ``n`` pairs over the red/blue pictures of :func:`write_colour_dataset`:
    "What colour is the image?" with the right colour chosen and the other one rejected, so the
    preference is learnable only by looking at the image (DPO format, ``toy_dpo.json``). Returns
    ``(data_path, image_folder)``."""
    sft_path, folder = write_colour_dataset(out_dir, n=n, seed=seed, image_size=image_size)
    with open(sft_path) as f:
        sft = json.load(f)
    names = sorted(TOY_COLOURS)
    pairs = []
    for rec in sft:
        q, right = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        wrong = next(c for c in names if c != right)
        pairs.append({"id": rec["id"], "image": rec["image"],
                      "chosen_conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": right}],
                      "reject_conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": wrong}]})
    data_path = os.path.join(out_dir, "toy_dpo.json")
    with open(data_path, "w") as f:
        json.dump(pairs, f, indent=1)
    return data_path, folder
