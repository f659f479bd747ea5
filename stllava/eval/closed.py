"""Closed-question (yes/no) scoring: the variants reported by :mod:`stllava.eval.metrics`.

All three read the *normalised* answer ``a`` and prediction ``p`` (one pass of
:func:`stllava.eval.metrics.normalize`, as both LLaVA-Med scorers do):

``closed_acc`` — :func:`closed_hit`
    LLaVA-Med v1.0's batch scorer ``llava/eval/run_eval_batch.py``, behind the paper's "Closed"
    column: ``a`` is a substring of ``p``. Every closed question counts.

``yes_no_acc_run_eval`` — :func:`yes_no_hit_run_eval`, :func:`yes_no_acc_run_eval`
    LLaVA-Med's single-file scorer ``llava/eval/run_eval.py``, ``evaluate()``, its "yes/no
    accuracy" in the file's last version (commit b9a98a7, "fix closed accuracy calculation")::

        if 'yes' in pred_value or 'no' in pred_value:
            if gt_value in pred_value:
                closed_scores['hit'].append(1)
            else:
                closed_scores['hit'].append(0)
        else:
            closed_scores['hit'].append(0)
        ...
        closed_score = sum(closed_scores['hit']) / len(closed_scores['hit']) if len(...) != 0 else 0.0
        ... closed_score*100

    Every closed question counts; a hit needs ``'yes'`` or ``'no'`` as a *substring* of the
    prediction (so "nodule", "normal", "know" pass that test) and the answer as a substring.

``yes_no_acc_run_eval_first_release`` — :func:`yes_no_hit_run_eval_first_release`
    The same file's first release (commit ad758b6), whose inner ``if`` has no ``else``: a
    prediction that contains yes/no but not the answer is left out of the denominator instead of
    counting as a miss, so answering "yes" to every yes/no question scores 100.0. Kept, under a
    name that says which release, to compare with numbers computed by that version.

``closed_acc_strict`` — :func:`closed_hit_strict` (ours, not a reference metric)
    ``a`` is a substring of ``p`` AND ``yes`` or ``no`` is a whole *word* of ``p``; every closed
    question counts. A word-level reading of "requires yes/no", documented as our own.
"""
from __future__ import annotations

from typing import Iterable


def closed_hit(prediction_norm: str, answer_norm: str) -> bool:
    """Batch-scorer closed hit: the normalised answer is a substring of the normalised
    prediction (so "no" hits "nodule"). Inputs must already be normalised."""
    return answer_norm in prediction_norm


def closed_hit_strict(prediction_norm: str, answer_norm: str) -> bool:
    """Word-level closed hit (ours): :func:`closed_hit` AND the prediction holds "yes" or "no" as a
    whole word, so "nodule" alone does not count. Not LLaVA-Med's ``run_eval.py`` (see
    :func:`yes_no_hit_run_eval`)."""
    words = prediction_norm.split()
    return closed_hit(prediction_norm, answer_norm) and ("yes" in words or "no" in words)


def yes_no_hit_run_eval(prediction_norm: str, answer_norm: str) -> int:
    """What LLaVA-Med ``run_eval.py`` (last version, b9a98a7) appends to its closed hit list for one
    closed question: 1 when ``'yes'`` or ``'no'`` is a *substring* of the prediction and the answer
    is a substring of it, else 0. Inputs must already be normalised."""
    return int(("yes" in prediction_norm or "no" in prediction_norm) and answer_norm in prediction_norm)


def yes_no_hit_run_eval_first_release(prediction_norm: str, answer_norm: str) -> int | None:
    """What ``run_eval.py``'s first release (ad758b6) appends: as :func:`yes_no_hit_run_eval`, except
    None (nothing appended: not counted) when yes/no is there but the answer is not. Inputs must
    already be normalised."""
    if "yes" in prediction_norm or "no" in prediction_norm:
        return 1 if answer_norm in prediction_norm else None
    return 0


def yes_no_acc_run_eval(hits: Iterable[int | None]) -> float:
    """``run_eval.py``'s "yes/no accuracy" from :func:`yes_no_hit_run_eval` (or
    :func:`yes_no_hit_run_eval_first_release`) values (None = not appended): ``sum / len * 100``
    over the appended values, in ``run_eval.py``'s order of operations (so the float is
    bit-identical), 0.0 when nothing was appended."""
    appended = [h for h in hits if h is not None]
    closed_score = sum(appended) / len(appended) if len(appended) != 0 else 0.0
    return closed_score * 100
