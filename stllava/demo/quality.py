"""What a run's numbers mean: accuracy per question kind, and the quality of its self-made data.

* :func:`per_kind` — closed accuracy and open recall per question kind (presence, modality, side,
  count, size) from an evaluation folder (``per_question.csv`` of ``stllava.eval.metrics``) and
  the ``kind`` field of the evaluation set.
* :func:`question_stats` — what the model asked: how many questions, how many distinct, how many
  not verbatim among its training questions (*novel*), how many the phantom judge can check
  (*answerable*), per kind.
* :func:`pair_stats` — what stage 2 made of them, checked against the phantoms' ground truth
  (independently of what the judge replied): identical-answer rate, tie rate, pairs kept, and the
  share of pairs whose chosen answer is right and whose rejected answer is wrong.
"""
from __future__ import annotations

import collections
import csv
import json
import os

from stllava.demo.phantom_judge import expected_answer, is_right, question_kind

KINDS = ("presence", "modality", "side", "count", "size")


def _mean100(values: list[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def per_kind(eval_folder: str, eval_set: str) -> dict:
    """``{"closed": {kind: acc}, "open": {kind: recall}, "n_closed": {...}, "n_open": {...}}``
    (×100) for the questions scored in ``eval_folder``; ``eval_set`` is the folder of its test.json."""
    with open(os.path.join(eval_set, "test.json")) as f:
        kinds = {t["id"]: t.get("kind", "other") for t in json.load(f)}
    closed, opened = collections.defaultdict(list), collections.defaultdict(list)
    with open(os.path.join(eval_folder, "per_question.csv"), newline="") as f:
        for row in csv.DictReader(f):
            kind = kinds.get(row["question_id"], "other")
            if row["answer_type"] == "CLOSED":
                closed[kind].append(float(row["closed_hit"]))
            else:
                opened[kind].append(float(row["recall"]))
    return {"closed": {k: _mean100(v) for k, v in sorted(closed.items())},
            "open": {k: _mean100(v) for k, v in sorted(opened.items())},
            "n_closed": {k: len(v) for k, v in sorted(closed.items())},
            "n_open": {k: len(v) for k, v in sorted(opened.items())}}


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def question_stats(questions_file: str, facts_file: str, training_questions: list[str]) -> dict:
    """Counts of the self-asked questions (see the module docstring); ``by_kind`` counts the
    answerable ones per kind."""
    with open(facts_file) as f:
        facts = json.load(f)
    train = {q.strip().lower() for q in training_questions}
    records = _read_jsonl(questions_file)
    asked = [(r["image"], q) for r in records for q in r["questions"]]
    novel = [(im, q) for im, q in asked if q.strip().lower() not in train]
    answerable = [(im, q) for im, q in asked if expected_answer(q, facts[im]) is not None]
    by_kind = collections.Counter(question_kind(q)[1] for _, q in answerable)
    return {"images": len(records), "questions": len(asked), "distinct": len({q.lower() for _, q in asked}),
            "novel": len(novel), "novel_distinct": len({q.lower() for _, q in novel}),
            "novel_answerable": sum(expected_answer(q, facts[im]) is not None for im, q in novel),
            "answerable": len(answerable), "answerable_rate": len(answerable) / len(asked) if asked else None,
            "by_kind": dict(sorted(by_kind.items())),
            "novel_examples": sorted({q for _, q in novel})[:8]}


def _question(pair: dict) -> str:
    return pair["chosen_conversations"][0]["value"].replace("<image>", "").strip()


def pair_stats(judged_file: str, pairs_files: list[str], facts_file: str) -> dict:
    """Stage-2 data quality against the phantoms' ground truth (see the module docstring)."""
    with open(facts_file) as f:
        facts = json.load(f)
    judged = _read_jsonl(judged_file)
    status = collections.Counter(j["judge"]["status"] for j in judged)
    pairs = []
    for path in pairs_files:
        with open(path) as f:
            pairs += json.load(f)
    right_wrong = 0
    for p in pairs:
        exp = expected_answer(_question(p), facts[p["image"]])
        if exp is not None:
            form, truth = exp
            chosen, rejected = p["chosen_conversations"][1]["value"], p["reject_conversations"][1]["value"]
            right_wrong += is_right(chosen, form, truth) and not is_right(rejected, form, truth)
    n = len(judged)
    return {"questions": n, "status": dict(sorted(status.items())),
            "identical_rate": status["identical"] / n if n else None,
            "tie_rate": status["tie"] / n if n else None, "pairs": len(pairs),
            "chosen_right_rejected_wrong": right_wrong / len(pairs) if pairs else None,
            "pair_kinds": dict(sorted(collections.Counter(
                (question_kind(_question(p)) or ("", "other"))[1] for p in pairs).items()))}
