"""Judged answers -> DPO pairs (docs/Method.md#pairs output schema), with hand-checked golden values."""
import json

import pytest

from stllava.selftrain import build_pairs as bp


def judged(qid, status, scores=None, chosen=None, answers=("first answer", "second answer"),
           question="Is there a fracture?", reply=None, **extra):
    return {"question_id": qid, "image": f"img/{qid}.jpg", "question": question, "answers": list(answers),
            **extra,
            "judge": {"status": status, "scores": scores, "chosen": chosen,
                      "margin": None if scores is None else abs(scores[0] - scores[1]),
                      "reply": reply, "replies": [reply], "model": "gpt-4o", "rule_version": "medical_v1"}}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pair_schema_golden(tmp_path):
    src = write(tmp_path / "judged.jsonl", [
        judged("a", "ok", [3.0, 8.0], 1, reply="3 8\nAnswer 2 sees the fracture.\nAnswer 1 misses it.",
               model="stllava-7b", seeds=[11, 12]),
    ])
    out = tmp_path / "dpo.json"
    assert bp.main(["--judged", str(src), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == [{
        "id": "a",
        "image": "img/a.jpg",
        "chosen_conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"},
                                 {"from": "gpt", "value": "second answer"}],
        "reject_conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"},
                                 {"from": "gpt", "value": "first answer"}],
        "scores": {"chosen": 8.0, "rejected": 3.0},
        "margin": 5.0,
        "chosen_index": 1,
        "judge": "gpt-4o",
        "rule_version": "medical_v1",
        "rationale": "Answer 2 sees the fracture.\nAnswer 1 misses it.",
        "provenance": {"model": "stllava-7b", "seeds": [11, 12]},
    }]
    assert (tmp_path / "dpo.stats.json").exists()


def test_counts_margin_filter_and_histogram(tmp_path, capsys):
    records = [
        judged("ok1", "ok", [8, 3], 0),           # margin 5
        judged("ok2", "ok", [6, 7], 1),           # margin 1 -> below --min-margin 2
        judged("ok3", "ok", [9.5, 7], 0),         # margin 2.5
        judged("ok4", "ok", [1, 10], 1),          # margin 9
        judged("tie", "tie", [7, 7]),
        judged("garbage", "unparsable"),
        judged("same", "identical", answers=("x", "x")),
        judged("tok", "ok", [9, 2], 0, answers=("see <image> here", "no")),  # would break training
    ]
    src = write(tmp_path / "judged.jsonl", records)
    out = tmp_path / "dpo.json"
    assert bp.main(["--judged", str(src), "--out", str(out), "--min-margin", "2"]) == 0
    pairs = json.loads(out.read_text())
    assert [p["id"] for p in pairs] == ["ok1", "ok3", "ok4"]
    stats = json.loads((tmp_path / "dpo.stats.json").read_text())
    assert {k: stats[k] for k in ("judged", "pairs", "tie", "unparsable", "identical", "below_margin",
                                  "image_token_in_text", "min_margin")} == {
        "judged": 8, "pairs": 3, "tie": 1, "unparsable": 1, "identical": 1, "below_margin": 1,
        "image_token_in_text": 1, "min_margin": 2.0}
    assert stats["margin_histogram"] == {"[1,2)": 1, "[2,3)": 1, "[5,6)": 1, "[7,8)": 1, "[9,inf)": 1}
    assert stats["chosen_position"] == {"answer1": 2, "answer2": 1}
    assert stats["judges"] == {"gpt-4o / medical_v1": 8}
    assert json.loads(capsys.readouterr().out)["pairs"] == 3  # printed too


def test_empty_answer_and_best_against_worst(tmp_path):
    records = [
        judged("empty", "ok", [9, 2], 0, answers=("Yes.", "")),  # a sample that ended at once
        judged("k4", "ok", [9, 2, 9, 5], 0, answers=("Yes.", "No.", "Yes.", "Maybe.")),
    ]
    records[1]["judge"]["rejected"] = 1
    pairs, stats = bp.build_pairs(bp.iter_jsonl(write(tmp_path / "judged.jsonl", records)))
    assert [p["id"] for p in pairs] == ["k4"] and stats["empty_answer"] == 1
    assert pairs[0]["reject_conversations"][1]["value"] == "No." and pairs[0]["margin"] == 7
    records[1]["judge"]["rejected"] = 3  # "Maybe." scored 5
    pairs, _ = bp.build_pairs(bp.iter_jsonl(write(tmp_path / "judged.jsonl", records)))
    assert pairs[0]["reject_conversations"][1]["value"] == "Maybe." and pairs[0]["scores"]["rejected"] == 5
    records[1]["judge"]["rejected"] = 2  # as good as the chosen one: not a pair
    with pytest.raises(bp.PairsError, match="pointing at the higher one"):
        bp.build_pairs(bp.iter_jsonl(write(tmp_path / "judged.jsonl", records)))


def test_question_cap_keeps_the_first_pairs_of_each_question(tmp_path):
    records = [judged(f"q{i}", "ok", [9, 2], 0, question=q)
               for i, q in enumerate(["Is it big?", "Is it big? ", "Is it red?", "is it big?", "Is it red?"])]
    pairs, stats = bp.build_pairs(bp.iter_jsonl(write(tmp_path / "judged.jsonl", records)), max_per_question=1)
    assert [p["id"] for p in pairs] == ["q0", "q2"] and stats["over_question_cap"] == 3
    assert bp.main(["--judged", str(tmp_path / "judged.jsonl"), "--out", str(tmp_path / "d.json"),
                    "--max-per-question", "0"]) == 2


def test_default_margin_keeps_every_non_tie(tmp_path):
    src = write(tmp_path / "judged.jsonl", [judged("a", "ok", [6, 5.5], 0), judged("b", "tie", [5, 5])])
    pairs, stats = bp.build_pairs(bp.iter_jsonl(src))
    assert [p["id"] for p in pairs] == ["a"] and pairs[0]["margin"] == 0.5
    assert stats["margin_histogram"] == {"[0,1)": 1}


@pytest.mark.parametrize("bad, message", [
    ({"question_id": "z", "image": "i.jpg"}, "missing field(s) ['question', 'answers', 'judge']"),
    (judged("z", "weird"), "no known 'status'"),
    (judged("z", "ok", [3, 8], 0), "'chosen' pointing at the higher one"),
    (judged("a", "tie", [1, 1]), "question_id 'a' already used on line 1"),
])
def test_bad_records_are_named(tmp_path, bad, message, capsys):
    src = write(tmp_path / "judged.jsonl", [judged("a", "ok", [8, 3], 0), bad])
    assert bp.main(["--judged", str(src), "--out", str(tmp_path / "dpo.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}, line 2: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "dpo.json").exists()


def test_malformed_line_is_named(tmp_path, capsys):
    src = tmp_path / "judged.jsonl"
    src.write_text(json.dumps(judged("a", "ok", [8, 3], 0)) + "\n{oops\n")
    assert bp.main(["--judged", str(src), "--out", str(tmp_path / "dpo.json")]) == 2
    assert f"error: {src}, line 2: not valid JSON" in capsys.readouterr().err


def test_end_to_end_from_the_judge(tmp_path, monkeypatch):
    """The judge's real output feeds build_pairs (scripted server of test_judge)."""
    from test_judge import KEY, Script, argv, make_dataset

    from stllava.demo.openai_stub import ChatCompletionServer
    from stllava.selftrain import judge

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    answers, folder = make_dataset(tmp_path)
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, tmp_path / "judged.jsonl", server)) == 0
    out = tmp_path / "dpo.json"
    assert bp.main(["--judged", str(tmp_path / "judged.jsonl"), "--out", str(out)]) == 0
    pairs = json.loads(out.read_text())
    # q0 (8 3), q1 (2, 9), q3 (garbage then 6 4), q6 (5 6), q7 (9 1); q2 tie, q4 unparsable, q5 identical
    assert [(p["id"], p["chosen_conversations"][1]["value"], p["reject_conversations"][1]["value"])
            for p in pairs] == [
        ("img0_q0", "answer A0", "answer B0"), ("img1_q1", "answer B1", "answer A1"),
        ("img0_q3", "answer A3", "answer B3"), ("img0_q6", "answer B6", "answer A6"),
        ("img1_q7", "answer A7", "answer B7")]
    assert pairs[2]["rationale"] == "On reflection, answer 1."
    assert pairs[0]["provenance"] == {"model": "stllava-test", "seeds": [0, 100]}
