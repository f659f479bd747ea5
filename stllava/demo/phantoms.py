"""Synthetic medical phantoms with known ground truth, for the embedded demo.

Each phantom is a grey-scale "scan": a body outline in one of three modality styles (X-ray-like,
CT-like, MRI-like) with 0–3 bright round lesions at known positions and sizes. Because the facts
of every image are known, the demo can (a) build SFT conversations, (b) hold out a test set with
exact answers, and (c) run a *phantom judge* that scores answers against the facts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random

import numpy as np
from PIL import Image

from stllava.demo.graded import DESCRIBE_QUESTION, describe
from stllava.jsonl import write_json_atomic

MODALITIES = ("x-ray", "ct", "mri")
MODALITY_NAMES = {"x-ray": "an x-ray", "ct": "a ct scan", "mri": "an mri"}
NUMBER_WORDS = ["zero", "one", "two", "three"]
IMAGE_SIZE = 128


@dataclasses.dataclass
class Lesion:
    x: float  # centre, as a fraction of the width (patient's right is image left, as in radiology;
    y: float  # we name sides by the image half to keep the demo unambiguous)
    r: float  # radius, fraction of the width

    @property
    def side(self) -> str:
        return "left" if self.x < 0.5 else "right"

    @property
    def size(self) -> str:
        return "large" if self.r >= 0.09 else "small"


@dataclasses.dataclass
class Phantom:
    name: str
    modality: str
    lesions: list[Lesion]

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def sides(self) -> set[str]:
        return {les.side for les in self.lesions}

    def facts(self) -> dict:
        return {"modality": self.modality, "count": self.count,
                "lesions": [dataclasses.asdict(les) | {"side": les.side, "size": les.size} for les in self.lesions]}


def sample_phantom(rng: random.Random, name: str) -> Phantom:
    modality = rng.choice(MODALITIES)
    count = rng.choice([0, 1, 1, 2, 2, 3])
    lesions: list[Lesion] = []
    while len(lesions) < count:
        les = Lesion(x=rng.uniform(0.22, 0.78), y=rng.uniform(0.3, 0.7), r=rng.choice([0.06, 0.11]))
        if abs(les.x - 0.5) < 0.08:  # keep lesions clearly on one side
            continue
        if all(math.hypot(les.x - o.x, les.y - o.y) > les.r + o.r + 0.03 for o in lesions):
            lesions.append(les)
    return Phantom(name=name, modality=modality, lesions=lesions)


def render(ph: Phantom, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the phantom as an 8-bit grey-scale image (returned as RGB, as scanners' JPEGs are)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    nrng = np.random.default_rng(rng.randrange(2**32))
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.36) ** 2 <= 1.0
    img = np.zeros((size, size), np.float32)
    if ph.modality == "x-ray":
        img[:] = 0.08
        img[body] = 0.35 + 0.25 * (1 - yy[body])  # soft tissue, brighter at the top
        ribs = (np.sin(yy * 38) > 0.6) & body  # rib-like stripes
        img[ribs] += 0.2
    elif ph.modality == "ct":
        img[:] = 0.0
        img[body] = 0.45
        ring = body & ~(((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1.0)
        img[ring] = 0.85  # bright cortical-bone-like rim
        img[(yy > 0.9) & (yy < 0.93)] = 0.5  # scanner table
    else:  # mri
        img[:] = 0.02
        img[body] = 0.25
        fat = body & ~(((xx - 0.5) / 0.39) ** 2 + ((yy - 0.5) / 0.33) ** 2 <= 1.0)
        img[fat] = 0.7
        img[body] += (0.08 * np.sin(xx * 20) * np.sin(yy * 20))[body]  # soft texture
    for les in ph.lesions:
        d = np.hypot(xx - les.x, yy - les.y)
        img[d <= les.r] = 1.0
    img += nrng.normal(0, 0.03, img.shape)
    arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").convert("RGB")


def closed_questions(ph: Phantom, rng: random.Random) -> list[tuple[str, str]]:
    """(question, "yes"/"no") pairs about the phantom."""
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    other = rng.choice([m for m in MODALITIES if m != ph.modality])
    asked = rng.choice([ph.modality, other])
    side = rng.choice(["left", "right"])
    return [
        ("Is there a lesion in this image?", yes(ph.count > 0)),
        (f"Is this {MODALITY_NAMES[asked]}?", yes(asked == ph.modality)),
        (f"Is there a lesion on the {side} side?", yes(side in ph.sides)),
        ("Is there more than one lesion?", yes(ph.count > 1)),
    ]


def open_questions(ph: Phantom) -> list[tuple[str, str]]:
    if ph.count == 0:
        side = "none"
    else:
        side = "both" if len(ph.sides) == 2 else next(iter(ph.sides))
    pairs = [("What imaging modality is this?", ph.modality),
             ("How many lesions are there?", NUMBER_WORDS[ph.count])]
    if ph.count:
        pairs.append(("Which side is the lesion on?", side))
        pairs.append(("How large is the largest lesion?", max(ph.lesions, key=lambda les: les.r).size))
    return pairs


def make_split(out_dir: str, n: int, seed: int | str, prefix: str) -> list[Phantom]:
    """Render ``n`` phantoms into ``out_dir/images`` and write ``facts.json``; returns them.
    ``seed`` seeds the split's random stream: an int, or a string key such as ``"test/0"``
    (``random.Random`` hashes a string with SHA-512, the same in every process)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    phantoms = []
    for i in range(n):
        ph = sample_phantom(rng, f"{prefix}_{i:04d}.png")
        render(ph, rng).save(os.path.join(out_dir, "images", ph.name))
        phantoms.append(ph)
    write_json_atomic(os.path.join(out_dir, "facts.json"), {ph.name: ph.facts() for ph in phantoms}, indent=1)
    return phantoms


def sft_records(phantoms: list[Phantom], seed: int | str, graded: bool = False) -> list[dict]:
    """LLaVA-Med-format multi-turn conversations (open and closed questions) per phantom; ``seed``
    (an int or a string key) seeds the choice of questions. With ``graded``, every conversation
    ends with the description question (:mod:`stllava.demo.graded`), drawing nothing from the
    stream: the other turns are those of ``graded=False``."""
    rng = random.Random(seed)
    records = []
    for ph in phantoms:
        pairs = closed_questions(ph, rng) + open_questions(ph)
        rng.shuffle(pairs)
        pairs = pairs[: rng.randint(3, len(pairs))]
        if graded:
            pairs.append((DESCRIBE_QUESTION, describe(ph.facts())))
        conv = []
        for j, (q, a) in enumerate(pairs):
            conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
            conv.append({"from": "gpt", "value": a.capitalize() + "."})
        records.append({"id": ph.name.rsplit(".", 1)[0], "image": ph.name, "conversations": conv})
    return records


def test_records(phantoms: list[Phantom], seed: int | str, graded: bool = False) -> list[dict]:
    """LLaVA-Med evaluation format, one question per record; ``seed`` (an int or a string key)
    seeds the choice of questions. With ``graded``, each phantom also gets the description
    question (OPEN records after all others, so the other records keep their ids)."""
    rng = random.Random(seed)
    items = []
    for ph in phantoms:
        for q, a in closed_questions(ph, rng):
            items.append((ph, q, a, "CLOSED"))
        for q, a in open_questions(ph):
            items.append((ph, q, a, "OPEN"))
    if graded:
        items += [(ph, DESCRIBE_QUESTION, describe(ph.facts()), "OPEN") for ph in phantoms]
    return [{"id": f"{ph.name.rsplit('.', 1)[0]}_{k}", "image": ph.name, "answer_type": t,
             "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
            for k, (ph, q, a, t) in enumerate(items)]
