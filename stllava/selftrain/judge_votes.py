"""Combining judge verdicts: the swap check (both answer orders) and a majority of several judges.

Pure functions over the verdicts of :mod:`stllava.selftrain.judge_prompt` (``verdict`` for two
answers, ``best_worst`` for K > 2): dicts with ``status`` ("ok", "tie", "unparsable"), ``scores``
(one per answer, in the record's answer order), ``chosen`` (and ``rejected`` for K > 2) and
``margin``. No HTTP here; docs/SelfTraining.md#de-biased-judging says why and how they are used.
"""
from __future__ import annotations

from collections import Counter

INCONSISTENT = "inconsistent"   # the swap check: the two orders do not prefer the same answer
NO_MAJORITY = "no_majority"     # several judges: no strict majority prefers the same answer


def _choice(v: dict) -> tuple[int, int | None]:
    """What a decided verdict prefers: (chosen, rejected); rejected None for two answers."""
    return v["chosen"], v.get("rejected")


def _mean_scores(verdicts: list[dict]) -> list[float | None]:
    """Per answer, the mean of the verdicts' scores (None where any verdict has none)."""
    columns = zip(*(v["scores"] for v in verdicts))
    return [None if any(s is None for s in col) else sum(col) / len(col) for col in columns]


def _decided(verdicts: list[dict], template: dict) -> dict:
    """An "ok" verdict preferring what every one of ``verdicts`` prefers, scores and margin averaged."""
    chosen, rejected = _choice(verdicts[0])
    scores = _mean_scores(verdicts)
    other = rejected if rejected is not None else 1 - chosen
    out = {**{k: None for k in template}, "status": "ok", "scores": scores, "chosen": chosen,
           "margin": scores[chosen] - scores[other]}
    if "rejected" in template:
        out["rejected"] = rejected
    return out


def _undecided(status: str, template: dict, scores: list | None = None) -> dict:
    return {**{k: None for k in template}, "status": status, "scores": scores}


def swap_checked(first: dict, swapped: dict) -> dict:
    """The verdict of a pair asked in both orders (``first``: as published, Answer 1 = the record's
    first answer; ``swapped``: the answers exchanged, its scores and indices already mapped back to
    the record's answer order). Returns a verdict dict of the same keys:

    * "unparsable" when either order's reply gave no scores;
    * "tie" when both orders tie;
    * "ok" when both prefer the same answer (for two answers: the same sign of the score
      difference), its scores the mean of the two orders';
    * "inconsistent" otherwise: they prefer different answers, or one order ties and the other does
      not (a tie in either order is no verdict).
    """
    pair = [first, swapped]
    if any(v["status"] == "unparsable" for v in pair):
        return _undecided("unparsable", first)
    if all(v["status"] == "tie" for v in pair):
        return {**_undecided("tie", first, _mean_scores(pair)), "margin": 0.0}
    if all(v["status"] == "ok" for v in pair) and _choice(first) == _choice(swapped):
        return _decided(pair, first)
    return _undecided(INCONSISTENT, first)


def position_consistent(first: dict, swapped: dict) -> bool | None:
    """Whether the two orders agree: True (same preference, or both tie), False (a position effect:
    different preferences, or a tie in one order only), None (a reply without scores: unknown)."""
    if "unparsable" in (first["status"], swapped["status"]):
        return None
    if first["status"] == swapped["status"] == "tie":
        return True
    return first["status"] == swapped["status"] == "ok" and _choice(first) == _choice(swapped)


def majority(verdicts: list[dict]) -> dict:
    """The verdict of a panel of judges (each verdict already swap-checked when asked for).

    "ok" when a strict majority of the judges (more than half: with two judges both) prefers the
    same answer, its scores the mean of those judges' scores; otherwise the judges' common status
    when they all share one (all "tie", all "unparsable", all "inconsistent"), else "no_majority".
    """
    votes = Counter(_choice(v) for v in verdicts if v["status"] == "ok")
    if votes:
        choice, n = votes.most_common(1)[0]
        if 2 * n > len(verdicts):
            return _decided([v for v in verdicts if v["status"] == "ok" and _choice(v) == choice], verdicts[0])
    statuses = {v["status"] for v in verdicts} - {"ok"}
    common = statuses.pop() if len(statuses) == 1 and not votes else NO_MAJORITY
    return _undecided(common, verdicts[0])
