"""The demo's embedded data: phantom splits, the SFT set, the evaluation sets (no download)."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from importlib import resources

from stllava.demo.phantoms import make_split, sft_records, test_records
from stllava.jsonl import write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)


def vqa_rad_assets() -> str:
    return str(resources.files("stllava") / "assets" / "vqa_rad")


def vqa_rad_sft_records(raw: list[dict]) -> list[dict]:
    """Multi-turn LLaVA-Med conversations from the embedded VQA-RAD *training* QAs, one per image."""
    by_image: dict[str, list[dict]] = {}
    for qa in raw:
        if qa["phrase_type"] in ("freeform", "para"):
            by_image.setdefault(qa["image_name"], []).append(qa)
    records = []
    for name, qas in sorted(by_image.items()):
        conv = []
        for j, qa in enumerate(qas[:6]):
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + qa["question"]})
            conv.append({"from": "gpt", "value": str(qa["answer"])})
        records.append({"id": "vqarad_" + name.rsplit(".", 1)[0], "image": "vqa_rad/" + name, "conversations": conv})
    return records


def eval_questions(test: list[dict]) -> list[dict]:
    """Question JSONL rows (``question_id, image, text``) for ``model_vqa`` from a test JSON."""
    return [{"question_id": t["id"], "image": t["image"],
             "text": t["conversations"][0]["value"].replace("<image>", "").strip()} for t in test]


def build_demo_data(root: str, n_train: int, n_unlabelled: int, n_test: int, seed: int = 0) -> dict:
    """Render phantoms and write every data file the demo uses under ``root``; returns a summary."""
    ph = os.path.join(root, "phantoms")
    train = make_split(os.path.join(ph, "train"), n_train, seed + 1, "train")
    make_split(os.path.join(ph, "unlabelled"), n_unlabelled, seed + 2, "unl")
    test = make_split(os.path.join(ph, "test"), n_test, seed + 3, "test")

    # One image folder for SFT: phantom training images + the embedded VQA-RAD images.
    images = os.path.join(root, "sft_images")
    shutil.rmtree(images, ignore_errors=True)
    shutil.copytree(os.path.join(ph, "train", "images"), os.path.join(images, "phantoms"))
    shutil.copytree(os.path.join(vqa_rad_assets(), "images"), os.path.join(images, "vqa_rad"))
    raw = json.load(open(os.path.join(vqa_rad_assets(), "vqa_rad_subset.json")))
    phantom_sft = sft_records(train, seed + 4)
    for r in phantom_sft:
        r["image"] = "phantoms/" + r["image"]
    vqa_sft = vqa_rad_sft_records(raw)
    sft = phantom_sft + vqa_sft
    random.Random(seed).shuffle(sft)
    write_json_atomic(os.path.join(root, "sft.json"), sft)

    ptest = test_records(test, seed + 5)
    os.makedirs(os.path.join(root, "eval_phantom"), exist_ok=True)
    write_json_atomic(os.path.join(root, "eval_phantom", "test.json"), ptest)
    write_jsonl_atomic(os.path.join(root, "eval_phantom", "questions.jsonl"), eval_questions(ptest))
    summary = {"sft_records": len(sft), "sft_phantom": len(phantom_sft), "sft_vqa_rad": len(vqa_sft),
               "unlabelled_images": n_unlabelled, "phantom_test_questions": len(ptest),
               "phantom_test_closed": sum(t["answer_type"] == "CLOSED" for t in ptest),
               "training_questions": sorted({c["value"].replace("<image>\n", "") for r in sft
                                             for c in r["conversations"] if c["from"] == "human"})}
    write_json_atomic(os.path.join(root, "summary.json"), summary)
    return summary
