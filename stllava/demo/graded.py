"""A probe of graded answers: a short description whose answer lists the facts of a phantom.

The demo's questions have one-word answers, so every preference pair is "right vs wrong" and DPO
can hardly carry more information than SFT on the chosen answers (RFT). A description question
(:data:`DESCRIBE_QUESTION`, answered e.g. "CT, two lesions, left, large.") has answers that are
*partly* right, so a judge can grade them and pairs can differ by degree (docs/Study.md, "Graded
answers"). It is added to the SFT and test records only when the ``graded`` option is on
(:func:`stllava.demo.phantoms.sft_records`), so the default demo's data stay bit-identical.

* :func:`describe` — the reference description of a phantom (≤ 12 tokens of the tiny tokenizer);
* :func:`parse_description` — the facts an answer states (modality, count, side, size);
* :func:`grade` — facts stated correctly and wrongly against the truth;
* :func:`judge_score` — the phantom judge's 1–10 score: facts right minus facts wrong, mapped
  linearly onto the published 1–10 scale;
* :func:`description_metrics` — fact recall and precision of an evaluation's description answers.
"""
from __future__ import annotations

import json
import math
import os
import re

DESCRIBE_QUESTION = "Describe the findings."
FACTS = ("modality", "count", "side", "size")
_NUMBER_WORDS = ("no", "one", "two", "three")
MODALITY_TEXT = {"x-ray": "X-ray", "ct": "CT", "mri": "MRI"}
_MODALITY_WORDS = {"x-ray": "x-ray", "xray": "x-ray", "radiograph": "x-ray", "ct": "ct", "mri": "mri", "mr": "mri"}
_COUNT_WORDS = {"no": 0, "zero": 0, "none": 0, "one": 1, "a": 1, "single": 1, "two": 2, "three": 3,
                "0": 0, "1": 1, "2": 2, "3": 3}


def is_describe_question(question: str) -> bool:
    """True for a request to describe (the probe's question and wordings starting "Describe")."""
    q = re.findall(r"[a-z]+", question.lower())
    return bool(q) and q[0] == "describe"


def truth(facts: dict) -> dict:
    """The description's facts of a phantom (its ``facts()``): ``{"modality", "count", "side",
    "size"}``, side and size None without lesions; side "both" when lesions lie on both sides,
    size the largest lesion's."""
    lesions = facts["lesions"]
    sides = {les["side"] for les in lesions}
    return {"modality": facts["modality"], "count": facts["count"],
            "side": (("both" if len(sides) == 2 else next(iter(sides))) if lesions else None),
            "size": ("large" if any(les["size"] == "large" for les in lesions) else "small") if lesions else None}


def describe(facts: dict) -> str:
    """The reference answer, e.g. ``"CT, two lesions, left, large"``, ``"X-ray, three lesions,
    bilateral, small"`` or ``"MRI, no lesion"`` (no final period: the SFT records add it as they do
    for every answer). Number words and "bilateral" keep it within 12 tokens of the tiny tokenizer
    (a digit is two pieces there, "both" three)."""
    t = truth(facts)
    head = MODALITY_TEXT[t["modality"]]
    if not t["count"]:
        return f"{head}, no lesion"
    side = "bilateral" if t["side"] == "both" else t["side"]
    return f"{head}, {_NUMBER_WORDS[t['count']]} lesion{'s' if t['count'] > 1 else ''}, {side}, {t['size']}"


def parse_description(text: str) -> dict:
    """The facts an answer states: a dict with any of ``modality`` (x-ray / ct / mri), ``count``
    (0–3: a number word or digit before "lesion(s)", or "no lesion"), ``side`` (left / right / both)
    and ``size`` (large / small). The first mention of each fact counts; a fact stated twice with
    different values is taken at its first value. Returns {} for text that states nothing."""
    w = re.findall(r"[a-z0-9]+(?:-[a-z]+)?", text.lower())
    stated: dict = {}
    for i, tok in enumerate(w):
        if tok in _MODALITY_WORDS:
            stated.setdefault("modality", _MODALITY_WORDS[tok])
        elif tok in ("lesion", "lesions") and i and w[i - 1] in _COUNT_WORDS:
            stated.setdefault("count", _COUNT_WORDS[w[i - 1]])
        elif tok in ("left", "right", "both", "bilateral"):
            stated.setdefault("side", "both" if tok == "bilateral" else tok)
        elif tok in ("large", "small"):
            stated.setdefault("size", tok)
    return stated


def grade(answer: str, facts: dict) -> dict:
    """``{"correct", "wrong", "stated", "facts"}`` of ``answer`` against a phantom's facts: a stated
    fact is correct when it equals the truth; a side or size stated for a phantom without lesions
    is wrong. ``facts`` is the number of facts the phantom has (4, or 2 without lesions)."""
    t = truth(facts)
    stated = parse_description(answer)
    correct = sum(stated[k] == t[k] for k in stated)
    return {"correct": correct, "wrong": len(stated) - correct, "stated": len(stated),
            "facts": sum(v is not None for v in t.values())}


def judge_score(answer: str, facts: dict) -> int:
    """The phantom judge's score (1–10) of a description: d = correct − wrong facts, mapped
    linearly from [−F, F] (F = the phantom's facts) onto [1, 10] and rounded half up; d below −F
    (more wrong facts than the phantom has) scores 1. All four facts right: 10; nothing stated: 6
    (5.5 rounded up); one right, one wrong: 6."""
    g = grade(answer, facts)
    f = g["facts"]
    d = max(-f, g["correct"] - g["wrong"])
    return math.floor(1 + 9 * (d + f) / (2 * f) + 0.5)


def truth_from_reference(reference: str) -> dict:
    """The facts of a reference description (:func:`describe`'s text) in :func:`truth`'s form."""
    stated = parse_description(reference)
    return {k: stated.get(k) for k in FACTS}


def description_metrics(eval_folder: str, eval_set: str) -> dict:
    """Fact recall and precision of the description answers scored in ``eval_folder`` (its
    ``answers.jsonl`` from ``stllava.eval.model_vqa``) against the reference answers of
    ``eval_set/test.json``: ``{"n", "recall", "precision", "exact", "examples"}``, pooled over the
    answers (recall = facts stated correctly / facts; precision = correct facts / facts stated;
    exact = share of answers with every fact right and none wrong; ×100), None when there are
    none; ``examples`` are the first three (question id, answer, reference)."""
    with open(os.path.join(eval_set, "test.json")) as f:
        refs = {str(t["id"]): t["conversations"][1]["value"] for t in json.load(f)
                if is_describe_question(t["conversations"][0]["value"].replace("<image>", ""))}
    with open(os.path.join(eval_folder, "answers.jsonl"), encoding="utf-8") as f:
        answers = {str(r["question_id"]): r["text"] for r in map(json.loads, filter(str.strip, f))}
    correct = stated = total = exact = 0
    examples = []
    for qid, ref in refs.items():
        t = truth_from_reference(ref)
        said = parse_description(answers.get(qid, ""))
        ok = sum(said[k] == t[k] for k in said)
        n = sum(v is not None for v in t.values())
        correct, stated, total = correct + ok, stated + len(said), total + n
        exact += ok == n == len(said)
        if len(examples) < 3:
            examples.append([qid, answers.get(qid, ""), ref])
    pct = lambda a, b: 100.0 * a / b if b else None  # noqa: E731
    return {"n": len(refs), "recall": pct(correct, total), "precision": pct(correct, stated),
            "exact": pct(exact, len(refs)), "examples": examples}


def data_settings(graded: bool) -> dict:
    """What the graded option adds to a data step's settings: ``{"graded": True}`` when on, nothing
    when off (so the default data folders keep their markers and digests)."""
    return {"graded": True} if graded else {}


def graded_plan() -> dict:
    """The graded-answer probe as a chunk of ``python -m stllava.demo.study --plan graded``
    (:class:`stllava.demo.study.StudyConfig` overrides, ``loop_changes`` applied to the study's loop
    settings): SFT vs DPO vs RFT at 100 labelled × 3 seeds with the description question on
    (evaluation answers may run to 16 tokens, so a description is not cut)."""
    return {"sizes": (100,), "seeds": (10, 11, 12), "conditions": ("sft", "st", "rft"), "ablation_sizes": None,
            "variant": "graded", "loop_changes": {"graded": True, "eval_max_new_tokens": 16}}
