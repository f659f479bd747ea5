"""The phantom judge: consistent with the phantom generator, and driven through the real judge client."""
import json
import random

import pytest

from stllava.demo.phantom_judge import JUDGE_NAME, expected_answer, is_right, serve
from stllava.demo.phantoms import closed_questions, make_split, open_questions, sample_phantom


def test_judge_recovers_every_generated_answer():
    rng = random.Random(0)
    n = 0
    for i in range(200):
        ph = sample_phantom(rng, f"p{i}.png")
        facts = json.loads(json.dumps(ph.facts()))
        for q, a in closed_questions(ph, rng):
            kind, truth = expected_answer(q, facts)
            assert kind == "yesno" and truth == a, (q, facts)
            n += 1
        for q, a in open_questions(ph):
            kind, truth = expected_answer(q, facts)
            assert kind == "open", q
            assert is_right(a.capitalize() + ".", kind, truth), (q, a, truth)
            n += 1
    assert n > 1000


@pytest.mark.parametrize("answer,kind,truth,ok", [
    ("Yes.", "yesno", "yes", True), ("No, there is not.", "yesno", "yes", False),
    ("Two.", "open", "2", True), ("2 lesions", "open", "2", True), ("Three.", "open", "2", False),
    ("Left.", "open", "left", True), ("Right.", "open", "left", False), ("", "yesno", "no", False),
    ("Ct.", "open", "ct", True), ("X-ray.", "open", "x-ray", True),
])
def test_is_right(answer, kind, truth, ok):
    assert is_right(answer, kind, truth) is ok


def test_unknown_question_is_none():
    facts = {"modality": "ct", "count": 1, "lesions": [{"side": "left", "size": "small"}]}
    assert expected_answer("What is the patient's age?", facts) is None
    assert expected_answer("Is there a lesion on the left side?", facts) == ("yesno", "yes")
    assert expected_answer("Is this an mri?", facts) == ("yesno", "no")


def test_real_judge_client_against_phantom_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("PHANTOM_KEY", "phantom-local")
    from stllava.selftrain import build_pairs, judge

    phantoms = make_split(str(tmp_path), 3, seed=5, prefix="j")
    rng = random.Random(1)
    lines = []
    for ph in phantoms:
        for k, (q, a) in enumerate(closed_questions(ph, rng)[:2]):
            wrong = "no" if a == "yes" else "yes"
            answers = [wrong.capitalize() + ".", a.capitalize() + "."] if k % 2 else [a.capitalize() + ".", wrong.capitalize() + "."]
            lines.append({"question_id": f"{ph.name}_{k}", "image": ph.name, "question": q, "answers": answers, "truth": a})
    lines.append({"question_id": "unknown", "image": phantoms[0].name, "question": "What colour is the sky?",
                  "answers": ["Blue.", "Grey."]})
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    server = serve(str(tmp_path / "facts.json"), str(tmp_path / "images"))
    try:
        rc = judge.main(["--answers", str(answers), "--image-folder", str(tmp_path / "images"),
                         "--out", str(tmp_path / "judged.jsonl"), "--base-url", server.base_url,
                         "--model", JUDGE_NAME, "--api-key-env", "PHANTOM_KEY", "--concurrency", "2"])
    finally:
        server.stop()
    assert rc == 0
    assert build_pairs.main(["--judged", str(tmp_path / "judged.jsonl"), "--out", str(tmp_path / "dpo.json")]) == 0
    pairs = json.load(open(tmp_path / "dpo.json"))
    assert len(pairs) == len(lines) - 1  # the unknown question is a recorded tie, not a pair
    truth = {x["question_id"]: x["truth"] for x in lines if "truth" in x}
    for p in pairs:
        assert p["chosen_conversations"][1]["value"].lower().startswith(truth[p["id"]])
    stats = json.load(open(tmp_path / "dpo.stats.json"))
    assert stats["tie"] == 1 and stats["pairs"] == 6 and stats["judges"] == {f"{JUDGE_NAME} / medical_v1": 7}
