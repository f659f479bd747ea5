"""Stage 2(e): judged answers -> the DPO training JSON (docs/Method.md#pairs).

    python -m stllava.selftrain.build_pairs --judged judged.jsonl --out dpo.json [--min-margin 1]

Input: the judge's output (see :mod:`stllava.selftrain.judge`). Output: a JSON list, one pair per
judged question with status "ok" and a score margin >= ``--min-margin``, in the schema of the
released ``ZachSun/STLLaVA-Med-DPO`` data plus provenance::

    {"id": question_id, "image": image,
     "chosen_conversations": [{"from": "human", "value": "<image>\\n" + q}, {"from": "gpt", "value": chosen}],
     "reject_conversations": [{"from": "human", "value": "<image>\\n" + q}, {"from": "gpt", "value": rejected}],
     "scores": {"chosen": s_c, "rejected": s_r}, "margin": s_c - s_r, "chosen_index": 0 or 1,
     "judge": model, "rule_version": ..., "rationale": the judge's explanation (reply minus score line),
     "provenance": {every other field of the answers record: model, seeds, ...}}

Ties, unparsable replies, identical answers, the judge's "no verdict" records (``inconsistent``:
the two answer orders of ``--swap-check`` disagreed; ``no_majority``: the ``--judges`` did not
agree) and pairs below the margin are never turned into pairs; they are counted. A question or
answer that itself contains the ``<image>`` token would give the sample two image tokens and break
training, so it is skipped and counted too, as is a pair with an empty answer (a sample that ended
at once), which no training turn may be. The counts and a margin histogram are printed and written
to ``<out>.stats.json`` (``dpo.json`` -> ``dpo.stats.json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Iterable

from stllava import logs
from stllava.constants import DEFAULT_IMAGE_TOKEN
from stllava.errors import StllavaError, run_cli
from stllava.jsonl import iter_jsonl, write_json_atomic

logger = logging.getLogger("stllava.selftrain.build_pairs")

CORE_FIELDS = ("question_id", "image", "question", "answers", "judge")
# "inconsistent": --swap-check's two orders disagreed; "no_majority": --judges found no majority
NOT_PAIRS = ("tie", "unparsable", "identical", "inconsistent", "no_majority")


class PairsError(StllavaError, ValueError):
    """The judged file cannot be turned into pairs; the message names the file and line."""


def conversation(question: str, answer: str) -> list[dict]:
    """``[{"from": "human", "value": "<image>\\n" + question}, {"from": "gpt", "value": answer}]``."""
    return [{"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer}]


def rationale(reply: str | None) -> str:
    """The judge's explanation: its reply without the first (score) line."""
    if not reply:
        return ""
    lines = reply.strip().splitlines()
    return "\n".join(lines[1:]).strip()


def rejected_index(judge: dict) -> int:
    """The rejected answer: the judge's ``rejected`` (best against worst of K > 2 answers), else the
    other one of two."""
    return judge["rejected"] if judge.get("rejected") is not None else 1 - judge["chosen"]


def make_pair(record: dict) -> dict:
    """The DPO pair of one judged record with status "ok" (see the module docstring)."""
    judge = record["judge"]
    chosen, rejected = judge["chosen"], rejected_index(judge)
    scores = judge["scores"]
    q, answers = record["question"], record["answers"]
    return {
        "id": str(record["question_id"]),
        "image": record["image"],
        "chosen_conversations": conversation(q, answers[chosen]),
        "reject_conversations": conversation(q, answers[rejected]),
        "scores": {"chosen": scores[chosen], "rejected": scores[rejected]},
        "margin": scores[chosen] - scores[rejected],
        "chosen_index": chosen,
        "judge": judge.get("model"),
        "rule_version": judge.get("rule_version"),
        "rationale": rationale(judge.get("reply")),
        "provenance": {k: v for k, v in record.items() if k not in CORE_FIELDS},
    }


def _check(record: dict) -> str | None:
    """What makes ``record`` unusable as a judged record, or None."""
    missing = [k for k in CORE_FIELDS if k not in record]
    if missing:
        return f"missing field(s) {missing} (is this the judge's output?)"
    judge = record["judge"]
    if not isinstance(judge, dict) or judge.get("status") not in ("ok", *NOT_PAIRS):
        return f"field 'judge' has no known 'status' ({', '.join(('ok', *NOT_PAIRS))})"
    answers = record["answers"]
    if not (isinstance(answers, list) and len(answers) >= 2):
        return "field 'answers' must hold at least two answers"
    if judge["status"] == "ok":
        scores, chosen, rejected = judge.get("scores"), judge.get("chosen"), judge.get("rejected")
        k = len(answers)
        if not (isinstance(scores, list) and len(scores) == k and chosen in range(k)
                and (rejected in range(k) if k > 2 or rejected is not None else True)
                and scores[chosen] is not None and scores[rejected_index(judge)] is not None
                and scores[chosen] > scores[rejected_index(judge)]):
            return "status 'ok' needs a score per answer and 'chosen' pointing at the higher one (than 'rejected')"
    return None


def _margin_bin(margin: float) -> str:
    k = min(int(math.floor(margin)), 9)
    return "[9,inf)" if k == 9 else f"[{k},{k + 1})"


def build_pairs(lines: Iterable[tuple[int, dict]], *, source: str = "<judged>",
                min_margin: float = 0.0, max_per_question: int | None = None) -> tuple[list[dict], dict]:
    """(pairs, stats) from ``(line_number, judged record)`` pairs, pairs in input order.

    Refuses (PairsError naming ``source`` and the line) a record that is not a judged record or
    repeats an id. ``stats``: counts per outcome, how often answer 1 / answer 2 was chosen, the
    margin histogram over every "ok" record (before the --min-margin filter), judges used.
    ``max_per_question`` keeps at most that many pairs per distinct question text (the first ones,
    in input order; the rest are counted as ``over_question_cap``): a model asks some questions far
    more often than others, and uncapped, its most frequent question would dominate the pairs.
    """
    pairs: list[dict] = []
    seen: dict[str, int] = {}
    stats = {"judged": 0, "pairs": 0, "tie": 0, "unparsable": 0, "identical": 0, "inconsistent": 0,
             "no_majority": 0, "below_margin": 0,
             "image_token_in_text": 0, "empty_answer": 0, "over_question_cap": 0, "min_margin": min_margin,
             "max_per_question": max_per_question,
             "chosen_position": {"answer1": 0, "answer2": 0}, "margin_histogram": {}, "judges": {}}
    hist: dict[int, int] = {}
    per_question: dict[str, int] = {}
    for line, record in lines:
        problem = _check(record)
        if problem:
            raise PairsError(f"{source}, line {line}: {problem}")
        qid = str(record["question_id"])
        if qid in seen:
            raise PairsError(f"{source}, line {line}: question_id {qid!r} already used on line {seen[qid]}")
        seen[qid] = line
        stats["judged"] += 1
        judge = record["judge"]
        name = f"{judge.get('model')} / {judge.get('rule_version')}"
        stats["judges"][name] = stats["judges"].get(name, 0) + 1
        if judge["status"] != "ok":
            stats[judge["status"]] += 1
            continue
        pair = make_pair(record)
        k = min(int(math.floor(pair["margin"])), 9)
        hist[k] = hist.get(k, 0) + 1
        if pair["margin"] < min_margin:
            stats["below_margin"] += 1
            continue
        texts = [record["question"], *record["answers"]]
        if any(DEFAULT_IMAGE_TOKEN in t for t in texts):
            logger.warning("%s, line %d: skipping %s: its text contains %s", source, line, qid, DEFAULT_IMAGE_TOKEN)
            stats["image_token_in_text"] += 1
            continue
        if not all(c[1]["value"].strip() for c in (pair["chosen_conversations"], pair["reject_conversations"])):
            # a sampled answer can be empty (</s> first); a training turn cannot
            logger.warning("%s, line %d: skipping %s: an answer of the pair is empty", source, line, qid)
            stats["empty_answer"] += 1
            continue
        key = record["question"].strip().lower()
        if max_per_question is not None and per_question.get(key, 0) >= max_per_question:
            stats["over_question_cap"] += 1
            continue
        per_question[key] = per_question.get(key, 0) + 1
        position = f"answer{pair['chosen_index'] + 1}"
        stats["chosen_position"][position] = stats["chosen_position"].get(position, 0) + 1
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    stats["margin_histogram"] = {_margin_bin(k): hist[k] for k in sorted(hist)}
    if len(stats["judges"]) > 1:
        logger.warning("%s mixes judges or rule versions: %s", source, stats["judges"])
    return pairs, stats


def stats_path(out: str | Path) -> Path:
    """``dpo.json`` -> ``dpo.stats.json``."""
    return Path(out).with_suffix(".stats.json")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m stllava.selftrain.build_pairs",
                                description="Judged answers -> DPO training JSON (docs/Method.md#pairs).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--judged", required=True, help="judged.jsonl written by stllava.selftrain.judge")
    p.add_argument("--out", required=True, help="DPO JSON to write (stats go to <out>.stats.json)")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="keep a pair only when score(chosen) - score(rejected) >= this")
    p.add_argument("--max-per-question", type=int, default=None,
                   help="keep at most this many pairs per distinct question text (default: no cap)")
    logs.add_log_level_arg(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    try:
        if args.max_per_question is not None and args.max_per_question < 1:
            raise PairsError(f"--max-per-question must be ≥ 1, got {args.max_per_question}")
        pairs, stats = build_pairs(iter_jsonl(args.judged), source=str(args.judged), min_margin=args.min_margin,
                                   max_per_question=args.max_per_question)
    except FileNotFoundError:
        raise PairsError(f"{args.judged}: judged file not found; fix: --judged") from None
    stats = {"judged_file": str(args.judged), "out": str(args.out), **stats}
    write_json_atomic(args.out, pairs)
    write_json_atomic(stats_path(args.out), stats)
    if not pairs:
        logger.warning("no pairs kept: see the counts below")
    logger.info("wrote %d pairs to %s (stats: %s)", len(pairs), args.out, stats_path(args.out))
    print(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 2 on a bad judged file (see stllava.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
