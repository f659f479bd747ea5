"""LLaVA-Med VQA scoring, reproduced exactly (docs/Method.md#evaluation).

The reference is LLaVA-Med v1.0 ``llava/eval/run_eval_batch.py`` (the batch scorer behind the
paper numbers) with ``eval_metrics/glossary.py`` (normalisation) and
``eval_metrics/evaluate_metrics.py`` (token metrics). Its quirks are kept on purpose:

* the punctuation rule looks at the ORIGINAL string (not the one being rewritten);
* the period regex is ``(?!<=\\d)(\\.)(?!\\d)`` (a look-*ahead* typo for a look-behind: in effect
  "a period not followed by a digit") and the reference passed ``re.UNICODE`` (= 32) positionally
  into ``count``: at most 32 periods are removed per pass;
* the batch scorer normalises both strings once, and the token metrics normalise them again,
  so a 33rd+ period can still disappear in the second pass;
* token counts are multisets, and tp sums the *prediction's* count of shared words, so a
  repeated word in the prediction inflates recall (``"left left"`` vs ``"left lung"`` → 2/3).

Closed (yes/no) questions are scored four ways (:mod:`stllava.eval.closed`): ``closed_acc`` (the
batch scorer, the paper's column), ``yes_no_acc_run_eval`` (LLaVA-Med's ``run_eval.py`` "yes/no
accuracy" in its fixed last version, bit for bit), ``yes_no_acc_run_eval_first_release`` (the
same file's first release, which drops wrong yes/no answers from the denominator) and
``closed_acc_strict`` (ours: yes/no as a whole word).

Public API: :func:`normalize_word`, :func:`normalize`, :func:`token_scores`,
:func:`exact_match`, :func:`closed_hit`, :func:`closed_hit_strict`, :func:`yes_no_hit_run_eval`,
:func:`score`.
CLI: ``python -m stllava.eval.metrics --gt test.json --pred answers.jsonl [--out DIR]``.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import pathlib
import sys
from typing import Any, Iterable

from stllava import logs
from stllava.errors import StllavaError, run_cli
from stllava.eval.closed import (
    closed_hit,
    closed_hit_strict,
    yes_no_acc_run_eval,
    yes_no_hit_run_eval,
    yes_no_hit_run_eval_first_release,
)
from stllava.eval.glossary import (
    ARTICLES,
    COMMA_STRIP,
    CONTRACTIONS,
    NUMBER_WORDS,
    PERIOD_CAP,
    PERIOD_STRIP,
    PUNCTUATION,
)
from stllava.jsonl import JsonlError, read_jsonl, read_utf8

logger = logging.getLogger(__name__)

OPEN, CLOSED = "OPEN", "CLOSED"

# Per-question CSV columns (also read by stllava.eval.report).
ROW_FIELDS = ["question_id", "answer_type", "question", "answer", "prediction", "answer_norm",
              "prediction_norm", "recall", "precision", "f1", "exact_match", "open_hit",
              "closed_hit", "closed_hit_strict", "yes_no_hit_run_eval", "yes_no_hit_run_eval_first_release"]


class EvalInputError(StllavaError, ValueError):
    """Ground-truth or prediction input that cannot be scored; the message names the fix."""


# --- normalisation --------------------------------------------------------------------------
def normalize_word(text: str, period_cap: int | None = PERIOD_CAP) -> str:
    """One pass of LLaVA-Med's ``normalize_word``; returns the normalised string.

    ``period_cap`` is the number of periods removed per pass (32 reproduces LLaVA-Med;
    ``None`` removes all). Does not lower-case before the punctuation rule (the caller does).
    """
    original = text
    digit_comma = COMMA_STRIP.search(original) is not None
    out = text
    for p in PUNCTUATION:
        # The condition reads the ORIGINAL string, not `out` (reference behaviour).
        if (p + " " in original or " " + p in original) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_STRIP.sub("", out, count=period_cap or 0)
    words = []
    for word in out.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def normalize(text: str, period_cap: int | None = PERIOD_CAP) -> str:
    """The batch scorer's first pass: lower-case, then :func:`normalize_word`."""
    return normalize_word(text.lower(), period_cap)


def _counts(text: str) -> collections.Counter:
    return collections.Counter(text.lower().split())


# --- token metrics (each normalises its inputs again, as LLaVA-Med's do) -----------------------
def token_scores(prediction: str, reference: str) -> tuple[float, float, float]:
    """Return ``(f1, precision, recall)`` of LLaVA-Med's ``calculate_f1score``.

    Both strings are normalised (again) first. tp = Σ prediction counts of shared words,
    fp = Σ counts of prediction-only words, fn = Σ counts of reference-only words.
    Returns zeros when either side is empty or tp == 0.
    """
    cand, ref = _counts(normalize_word(prediction)), _counts(normalize_word(reference))
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in cand.items() if w in ref)
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match(prediction: str, reference: str) -> float:
    """LLaVA-Med's "exact match" (a misnomer): distinct reference words present in the
    prediction ÷ number of prediction tokens; 0 for an empty prediction. Normalises again."""
    cand, ref = _counts(normalize_word(prediction)), _counts(normalize_word(reference))
    total = sum(cand.values())
    if total == 0:
        return 0.0
    return sum(1 for w in ref if w in cand) / total


# --- input handling ---------------------------------------------------------------------------
def _gt_fields(item: Any, index: int) -> tuple[str, str, str, str]:
    """Return (id, answer_type, question, answer) of one test-file item, or raise."""
    where = f"ground-truth item {index}"
    if not isinstance(item, dict):
        raise EvalInputError(f"{where}: expected an object, got {type(item).__name__}; "
                             "fix: the --gt file must be a JSON list of test records")
    if "id" not in item:
        raise EvalInputError(f"{where}: no 'id'; fix: regenerate with stllava.eval.convert")
    qid = str(item["id"])
    conv = item.get("conversations", item.get("conversatons"))
    if (not isinstance(conv, list) or len(conv) < 2
            or not all(isinstance(turn, dict) for turn in conv[:2])):
        raise EvalInputError(f"{where} (id {qid}): 'conversations' must list a human turn and a "
                             "gpt turn; fix: regenerate with stllava.eval.convert")
    answer = conv[1].get("value")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise EvalInputError(f"{where} (id {qid}): conversations[1].value must be the answer "
                             f"string, got {answer!r}")
    answer_type = item.get("answer_type")
    if answer_type not in (OPEN, CLOSED):
        raise EvalInputError(f"{where} (id {qid}): answer_type {answer_type!r} is not OPEN or "
                             "CLOSED; fix: the converter must label every question")
    question = str(conv[0].get("value", "")).replace("<image>", "").strip()
    return qid, answer_type, question, answer


def _preview(ids: Iterable[str], n: int = 5) -> str:
    ids = list(ids)
    return ", ".join(ids[:n]) + (f", … ({len(ids)} in all)" if len(ids) > n else "")


def _index_predictions(pred_items: list[dict]) -> dict[str, str]:
    """Map question_id (as str) → prediction text; refuses duplicates and bad records."""
    preds: dict[str, str] = {}
    dups = []
    for i, item in enumerate(pred_items):
        if not isinstance(item, dict) or "question_id" not in item or "text" not in item:
            raise EvalInputError(f"prediction record {i}: needs 'question_id' and 'text'; "
                                 "fix: use the answers file written by stllava.eval.model_vqa")
        text = item["text"]
        if not isinstance(text, str):
            raise EvalInputError(f"prediction record {i} (question_id {item['question_id']}): "
                                 f"'text' must be a string, got {text!r}")
        qid = str(item["question_id"])
        if qid in preds:
            dups.append(qid)
        preds[qid] = text
    if dups:
        raise EvalInputError(f"{len(dups)} duplicate prediction question_id(s): {_preview(dups)}; "
                             "fix: concatenate each chunk once / remove the repeated lines")
    return preds


def _mean100(values: list[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


# --- scoring ----------------------------------------------------------------------------------
def score(gt_items: list[dict], pred_items: list[dict], allow_missing: bool = False) -> dict:
    """Score predictions against a LLaVA-Med test file.

    Returns ``{"overall": {...}, "rows": [...]}``. ``overall`` holds counts and ×100 metrics:
    ``open_recall`` (the paper's "Open"), ``open_f1``, ``open_precision``, ``exact_match``,
    ``open_hit`` (batch scorer's "open accuracy": answer substring of prediction),
    ``closed_acc`` (substring hit — the paper's "Closed"), ``yes_no_acc_run_eval`` (``run_eval.py``'s
    "yes/no accuracy", with ``yes_no_n_run_eval`` closed questions in its denominator; the first
    release's number as ``yes_no_acc_run_eval_first_release`` / ``yes_no_n_run_eval_first_release``),
    ``closed_acc_strict`` and ``closed_recall`` (see :mod:`stllava.eval.closed`); a metric is
    ``None`` when its category has no items. ``rows`` holds one dict per scored question (fields
    :data:`ROW_FIELDS`; ``yes_no_hit_run_eval_first_release`` None = not counted by ``run_eval.py``'s first release), in
    ground-truth order.

    Refuses: duplicate ids, predictions for unknown ids, and (unless ``allow_missing``)
    ground-truth questions without a prediction; the error gives counts and the first ids.
    """
    gt = [_gt_fields(item, i) for i, item in enumerate(gt_items)]
    gt_ids = [g[0] for g in gt]
    dup_gt = [q for q, n in collections.Counter(gt_ids).items() if n > 1]
    if dup_gt:
        raise EvalInputError(f"{len(dup_gt)} duplicate ground-truth id(s): {_preview(dup_gt)}")
    preds = _index_predictions(pred_items)
    known = set(gt_ids)
    unknown = [q for q in preds if q not in known]
    if unknown:
        raise EvalInputError(f"{len(unknown)} of {len(preds)} predictions have question_ids not in "
                             f"the ground truth: {_preview(unknown)}; fix: score against the "
                             "test file the questions came from")
    missing = [q for q in gt_ids if q not in preds]
    if missing and not allow_missing:
        raise EvalInputError(f"{len(missing)} of {len(gt_ids)} ground-truth questions have no "
                             f"prediction: {_preview(missing)}; fix: finish answering (all chunks) "
                             "or pass allow_missing / --allow-missing to score the subset")
    if missing:
        logger.warning("scoring %d of %d questions; %d have no prediction (allow_missing)",
                       len(gt_ids) - len(missing), len(gt_ids), len(missing))

    rows = []
    for qid, answer_type, question, answer in gt:
        if qid not in preds:
            continue
        prediction = preds[qid]
        gt_norm, pred_norm = normalize(answer), normalize(prediction)  # batch scorer pass 1
        f1, precision, recall = token_scores(pred_norm, gt_norm)      # pass 2 inside
        is_open = answer_type == OPEN
        rows.append({
            "question_id": qid, "answer_type": answer_type, "question": question,
            "answer": answer, "prediction": prediction, "answer_norm": gt_norm,
            "prediction_norm": pred_norm, "recall": recall, "precision": precision, "f1": f1,
            "exact_match": exact_match(pred_norm, gt_norm) if is_open else None,
            "open_hit": float(gt_norm in pred_norm) if is_open else None,
            "closed_hit": None if is_open else float(closed_hit(pred_norm, gt_norm)),
            "closed_hit_strict": None if is_open else float(closed_hit_strict(pred_norm, gt_norm)),
            "yes_no_hit_run_eval": None if is_open else yes_no_hit_run_eval(pred_norm, gt_norm),
            "yes_no_hit_run_eval_first_release":
                None if is_open else yes_no_hit_run_eval_first_release(pred_norm, gt_norm),
        })
    opened = [r for r in rows if r["answer_type"] == OPEN]
    closed = [r for r in rows if r["answer_type"] == CLOSED]
    overall = {
        "n_questions": len(gt_ids), "n_scored": len(rows), "n_missing": len(missing),
        "n_open": len(opened), "n_closed": len(closed),
        "open_recall": _mean100([r["recall"] for r in opened]),
        "open_f1": _mean100([r["f1"] for r in opened]),
        "open_precision": _mean100([r["precision"] for r in opened]),
        "exact_match": _mean100([r["exact_match"] for r in opened]),
        "open_hit": _mean100([r["open_hit"] for r in opened]),
        "closed_acc": _mean100([r["closed_hit"] for r in closed]),
        "closed_acc_strict": _mean100([r["closed_hit_strict"] for r in closed]),
        "closed_recall": _mean100([r["recall"] for r in closed]),
        # None without closed questions, like every metric here (docs/Differences.md#eval-empty).
        "yes_no_acc_run_eval": yes_no_acc_run_eval(r["yes_no_hit_run_eval"] for r in closed) if closed else None,
        "yes_no_n_run_eval": sum(r["yes_no_hit_run_eval"] is not None for r in closed),
        "yes_no_acc_run_eval_first_release":
            yes_no_acc_run_eval(r["yes_no_hit_run_eval_first_release"] for r in closed) if closed else None,
        "yes_no_n_run_eval_first_release": sum(r["yes_no_hit_run_eval_first_release"] is not None for r in closed),
    }
    return {"overall": overall, "rows": rows}


# --- files ------------------------------------------------------------------------------------
# Display names; the first three are the paper's columns.
METRIC_LABELS = {
    "open_recall": "Open recall",
    "open_f1": "Open F1",
    "closed_acc": "Closed acc (substring, paper)",
    "closed_acc_strict": "Closed acc (strict: yes/no word)",
    "yes_no_acc_run_eval": "Yes/no acc (LLaVA-Med run_eval.py)",
    "yes_no_acc_run_eval_first_release": "Yes/no acc (run_eval.py first release)",
    "exact_match": "Exact match*",
    "open_precision": "Open precision",
    "open_hit": "Open hit",
    "closed_recall": "Closed recall",
}


def load_gt(path: str | pathlib.Path) -> list[dict]:
    """Load a test JSON list; refuses anything else, naming the file."""
    path = pathlib.Path(path)
    try:
        data = json.loads(read_utf8(path))  # not UTF-8: EncodingError naming the line and byte
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalInputError(f"{path}: cannot read ground truth ({exc}); fix: pass the test.json "
                             "written by stllava.eval.convert") from exc
    if not isinstance(data, list):
        raise EvalInputError(f"{path}: expected a JSON list of test records, got "
                             f"{type(data).__name__}")
    return data


def load_jsonl(path: str | pathlib.Path) -> list[dict]:
    """Load an answers JSONL file (blank lines skipped); refuses a bad line, naming its number."""
    try:
        return read_jsonl(path)
    except JsonlError as exc:
        raise EvalInputError(f"{exc} (a truncated last line means an interrupted answering "
                             "run: re-answer)") from exc


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_markdown(overall: dict, title: str = "") -> str:
    """Return a small markdown table of one result."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| Metric | Value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(overall.get(key))} |" for key, label in METRIC_LABELS.items()]
    lines += [f"| Questions (open / closed) | {overall['n_scored']} "
              f"({overall['n_open']} / {overall['n_closed']}) |"]
    if overall.get("n_missing"):
        lines.append(f"| Missing predictions | {overall['n_missing']} |")
    if overall.get("yes_no_acc_run_eval_first_release") is not None:
        lines.append(f"| Yes/no acc (first release): questions counted | "
                     f"{overall['yes_no_n_run_eval_first_release']} of {overall['n_closed']} |")
    lines += ["", "Closed acc (substring) is LLaVA-Med's batch scorer (the paper's column). Yes/no acc is "
              "LLaVA-Med run_eval.py's number, exactly: a hit needs 'yes' or 'no' as a substring and the "
              "answer; every closed question counts. Its first release left a prediction with yes/no but "
              "not the answer out of the denominator. Strict (ours) needs "
              "the answer and yes or no as a word. *Exact match = distinct answer words found ÷ "
              "prediction tokens (LLaVA-Med's name)."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str | pathlib.Path, meta: dict) -> None:
    """Write ``metrics.json`` (meta + overall), ``per_question.csv`` and ``metrics.md``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({**meta, "overall": result["overall"]}, indent=2)
                                      + "\n", encoding="utf-8")
    with (out / "per_question.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(result["rows"])
    title = meta.get("benchmark") or pathlib.Path(meta.get("gt", "")).parent.name
    (out / "metrics.md").write_text(render_markdown(result["overall"], title), encoding="utf-8")


def _benchmark_of(gt_path: pathlib.Path) -> str | None:
    stats = gt_path.parent / "stats.json"
    if stats.exists():
        try:
            return json.loads(stats.read_text(encoding="utf-8")).get("benchmark")
        except json.JSONDecodeError:
            logger.warning("%s: not JSON; benchmark name unknown", stats)
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(prog="python -m stllava.eval.metrics",
                                     description="Score VQA answers with the LLaVA-Med metrics.")
    parser.add_argument("--gt", required=True, help="test JSON (stllava.eval.convert output)")
    parser.add_argument("--pred", required=True, help="answers JSONL (question_id, text)")
    parser.add_argument("--out", help="folder for metrics.json, per_question.csv, metrics.md")
    parser.add_argument("--benchmark", help="name stored in metrics.json (default: the "
                        "'benchmark' of stats.json beside --gt)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score only the answered questions (counted as n_missing)")
    logs.add_log_level_arg(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    gt_path = pathlib.Path(args.gt)
    try:
        result = score(load_gt(gt_path), load_jsonl(args.pred), allow_missing=args.allow_missing)
    except OSError as exc:
        raise EvalInputError(f"{exc}; fix: check the --gt / --pred paths") from None
    meta = {"benchmark": args.benchmark or _benchmark_of(gt_path), "gt": str(gt_path),
            "pred": str(args.pred), "allow_missing": args.allow_missing}
    if args.out:
        write_outputs(result, args.out, meta)
        logger.info("wrote %s/{metrics.json,per_question.csv,metrics.md}", args.out)
    print(render_markdown(result["overall"], meta["benchmark"] or ""), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input; see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
