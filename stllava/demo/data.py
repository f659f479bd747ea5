"""The demo's and the study's data: phantom splits, SFT sets, evaluation sets (no download).

Two builders, because the study shares most of its data between runs:

* :func:`build_shared` — what every run of a study (and the demo) evaluates on or self-trains on:
  the **unlabelled pool** (images only; its facts are known to the phantom judge alone), a
  **validation** split (settings are chosen on it) and a **test** split (reported, never tuned on),
  each with its LLaVA-Med evaluation files.
* :func:`build_labelled` — one seed's pool of **labelled** phantoms; :func:`write_sft_set` the SFT file
  of its first ``n`` (so the sets of one seed are nested: 30 ⊂ 100 ⊂ 1,500).

Every test/validation record carries the question's ``kind`` (presence, modality, side, count,
size) for the per-kind breakdown; the LLaVA-Med scorer ignores the extra field.

Each split's random stream is keyed by the split's *name* and the seed (:func:`stream_key`,
``"test/0"``), never by ``seed + offset``: with offsets, seed 2's labelled phantoms were seed 0's
test phantoms. :func:`check_disjoint` proves it on the rendered images before a study or the demo
trains on them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from importlib import resources

from PIL import Image

from stllava.demo.phantom_judge import question_kind
from stllava.demo.phantoms import make_split, sft_records, test_records
from stllava.errors import StllavaError
from stllava.jsonl import write_json_atomic, write_jsonl_atomic

# How the splits' streams are derived, recorded in the data steps' settings: a folder rendered by an
# earlier derivation (integer seed offsets) is refused by the runner instead of being reused.
STREAMS = "name/seed"


def stream_key(name: str, seed: int) -> str:
    """``"<name>/<seed>"``: the key of random stream ``name`` (a split, or the questions drawn for
    one) under ``seed``. Two streams with different names never coincide, whatever their seeds."""
    return f"{name}/{seed}"


def image_digest(path: str) -> str:
    """SHA-256 of an image's size and RGB pixels: equal for the same picture however it is encoded."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        return hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def images_in(folder: str) -> list[str]:
    """The ``.png`` files directly in ``folder`` (the phantoms), sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


def split_overlaps(splits: dict[str, list[str]]) -> list[tuple[str, str, str, str]]:
    """The images that appear (same pixels) in two of ``splits`` (split name → image paths):
    ``(split, image, other split, other image)`` for each, in the order given; empty when the
    splits are disjoint. Repeats within one split are not overlaps."""
    first: dict[str, tuple[str, str]] = {}
    found = []
    for split, paths in splits.items():
        for path in paths:
            digest = image_digest(path)
            seen = first.setdefault(digest, (split, path))
            if seen[0] != split:
                found.append((*seen, split, path))
    return found


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Refuse (StllavaError, one line) splits that share a phantom image (:func:`split_overlaps`);
    returns None when they are disjoint."""
    found = split_overlaps(splits)
    if found:
        split, path, other, other_path = found[0]
        raise StllavaError(f"{len(found)} phantom image(s) appear in two splits, e.g. {path} ({split}) has the "
                           f"pixels of {other_path} ({other}): a model would be evaluated on what it trained on",
                           fix="delete the data and labelled folders (rendered by an older version) and rerun")


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


def write_eval_set(folder: str, records: list[dict]) -> None:
    """``folder/test.json`` (with each question's kind) and ``folder/questions.jsonl``."""
    for r in records:
        found = question_kind(r["conversations"][0]["value"].replace("<image>", ""))
        r["kind"] = found[1] if found else "other"
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, "test.json"), records)
    write_jsonl_atomic(os.path.join(folder, "questions.jsonl"), eval_questions(records))


def build_shared(root: str, n_unlabelled: int, n_val: int, n_test: int, seed: int = 0, graded: bool = False) -> dict:
    """Render the unlabelled, validation and test phantoms under ``root/phantoms/`` and write the
    evaluation sets ``root/eval_val/`` and ``root/eval_test/`` (with the description question of
    :mod:`stllava.demo.graded` when ``graded``); returns a summary."""
    ph = os.path.join(root, "phantoms")
    make_split(os.path.join(ph, "unlabelled"), n_unlabelled, stream_key("unlabelled", seed), "unl")
    summary = {"unlabelled_images": n_unlabelled}
    for name, n in (("val", n_val), ("test", n_test)):
        phantoms = make_split(os.path.join(ph, name), n, stream_key(name, seed), name)
        records = test_records(phantoms, stream_key(f"{name}-questions", seed), graded=graded)
        write_eval_set(os.path.join(root, f"eval_{name}"), records)
        summary[f"{name}_questions"] = len(records)
        summary[f"{name}_closed"] = sum(t["answer_type"] == "CLOSED" for t in records)
    write_json_atomic(os.path.join(root, "summary.json"), summary)
    return summary


def training_questions(records: list[dict]) -> list[str]:
    """The distinct human questions of SFT records (``<image>`` removed), sorted."""
    return sorted({c["value"].replace("<image>\n", "") for r in records for c in r["conversations"]
                   if c["from"] == "human"})


def build_labelled(root: str, n_pool: int, seed: int, with_vqa_rad: bool = False, graded: bool = False) -> str:
    """Render ``n_pool`` labelled phantoms for ``seed`` under ``root/images/phantoms/`` and write their
    conversations, in phantom order, to ``root/records.json`` (plus the embedded VQA-RAD conversations
    in ``root/extra.json`` when ``with_vqa_rad``). Image paths are relative to ``root/images``.
    :func:`write_sft_set` then takes the first ``n`` of them. ``graded`` adds the description
    question to every conversation (:func:`stllava.demo.phantoms.sft_records`). Returns ``root``."""
    images = os.path.join(root, "images")
    phantoms = make_split(os.path.join(root, "phantoms"), n_pool, stream_key("labelled", seed), "train")
    shutil.rmtree(images, ignore_errors=True)
    shutil.copytree(os.path.join(root, "phantoms", "images"), os.path.join(images, "phantoms"))
    extra: list[dict] = []
    if with_vqa_rad:
        shutil.copytree(os.path.join(vqa_rad_assets(), "images"), os.path.join(images, "vqa_rad"))
        with open(os.path.join(vqa_rad_assets(), "vqa_rad_subset.json")) as f:
            extra = vqa_rad_sft_records(json.load(f))
    records = sft_records(phantoms, stream_key("labelled-conversations", seed), graded=graded)
    for r in records:
        r["image"] = "phantoms/" + r["image"]
    write_json_atomic(os.path.join(root, "records.json"), records)
    write_json_atomic(os.path.join(root, "extra.json"), extra)
    return root


def write_sft_set(root: str, n: int, seed: int) -> tuple[str, list[str]]:
    """``root/sft_<n>.json``: the first ``n`` labelled phantoms' conversations of :func:`build_labelled`
    (plus its extra records), shuffled with ``seed`` — so one seed's sets are nested. Returns the
    file and its training questions. Refuses ``n`` above the pool."""
    with open(os.path.join(root, "records.json")) as f:
        records = json.load(f)
    with open(os.path.join(root, "extra.json")) as f:
        extra = json.load(f)
    if n > len(records):
        raise ValueError(f"{root}: {n} labelled phantoms asked for, the pool has {len(records)}")
    sft = records[:n] + extra
    random.Random(seed).shuffle(sft)
    path = os.path.join(root, f"sft_{n}.json")
    write_json_atomic(path, sft)
    return path, training_questions(sft)
