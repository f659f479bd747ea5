"""Closed-question scoring (stllava.eval.closed): LLaVA-Med run_eval.py's "yes/no accuracy" bit for
bit (its fixed last version b9a98a7, and its first release ad758b6), next to the batch scorer's
substring accuracy and our word-level variant. Every expected value below is worked out by hand
from the reference's nested ifs (see the module docstring)."""
import pytest

from stllava.eval import metrics
from stllava.eval.closed import (
    closed_hit,
    closed_hit_strict,
    yes_no_acc_run_eval,
    yes_no_hit_run_eval,
    yes_no_hit_run_eval_first_release,
)
from stllava.eval.metrics import normalize

# (answer, prediction, normalised prediction, run_eval.py first-release value, substring hit,
# word-level hit). First release: 1 = hit, 0 = miss, None = not appended (yes/no present, answer
# absent). The fixed version appends 0 where the first release appended nothing (None -> 0).
CASES = [
    ("yes", "Yes.", "yes", 1, True, True),
    ("no", "nodule", "nodule", 1, True, False),         # the trap: "no" is inside "nodule"
    ("yes", "nodule", "nodule", None, False, False),    # has "no" (in nodule), lacks "yes": not counted
    ("no", "Normal.", "normal", 1, True, False),        # "no" inside "normal"
    ("yes", "The heart.", "heart", 0, False, False),    # neither yes nor no: a counted miss
    ("left", "left", "left", 0, True, False),           # right answer, but no yes/no: a miss here
    ("left", "Yes, left.", "yes left", 1, True, True),
    ("no", "I know.", "i know", 1, True, False),        # "no" inside "know"
    ("yes", "No", "no", None, False, False),            # wrong yes/no answer: dropped, not a miss
    ("no", "Yes", "yes", None, False, False),
]


@pytest.mark.parametrize("answer,prediction,pred_norm,run_eval,substring,word", CASES)
def test_each_case_by_hand(answer, prediction, pred_norm, run_eval, substring, word):
    assert normalize(prediction) == pred_norm
    a = normalize(answer)
    assert yes_no_hit_run_eval_first_release(pred_norm, a) == run_eval
    assert yes_no_hit_run_eval(pred_norm, a) == (0 if run_eval is None else run_eval)
    assert closed_hit(pred_norm, a) is substring
    assert closed_hit_strict(pred_norm, a) is word


def test_accuracy_keeps_the_reference_float_bits():
    # sum/len*100, as run_eval.py computes it; 100*sum/len would give other bits
    assert yes_no_acc_run_eval([1, 0, 0]) == 33.33333333333333 != 100 * 1 / 3
    assert yes_no_acc_run_eval([1, 0, 0, 0, 0, 0, 0]) == 14.285714285714285 != 100.0 * 1 / 7
    assert yes_no_acc_run_eval([1, None, 0, None, 0]) == 33.33333333333333  # None: not appended
    assert yes_no_acc_run_eval([None, None]) == 0.0 and yes_no_acc_run_eval([]) == 0.0  # the reference's guard


def _gt(qid, answer, kind="CLOSED"):
    return {"id": qid, "image": "x.jpg", "answer_type": kind,
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": answer}]}


def test_score_reports_all_closed_metrics():
    gt = [_gt(i, a) for i, (a, *_) in enumerate(CASES)] + [_gt(99, "left lung", "OPEN")]
    preds = [{"question_id": i, "text": p} for i, (_, p, *_) in enumerate(CASES)] + [
        {"question_id": 99, "text": "left"}]
    o = metrics.score(gt, preds)["overall"]
    # run_eval.py, fixed: all 10 closed questions counted, 5 hits -> 5/10*100
    assert o["yes_no_n_run_eval"] == 10
    assert o["yes_no_acc_run_eval"] == 50.0 == (5 / 10) * 100
    # run_eval.py, first release: 7 appended (3 dropped), 5 hits -> 5/7*100
    assert o["yes_no_n_run_eval_first_release"] == 7
    assert o["yes_no_acc_run_eval_first_release"] == 71.42857142857143 == (5 / 7) * 100
    assert o["closed_acc"] == 60.0          # 6 of 10 closed answers are substrings (the paper's column)
    assert o["closed_acc_strict"] == 20.0   # 2 of 10 also hold yes/no as a word
    rows = metrics.score(gt, preds)["rows"]
    assert [r["yes_no_hit_run_eval_first_release"] for r in rows] == [c[3] for c in CASES] + [None]
    assert [r["yes_no_hit_run_eval"] for r in rows] == [0 if c[3] is None else c[3] for c in CASES] + [None]


def test_the_two_releases_differ_on_a_wrong_yes_no_answer():
    """The one example docs/Evaluation.md gives: answer "yes", prediction "No" — a miss for the fixed
    version, not counted at all by the first release."""
    o = metrics.score([_gt(0, "yes"), _gt(1, "no")], [{"question_id": 0, "text": "No"},
                                                      {"question_id": 1, "text": "No"}])["overall"]
    assert (o["yes_no_acc_run_eval"], o["yes_no_n_run_eval"]) == (50.0, 2)
    assert (o["yes_no_acc_run_eval_first_release"], o["yes_no_n_run_eval_first_release"]) == (100.0, 1)


def test_answering_one_word_to_everything():
    """What the first release printed for trivial answerers: 100 for "yes" and for "no" alike; the
    fixed version scores them like the substring accuracy here."""
    gt = [_gt(0, "yes"), _gt(1, "no"), _gt(2, "yes"), _gt(3, "left")]
    for word in ("yes", "no"):
        o = metrics.score(gt, [{"question_id": i, "text": word} for i in range(4)])["overall"]
        hits = 2 if word == "yes" else 1
        assert (o["yes_no_acc_run_eval_first_release"], o["yes_no_n_run_eval_first_release"]) == (100.0, hits)
        assert (o["yes_no_acc_run_eval"], o["yes_no_n_run_eval"]) == (hits / 4 * 100, 4)
        assert o["closed_acc"] == 100.0 * hits / 4


def test_no_closed_questions_gives_none():
    o = metrics.score([_gt(0, "lung", "OPEN")], [{"question_id": 0, "text": "lung"}])["overall"]
    assert o["yes_no_acc_run_eval"] is None and o["yes_no_n_run_eval"] == 0 and o["closed_acc"] is None
    assert o["yes_no_acc_run_eval_first_release"] is None and o["yes_no_n_run_eval_first_release"] == 0


def test_markdown_names_the_metric_and_its_denominator():
    gt = [_gt(i, a) for i, (a, *_) in enumerate(CASES)]
    preds = [{"question_id": i, "text": p} for i, (_, p, *_) in enumerate(CASES)]
    md = metrics.render_markdown(metrics.score(gt, preds)["overall"])
    assert "| Yes/no acc (LLaVA-Med run_eval.py) | 50.00 |" in md
    assert "| Yes/no acc (run_eval.py first release) | 71.43 |" in md
    assert "| Yes/no acc (first release): questions counted | 7 of 10 |" in md
    assert "| Closed acc (substring, paper) | 60.00 |" in md and "| Closed acc (strict: yes/no word) | 20.00 |" in md
