"""Document hooks and scoring of the stllava lmms-eval tasks (docs/Evaluation.md#lmms-eval).

lmms-eval loads this file beside the task YAMLs (``!function utils.…``); it imports no lmms-eval.
Scoring is :func:`stllava.eval.metrics.score` itself: each document's result carries its
``test.json`` record and the model's answer, and every aggregation scores the whole list with the
project's scorer and reports one of its ``overall`` numbers (×100, LLaVA-Med's definitions), so
lmms-eval's numbers are ``python -m stllava.eval.metrics``'s on the same answers.
"""
from __future__ import annotations

import json

from stllava.eval.metrics import score
from stllava.generation import load_rgb

# The reported metrics: the paper's two columns first (docs/Evaluation.md).
METRICS = ("open_recall", "closed_acc", "open_f1", "closed_acc_strict", "yes_no_acc_run_eval")


def doc_to_visual(doc: dict) -> list:
    """``[the question's image]``, decoded completely as RGB (ImageError naming the file)."""
    return [load_rgb(doc["image_path"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as model_vqa asks it (the stllava model adds ``<image>`` and the template)."""
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    """The reference answer (``conversations[1].value`` of the ``test.json`` record)."""
    return str(json.loads(doc["gt"])["conversations"][1]["value"])


def process_results(doc: dict, results: list) -> dict:
    """``{metric: {"gt", "prediction"}}`` for every metric of :data:`METRICS` (scored in the aggregations)."""
    item = {"gt": doc["gt"], "prediction": results[0]}
    return {metric: item for metric in METRICS}


def score_items(items: list[dict]) -> dict:
    """:func:`stllava.eval.metrics.score`'s ``overall`` for the ``process_results`` items."""
    gt = [json.loads(it["gt"]) for it in items]
    preds = [{"question_id": g["id"], "text": it["prediction"]} for g, it in zip(gt, items)]
    return score(gt, preds)["overall"]


def _metric(items: list[dict], name: str) -> float:
    value = score_items(items)[name]
    # The project reports None for a metric whose category is empty; lmms-eval's tables want a number.
    return float("nan") if value is None else value


def open_recall(items: list[dict]) -> float:
    return _metric(items, "open_recall")


def closed_acc(items: list[dict]) -> float:
    return _metric(items, "closed_acc")


def open_f1(items: list[dict]) -> float:
    return _metric(items, "open_f1")


def closed_acc_strict(items: list[dict]) -> float:
    return _metric(items, "closed_acc_strict")


def yes_no_acc_run_eval(items: list[dict]) -> float:
    return _metric(items, "yes_no_acc_run_eval")
