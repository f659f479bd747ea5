"""Golden tests of the LLaVA-Med scoring (docs/Method.md#evaluation). Every expected value is hand-computed."""
import json

import pytest

from stllava.eval import convert, metrics
from stllava.eval.metrics import (
    EvalInputError,
    closed_hit,
    closed_hit_strict,
    exact_match,
    normalize,
    normalize_word,
    score,
    token_scores,
)


# --- normalisation ----------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                 # docs/Method.md#normalisation examples
    ("x-ray", "x ray"),
    ("ct/mri", "ct mri"),
    ("1,000", "1000"),
    ("two nodules", "2 nodules"),
    ("3.4 cm.", "3.4 cm"),           # a period before a digit stays, the final one goes
])
def test_normalize_spec_examples(raw, expected):
    assert normalize(raw) == expected


def test_punctuation_space_branch_vs_delete_branch():
    # No "- " / " -" in the string: "-" becomes a space.
    assert normalize("x-ray") == "x ray"
    # " -" occurs: every "-" is deleted, gluing "x" and "ray".
    assert normalize("x-ray - ct") == "xray ct"
    # The test is per mark: ") " occurs, so every ")" is deleted ("c)d" → "cd"), while "("
    # (no "( " or " (") becomes a space.
    assert normalize("ct(b) c)d") == "ct b cd"
    assert normalize("ct(b)c)d") == "ct b c d"


def test_punctuation_condition_reads_the_original_string():
    # After "/" → " ", the working string "ct -mri t1-t2" holds " -", but the rule looks at the
    # ORIGINAL "ct/-mri t1-t2", which has neither "- " nor " -": "-" → space everywhere.
    assert normalize("ct/-mri t1-t2") == "ct mri t1 t2"


def test_digit_comma_digit_deletes_every_punctuation_mark():
    assert normalize("1,000 x-ray") == "1000 xray"
    assert normalize("2,5 a/b") == "25 ab"
    # no digit-comma-digit: comma without a following space → space
    assert normalize("a,b") == "b"  # "a b" → article "a" dropped
    assert normalize("left, right") == "left right"


def test_number_words_articles_contractions():
    assert normalize("The two nodules and none of an effusion") == "2 nodules and 0 of effusion"
    assert normalize("zero ten eleven") == "0 10 eleven"
    assert normalize("A lesion") == "lesion"
    assert normalize("it isnt there") == "it isn't there"
    assert normalize("Dont") == "don't"
    assert normalize("im") == "im"  # the map's capitalised "Im" never matches (reference quirk)


def test_period_cap_32_per_pass():
    text = "x" + "." * 40
    once = normalize_word(text)
    assert once == "x" + "." * 8                      # exactly 32 removed
    assert normalize_word(once) == "x"                # second pass removes the other 8
    assert normalize_word(text, period_cap=None) == "x"
    seventy = normalize_word(normalize_word("x" + "." * 70))
    assert seventy == "x" + "." * 6                   # 70 − 32 − 32


def test_double_normalisation_in_token_metrics():
    # pred "lung" + 40 periods: the batch scorer leaves 8 periods, token metrics remove them.
    f1, p, r = token_scores(normalize("lung" + "." * 40), normalize("lung"))
    assert (f1, p, r) == (1.0, 1.0, 1.0)
    # 70 periods: 6 survive both passes; token "lung......" ≠ "lung".
    assert token_scores(normalize("lung" + "." * 70), normalize("lung")) == (0.0, 0.0, 0.0)
    # a single pass would not have matched with 40 periods
    assert normalize("lung" + "." * 40).split() != ["lung"]


# --- token metrics ----------------------------------------------------------------------------
def test_repeated_prediction_words_inflate_recall():
    # cand {left: 2}, ref {left: 1, lung: 1}: tp = 2 (prediction's count), fp = 0, fn = 1.
    f1, p, r = token_scores("left left", "left lung")
    assert p == 1.0 and r == pytest.approx(2 / 3) and f1 == pytest.approx(0.8)
    # tp = 3, fn = 0: perfect although "lung" appears once
    assert token_scores("left left lung", "left lung") == (1.0, 1.0, 1.0)
    # tp = 3, fn = 2 (upper, lobe): recall 0.6 for one word out of three
    f1, p, r = token_scores("right right right", "right upper lobe")
    assert (p, r) == (1.0, pytest.approx(0.6)) and f1 == pytest.approx(0.75)


def test_token_scores_precision_and_zeros():
    f1, p, r = token_scores(normalize("The left lung is clear"), normalize("left lung"))
    assert (p, r) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)
    assert token_scores("", "lung") == (0.0, 0.0, 0.0)
    assert token_scores("lung", "") == (0.0, 0.0, 0.0)
    assert token_scores("the", "lung") == (0.0, 0.0, 0.0)     # empty after normalisation
    assert token_scores("heart", "lung") == (0.0, 0.0, 0.0)   # tp = 0


def test_exact_match_is_distinct_answer_words_over_prediction_tokens():
    assert exact_match("left left lung", "left lung") == pytest.approx(2 / 3)
    assert exact_match("left lung is clear", "left lung") == 0.5
    assert exact_match("left", "left left lung") == 1.0      # distinct gt words: left, lung → 1/1
    assert exact_match("", "lung") == 0.0


# --- closed questions -------------------------------------------------------------------------
def test_closed_substring_vs_strict():
    assert closed_hit("nodule", "no") is True                 # "no" inside "nodule"
    assert closed_hit_strict("nodule", "no") is False         # no word yes/no
    pred = normalize("No, there is no nodule.")
    assert pred == "no there is no nodule"
    assert closed_hit(pred, "no") and closed_hit_strict(pred, "no")
    assert not closed_hit("no", "yes") and not closed_hit_strict("no", "yes")
    assert closed_hit("left", "left") and not closed_hit_strict("left", "left")
    assert closed_hit_strict("yes left", "left")


# --- score() end to end -----------------------------------------------------------------------
def _gt(qid, question, answer, answer_type, key="conversations"):
    return {"id": qid, "image": f"{qid}.jpg", "answer_type": answer_type,
            key: [{"from": "human", "value": f"<image>\n{question}"},
                  {"from": "gpt", "value": answer}]}


GT = [
    _gt(1, "Which lung?", "left lung", "OPEN"),
    _gt(2, "How many?", "Two nodules", "OPEN", key="conversatons"),  # old key
    _gt(3, "Modality?", "x-ray", "OPEN"),
    _gt(4, "Normal?", "no", "CLOSED"),
    _gt(5, "Mass?", "Yes", "CLOSED"),
    _gt(6, "Effusion?", "yes", "CLOSED"),
]
PRED = [
    {"question_id": 1, "text": "left left"},               # R 2/3, P 1, F1 .8, EM 1/2, hit 0
    {"question_id": 2, "text": "There are two nodules."},  # R 1, P 1/2, F1 2/3, EM 2/4, hit 1
    {"question_id": 3, "text": ""},                         # zeros
    {"question_id": 4, "text": "nodule"},                   # closed 1, strict 0, recall 0
    {"question_id": "5", "text": "Yes, it is."},            # closed 1, strict 1, recall 1
    {"question_id": 6, "text": "No"},                       # closed 0, strict 0, recall 0
]


def test_score_end_to_end_hand_computed():
    result = score(GT, PRED)
    o = result["overall"]
    assert (o["n_questions"], o["n_scored"], o["n_missing"], o["n_open"], o["n_closed"]) == \
        (6, 6, 0, 3, 3)
    assert o["open_recall"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)   # 55.56
    assert o["open_f1"] == pytest.approx(100 * (0.8 + 2 / 3 + 0) / 3)      # 48.89
    assert o["open_precision"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)   # 50.00
    assert o["exact_match"] == pytest.approx(100 * (0.5 + 0.5 + 0) / 3)    # 33.33
    assert o["open_hit"] == pytest.approx(100 / 3)
    assert o["closed_acc"] == pytest.approx(200 / 3)                       # 66.67
    assert o["closed_acc_strict"] == pytest.approx(100 / 3)                # 33.33
    assert o["closed_recall"] == pytest.approx(100 / 3)
    rows = {r["question_id"]: r for r in result["rows"]}
    assert [r["question_id"] for r in result["rows"]] == ["1", "2", "3", "4", "5", "6"]
    assert rows["2"]["answer_norm"] == "2 nodules"
    assert rows["2"]["prediction_norm"] == "there are 2 nodules"
    assert rows["4"]["closed_hit"] == 1.0 and rows["4"]["closed_hit_strict"] == 0.0
    assert rows["1"]["question"] == "Which lung?" and rows["1"]["closed_hit"] is None


def test_score_refuses_missing_unknown_and_duplicate_ids():
    with pytest.raises(EvalInputError, match=r"1 of 6 ground-truth questions .*: 6"):
        score(GT, PRED[:5])
    with pytest.raises(EvalInputError, match=r"1 of 7 predictions .*: 99"):
        score(GT, PRED + [{"question_id": 99, "text": "x"}])
    with pytest.raises(EvalInputError, match=r"duplicate prediction question_id.*: 1"):
        score(GT, PRED + [{"question_id": "1", "text": "x"}])
    with pytest.raises(EvalInputError, match=r"prediction record 0: needs 'question_id' and "):
        score(GT, [{"question_id": 1}])
    with pytest.raises(EvalInputError, match=r"ground-truth item 0 .*answer_type 'MAYBE'"):
        score([{**GT[0], "answer_type": "MAYBE"}], PRED[:1])


def test_score_allow_missing_counts_the_subset():
    o = score(GT, PRED[:4], allow_missing=True)["overall"]
    assert (o["n_scored"], o["n_missing"], o["n_closed"]) == (4, 2, 1)
    assert o["closed_acc"] == 100.0 and o["closed_acc_strict"] == 0.0


def test_empty_category_is_none():
    o = score(GT[3:], PRED[3:])["overall"]
    assert o["open_recall"] is None and o["closed_acc"] == pytest.approx(200 / 3)


def test_cli_writes_outputs_and_rejects_bad_input(tmp_path, capsys):
    gt, pred = tmp_path / "test.json", tmp_path / "answers.jsonl"
    gt.write_text(json.dumps(GT))
    pred.write_text("\n".join(json.dumps(p) for p in PRED) + "\n")
    assert metrics.main(["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "m"),
                         "--benchmark", "vqa_rad"]) == 0
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved["benchmark"] == "vqa_rad" and saved["overall"]["closed_acc"] == \
        pytest.approx(200 / 3)
    assert (tmp_path / "m" / "per_question.csv").read_text().count("\n") == 7
    assert "| Open recall | 55.56 |" in (tmp_path / "m" / "metrics.md").read_text()
    pred.write_text(json.dumps(PRED[0]) + "\n")
    assert metrics.main(["--gt", str(gt), "--pred", str(pred)]) == 2
    assert "5 of 6 ground-truth questions have no prediction" in capsys.readouterr().err
    pred.write_text(json.dumps(PRED[0]) + "\n{truncated\n")
    assert metrics.main(["--gt", str(gt), "--pred", str(pred)]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


# --- the real VQA-RAD test set ----------------------------------------------------------------
def _answers(items, fn):
    return [{"question_id": it["id"], "text": fn(it)} for it in items]


def test_real_vqa_rad_predictions(vqa_rad_dir):
    items, _ = convert.convert("vqa_rad", vqa_rad_dir / "testset.json")
    oracle = score(items, _answers(items, lambda it: it["conversations"][1]["value"]))["overall"]
    assert (oracle["n_open"], oracle["n_closed"]) == (179, 272)
    assert oracle["closed_acc"] == 100.0 and oracle["open_recall"] == 100.0
    assert oracle["open_f1"] == 100.0
    # 118 "yes" + 133 "no" closed answers; the other 21 closed answers hold no yes/no word
    assert oracle["closed_acc_strict"] == pytest.approx(100 * 251 / 272)
    # run_eval.py's yes/no accuracy counts 3 more: "abnormal" holds the substring "no"
    assert (oracle["yes_no_acc_run_eval"], oracle["yes_no_n_run_eval"]) == ((254 / 272) * 100, 272)  # 93.38
    assert oracle["yes_no_acc_run_eval_first_release"] == oracle["yes_no_acc_run_eval"]  # nothing dropped
    yes = score(items, _answers(items, lambda it: "Yes"))["overall"]
    assert yes["closed_acc"] == pytest.approx(100 * 118 / 272)  # 43.38
    assert yes["closed_acc_strict"] == yes["closed_acc"]
    # every "no" question is dropped from the first release's denominator: "Yes" to everything scores
    # 100 there; the fixed version counts them as misses
    assert (yes["yes_no_acc_run_eval_first_release"], yes["yes_no_n_run_eval_first_release"]) == (100.0, 118)
    assert (yes["yes_no_acc_run_eval"], yes["yes_no_n_run_eval"]) == ((118 / 272) * 100, 272)
    assert yes["open_recall"] == 0.0
    no = score(items, _answers(items, lambda it: "No."))["overall"]
    assert no["closed_acc"] == pytest.approx(100 * 133 / 272)   # 48.90
    assert (no["yes_no_acc_run_eval_first_release"], no["yes_no_n_run_eval_first_release"]) == (100.0, 133)
    assert (no["yes_no_acc_run_eval"], no["yes_no_n_run_eval"]) == ((133 / 272) * 100, 272)
