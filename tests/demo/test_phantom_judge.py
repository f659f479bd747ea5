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


# -- the noisy judge ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    """400 judged pairs (100 phantoms × 4 closed questions), each one right and one wrong answer; the
    right one is Answer 1 in exactly half of them."""
    root = tmp_path_factory.mktemp("noisy")
    phantoms = make_split(str(root), 100, seed="noisy-judge/0", prefix="n")
    rng = random.Random(2)
    lines = []
    for ph in phantoms:
        for q, a in closed_questions(ph, rng):
            right, wrong = a.capitalize() + ".", ("No." if a == "yes" else "Yes.")
            first = len(lines) % 2 == 0
            lines.append({"question_id": f"{ph.name}_{len(lines)}", "image": ph.name, "question": q,
                          "answers": [right, wrong] if first else [wrong, right], "right": 0 if first else 1})
    (root / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, lines


def judged(root, name, concurrency, **noise):
    """The judge blocks of the real judge client against the (noisy) phantom judge, in input order."""
    from stllava.selftrain import judge

    server = serve(str(root / "facts.json"), str(root / "images"), **noise)
    try:
        rc = judge.main(["--answers", str(root / "answers.jsonl"), "--image-folder", str(root / "images"),
                         "--out", str(root / f"{name}.jsonl"), "--base-url", server.base_url, "--model", JUDGE_NAME,
                         "--api-key-env", "PHANTOM_KEY", "--concurrency", str(concurrency)])
    finally:
        server.stop()
    assert rc == 0
    return [json.loads(x)["judge"] for x in open(root / f"{name}.jsonl")]


def test_noisy_judge_flips_the_share_asked_and_the_same_records_at_any_concurrency(balanced, monkeypatch):
    monkeypatch.setenv("PHANTOM_KEY", "phantom-local")
    root, lines = balanced
    perfect = judged(root, "perfect", 8)
    assert all(j["status"] == "ok" and j["chosen"] == x["right"] and "Noise" not in j["reply"]
               for j, x in zip(perfect, lines))
    one = judged(root, "flip_c1", 1, flip_rate=0.2, noise_seed=7)
    eight = judged(root, "flip_c8", 8, flip_rate=0.2, noise_seed=7)
    assert [j["scores"] for j in one] == [j["scores"] for j in eight]  # order and concurrency change nothing
    flipped = [j["chosen"] != x["right"] for j, x in zip(eight, lines)]
    # 400 independent draws at 0.2: sd 0.02, so 0.2 ± 0.06 is a 3-sd band (the draws are fixed: no flakiness)
    assert abs(sum(flipped) / len(lines) - 0.2) < 0.06
    assert all(("verdict reversed" in j["reply"]) == f for j, f in zip(eight, flipped))
    other_seed = judged(root, "flip_seed8", 8, flip_rate=0.2, noise_seed=8)
    assert [j["chosen"] for j in other_seed] != [j["chosen"] for j in eight]


def test_position_biased_judge_prefers_answer_1(balanced, monkeypatch):
    monkeypatch.setenv("PHANTOM_KEY", "phantom-local")
    root, lines = balanced
    p = 0.4
    got = judged(root, "bias", 8, position_bias=p, noise_seed=3)
    first = sum(j["chosen"] == 0 for j in got) / len(lines)
    # balanced pairs: Answer 1 wins when biased (p), else when it is right (half the rest)
    assert abs(first - (p + (1 - p) / 2)) < 0.07
    biased = [j for j in got if "position bias" in j["reply"]]
    assert all(j["chosen"] == 0 for j in biased) and abs(len(biased) / len(lines) - p) < 0.075
    assert all(j["chosen"] == x["right"] for j, x in zip(got, lines) if "position bias" not in j["reply"])


def test_noise_rates_outside_0_1_are_refused():
    from stllava.demo.phantom_judge import PhantomJudge
    from stllava.errors import StllavaError

    with pytest.raises(StllavaError, match="flip rate 1.5 is not a probability"):
        PhantomJudge({}, ".", flip_rate=1.5)
    with pytest.raises(StllavaError, match="position bias -0.1 is not a probability"):
        PhantomJudge({}, ".", position_bias=-0.1)
