"""The graded-answer probe: the description's parser, the judge's score by hand-worked examples,
the fact recall / precision metric, and default data unchanged by the option."""
import hashlib
import json
import random

import pytest

from stllava.demo import graded, phantoms
from stllava.demo.phantom_judge import expected_answer, is_right, question_kind

TWO_LEFT = {"modality": "ct", "count": 2, "lesions": [
    {"x": 0.3, "y": 0.5, "r": 0.11, "side": "left", "size": "large"},
    {"x": 0.35, "y": 0.4, "r": 0.06, "side": "left", "size": "small"}]}
NONE = {"modality": "mri", "count": 0, "lesions": []}


def test_describe_and_parse():
    assert graded.describe(TWO_LEFT) == "CT, two lesions, left, large"
    assert graded.describe(NONE) == "MRI, no lesion"
    assert graded.parse_description("Ct, 2 lesions, left, large.") == {
        "modality": "ct", "count": 2, "side": "left", "size": "large"}
    assert graded.parse_description("Mri, no lesion.") == {"modality": "mri", "count": 0}
    assert graded.parse_description("an x-ray with three lesions on both sides, small") == {
        "modality": "x-ray", "count": 3, "side": "both", "size": "small"}
    # the first mention counts; numbers need "lesion(s)" after them; nothing stated: {}
    assert graded.parse_description("left, right, 2") == {"side": "left"}
    assert graded.parse_description("") == {}


@pytest.mark.parametrize("answer, facts, correct, wrong, score", [
    ("CT, 2 lesions, left, large", TWO_LEFT, 4, 0, 10),   # d = 4 of F = 4: 1 + 9·8/8 = 10
    ("CT, 2 lesions, left, small", TWO_LEFT, 3, 1, 8),    # d = 2: 1 + 9·6/8 = 7.75 → 8
    ("CT, 2 lesions, left", TWO_LEFT, 3, 0, 9),           # d = 3: 1 + 9·7/8 = 8.875 → 9
    ("CT", TWO_LEFT, 1, 0, 7),                            # d = 1: 1 + 9·5/8 = 6.625 → 7
    ("", TWO_LEFT, 0, 0, 6),                              # d = 0: 5.5, rounded half up → 6
    ("MRI, 1 lesion, right, small", TWO_LEFT, 0, 4, 1),   # d = −4: 1
    ("MRI, no lesion", NONE, 2, 0, 10),                   # F = 2: d = 2 → 10
    ("MRI, 1 lesion, left", NONE, 1, 2, 3),               # d = −1: 1 + 9·1/4 = 3.25 → 3
    ("CT, 3 lesions, left, large", NONE, 0, 4, 1),        # d = −4 < −F: clamped to 1
])
def test_grade_and_judge_score_by_hand(answer, facts, correct, wrong, score):
    g = graded.grade(answer, facts)
    assert (g["correct"], g["wrong"]) == (correct, wrong)
    assert graded.judge_score(answer, facts) == score


def test_judge_maps_the_description_question():
    assert question_kind("Describe the findings.") == ("graded", "describe")
    assert question_kind("What are the findings?") is None  # as before the probe
    assert expected_answer("Describe the findings.", TWO_LEFT) == ("graded", "CT, two lesions, left, large")
    assert is_right("Ct, 2 lesions, left, large.", "graded", "CT, 2 lesions, left, large")
    assert not is_right("Ct, 2 lesions, left.", "graded", "CT, 2 lesions, left, large")


def test_judge_grades_descriptions_only_when_graded(tmp_path):
    from stllava.demo.phantom_judge import PhantomJudge
    from stllava.selftrain.judge_prompt import build_messages, build_prompt, load_rule

    image = b"not really a png: the judge only hashes it"
    (tmp_path / "a.png").write_bytes(image)
    prompt = build_prompt("Describe the findings.", "CT, 2 lesions, left", "MRI, 2 lesions", load_rule().text)
    body = {"messages": build_messages(prompt, "image/png", image)}
    on = PhantomJudge({"a.png": TWO_LEFT}, str(tmp_path), graded=True)(body)
    off = PhantomJudge({"a.png": TWO_LEFT}, str(tmp_path))(body)
    assert on.content.split("\n")[0] == "9 6"  # d = 3 → 9; d = 1 − 1 = 0 → 6
    assert off.content.split("\n")[0] == "5 5"


def test_description_metrics(tmp_path):
    test = [{"id": "p_0", "image": "p.png", "answer_type": "OPEN",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the findings."},
                               {"from": "gpt", "value": "CT, 2 lesions, left, large"}]},
            {"id": "q_1", "image": "q.png", "answer_type": "OPEN",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the findings."},
                               {"from": "gpt", "value": "MRI, no lesion"}]},
            {"id": "p_2", "image": "p.png", "answer_type": "CLOSED",
             "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"},
                               {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "answers.jsonl").write_text(
        json.dumps({"question_id": "p_0", "text": "Ct, 2 lesions, right"}) + "\n"   # 2 right, 1 wrong of 4
        + json.dumps({"question_id": "q_1", "text": "Mri, no lesion."}) + "\n"      # 2 right of 2
        + json.dumps({"question_id": "p_2", "text": "Yes"}) + "\n")
    m = graded.description_metrics(str(tmp_path), str(tmp_path))
    assert m["n"] == 2
    assert m["recall"] == pytest.approx(100 * 4 / 6)     # 4 facts right of 6
    assert m["precision"] == pytest.approx(100 * 4 / 5)  # 4 right of 5 stated
    assert m["exact"] == 50.0


def _digest(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()


def test_default_records_unchanged_and_graded_only_adds():
    rng = random.Random("labelled/3")
    phs = [phantoms.sample_phantom(rng, f"p{i}.png") for i in range(40)]
    sft, test = phantoms.sft_records(phs, "labelled-conversations/3"), phantoms.test_records(phs, "test-questions/3")
    # digests of these records written before the graded option existed (commit 1d51132)
    assert _digest(sft) == "b68337d0bb05196ae5bd97ab3bb823ad69bb1469c7e651755f877385ced93561"
    assert _digest(test) == "eb2cb1b70acb207314ff6bd077f88600dcea907615c9b4fbec4c6f823c3671d5"
    g_sft = phantoms.sft_records(phs, "labelled-conversations/3", graded=True)
    for plain, with_desc, ph in zip(sft, g_sft, phs):
        assert with_desc["conversations"][:-2] == plain["conversations"]
        assert with_desc["conversations"][-2:] == [
            {"from": "human", "value": "Describe the findings."},
            {"from": "gpt", "value": graded.describe(ph.facts()).capitalize() + "."}]
    g_test = phantoms.test_records(phs, "test-questions/3", graded=True)
    assert g_test[: len(test)] == test and len(g_test) == len(test) + len(phs)


def test_descriptions_fit_twelve_tokens(tmp_path):
    from stllava.model.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(tmp_path))
    longest = max((graded.describe({"modality": m, "count": c, "lesions": [
        {"side": s, "size": "large"}, {"side": "left", "size": "small"}, {"side": "left", "size": "small"}][:c]})
        .capitalize() + "." for m in ("x-ray", "ct", "mri") for c in range(4) for s in ("left", "right")),
        key=lambda t: len(tok(t, add_special_tokens=False).input_ids))
    assert len(tok(longest, add_special_tokens=False).input_ids) <= 12, longest


def test_graded_plan_and_data_settings():
    plan = graded.graded_plan()
    assert plan["sizes"] == (100,) and len(plan["seeds"]) == 3 and plan["loop_changes"]["graded"]
    assert set(plan["conditions"]) == {"sft", "st", "rft"}
    assert graded.data_settings(False) == {} and graded.data_settings(True) == {"graded": True}
