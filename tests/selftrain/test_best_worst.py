"""K > 2 answers per question: distinct answers judged in pairs, best against worst (worked by hand),
and end to end through the real judge client against the phantom judge."""
import json
import random

import pytest

from stllava.selftrain.judge_prompt import best_worst, distinct_answers, pair_up


def test_distinct_and_pairing():
    answers = ["Yes.", "No.", " Yes.", "Two.", "No.", "Three."]
    assert distinct_answers(answers) == [0, 1, 3, 5]
    assert pair_up([0, 1, 3, 5]) == [(0, 1), (3, 5)]
    assert pair_up([0, 1, 3]) == [(0, 1), (3, 0)]  # the odd one out meets the first
    assert pair_up([0, 2]) == [(0, 2)]


def test_best_worst_by_hand():
    answers = ["Yes.", "No.", "Yes.", "Maybe.", "Two."]
    distinct = distinct_answers(answers)  # 0, 1, 3, 4
    matches = [{"pair": [0, 1], "scores": [9, 2]}, {"pair": [3, 4], "scores": [5, 1]}, {"pair": [4, 0], "scores": [3, 7]}]
    v = best_worst(answers, distinct, matches)
    # Yes: (9 + 7) / 2 = 8; No: 2; Maybe: 5; Two: (1 + 3) / 2 = 2 -> worst is the first of the 2s
    assert v["scores"] == [8.0, 2.0, 8.0, 5.0, 2.0]
    assert (v["status"], v["chosen"], v["rejected"], v["margin"]) == ("ok", 0, 1, 6.0)


def test_best_worst_ties_and_unparsable():
    answers = ["A", "B", "C"]
    assert best_worst(answers, [0, 1, 2], [{"pair": [0, 1], "scores": [5, 5]},
                                           {"pair": [2, 0], "scores": [5, 5]}])["status"] == "tie"
    v = best_worst(answers, [0, 1, 2], [{"pair": [0, 1], "scores": None}, {"pair": [2, 0], "scores": None}])
    assert v["status"] == "unparsable" and v["scores"] == [None, None, None]
    v = best_worst(answers, [0, 1, 2], [{"pair": [0, 1], "scores": None}, {"pair": [2, 0], "scores": [3, 6]}])
    assert (v["status"], v["chosen"], v["rejected"], v["scores"]) == ("ok", 0, 2, [6.0, None, 3.0])


def test_four_answers_through_the_judge_client_and_build_pairs(tmp_path, monkeypatch):
    from stllava.demo.phantom_judge import JUDGE_NAME, serve
    from stllava.demo.phantoms import closed_questions, make_split
    from stllava.selftrain import build_pairs, judge

    monkeypatch.setenv("PHANTOM_KEY", "phantom-local")
    phantoms = make_split(str(tmp_path), 2, seed=7, prefix="k")
    rng = random.Random(3)
    lines = []
    for ph in phantoms:
        for k, (q, a) in enumerate(closed_questions(ph, rng)[:2]):
            wrong = "No." if a == "yes" else "Yes."
            right = a.capitalize() + "."
            answers = [right, right, "Lesion.", wrong] if k else [right, right, right, right]
            lines.append({"question_id": f"{ph.name}_{k}", "image": ph.name, "question": q, "answers": answers})
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    server = serve(str(tmp_path / "facts.json"), str(tmp_path / "images"))
    try:
        assert judge.main(["--answers", str(path), "--image-folder", str(tmp_path / "images"),
                           "--out", str(tmp_path / "judged.jsonl"), "--base-url", server.base_url,
                           "--model", JUDGE_NAME, "--api-key-env", "PHANTOM_KEY"]) == 0
    finally:
        server.stop()
    judged = [json.loads(x) for x in open(tmp_path / "judged.jsonl")]
    assert [j["judge"]["status"] for j in judged] == ["identical", "ok", "identical", "ok"]
    ok = judged[1]["judge"]
    # distinct answers 0 (right), 2 ("Lesion.", wrong), 3 (wrong): one request for (0, 2), one for (3, 0)
    assert [m["pair"] for m in ok["matches"]] == [[0, 2], [3, 0]]
    assert ok["scores"] == [9.0, 9.0, 2.0, 2.0] and (ok["chosen"], ok["rejected"]) == (0, 2)
    assert build_pairs.main(["--judged", str(tmp_path / "judged.jsonl"), "--out", str(tmp_path / "dpo.json")]) == 0
    pairs = json.load(open(tmp_path / "dpo.json"))
    assert len(pairs) == 2
    for p in pairs:
        assert p["reject_conversations"][1]["value"] == "Lesion."
        assert p["scores"] == {"chosen": 9.0, "rejected": 2.0}


@pytest.mark.parametrize("k", [1, 0])
def test_n_answers_below_two_is_refused(tmp_path, k):
    from stllava.selftrain import answers

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"image": "a.png", "questions": ["Why?"]}) + "\n")
    rc = answers.main(["--model-path", str(tmp_path), "--questions", str(q), "--image-folder", str(tmp_path),
                       "--out", str(tmp_path / "a.jsonl"), "--n-answers", str(k), "--temperature", "1"])
    assert rc == 2
