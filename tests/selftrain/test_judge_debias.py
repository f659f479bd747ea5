"""The de-biased judge: --swap-check (both answer orders) and --judges (a strict majority of several
judges), through the real openai client, with the judge's fault paths and the position-biased
phantom judge."""
import json
import random
import time

import pytest
from test_judge import EXPECTED_200, KEY, Script, argv, count_200, make_dataset, statuses_by_question

from stllava.demo.openai_stub import ChatCompletionServer, Reply, request_text
from stllava.errors import EXIT_BAD_INPUT, EXIT_FAILED
from stllava.selftrain import build_pairs, judge
from stllava.selftrain.judge_prompt import split_prompt
from stllava.selftrain.judge_votes import majority, position_consistent, swap_checked

# Script replies by question whatever the order: for a decided pair it always prefers the same
# *position*, the position bias at its worst. With --swap-check every item is asked in both orders.
EXPECTED_SWAP = {"q0": 2, "q1": 2, "q2": 2, "q3": 3, "q4": 4, "q6": 2, "q7": 2}


class Fair:
    """A judge without position bias: each answer text has its own score, in either order.
    ``contrary`` reverses its preference (for judges that disagree)."""

    def __init__(self, contrary=False):
        self.contrary = contrary

    def score(self, answer):
        i = int(answer.strip()[-1])
        good = answer.startswith("answer A") != (i % 2 == 1)  # A wins on even questions, B on odd ones
        return 8 if good != self.contrary else 3

    def __call__(self, body):
        q, a1, a2, _ = split_prompt(request_text(body))
        if q == "q2":
            return "5 5\nBoth equal."
        return f"{self.score(a1)} {self.score(a2)}\nScored by content."


def ok(scores, chosen):
    return {"status": "ok", "scores": scores, "chosen": chosen, "margin": abs(scores[0] - scores[1])}


def tie(s):
    return {"status": "tie", "scores": [s, s], "chosen": None, "margin": 0.0}


UNPARSABLE = {"status": "unparsable", "scores": None, "chosen": None, "margin": None}


# ---------------------------------------------------------------------------- pure functions
def test_swap_checked_keeps_only_what_both_orders_prefer():
    a, b = ok([8.0, 3.0], 0), ok([6.0, 5.0], 0)
    assert swap_checked(a, b) == {"status": "ok", "scores": [7.0, 4.0], "chosen": 0, "margin": 3.0}
    assert position_consistent(a, b) is True
    against = ok([3.0, 8.0], 1)
    assert swap_checked(a, against)["status"] == "inconsistent" and position_consistent(a, against) is False
    assert swap_checked(a, against)["chosen"] is None
    assert swap_checked(a, tie(5.0))["status"] == "inconsistent"       # a tie in either order: no verdict
    assert swap_checked(tie(5.0), a)["status"] == "inconsistent" and position_consistent(tie(5.0), a) is False
    assert swap_checked(tie(5.0), tie(6.0))["status"] == "tie" and position_consistent(tie(5.0), tie(6.0))
    assert swap_checked(a, UNPARSABLE)["status"] == "unparsable" and position_consistent(a, UNPARSABLE) is None
    k3 = {"status": "ok", "scores": [9.0, 1.0, 5.0], "chosen": 0, "rejected": 1, "margin": 8.0}
    other = {**k3, "scores": [7.0, 5.0, 1.0], "rejected": 2}
    assert swap_checked(k3, k3)["rejected"] == 1 and swap_checked(k3, other)["status"] == "inconsistent"


def test_majority_is_strict():
    a0, a1 = ok([8.0, 3.0], 0), ok([2.0, 9.0], 1)
    assert majority([a0, a0])["chosen"] == 0
    assert majority([a0, a1])["status"] == "no_majority"                 # two judges: both must agree
    assert majority([a0, tie(5.0)])["status"] == "no_majority"
    assert majority([a0, a0, a1]) == {"status": "ok", "scores": [8.0, 3.0], "chosen": 0, "margin": 5.0}
    assert majority([a0, a1, tie(5.0)])["status"] == "no_majority"
    assert majority([a0, tie(5.0), UNPARSABLE])["status"] == "no_majority"
    assert majority([tie(5.0), tie(7.0)])["status"] == "tie"
    assert majority([UNPARSABLE, UNPARSABLE])["status"] == "unparsable"
    assert majority([a0, a0, a1, a1])["status"] == "no_majority"


# ---------------------------------------------------------------------------- the swap check, end to end
def test_default_is_unchanged_and_swap_check_catches_an_order_blind_judge(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    plain, swapped = tmp_path / "plain.jsonl", tmp_path / "swap.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, plain, server)) == 0
    summary = json.loads((tmp_path / "plain.summary.json").read_text())
    assert "swap_check" not in summary and "position_inconsistent" not in summary
    assert all("swap" not in json.loads(x)["judge"] for x in plain.read_text().splitlines())
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, swapped, server, "--swap-check")) == 0
    assert count_200(server) == EXPECTED_SWAP
    rows = {json.loads(x)["question"]: json.loads(x)["judge"] for x in swapped.read_text().splitlines()}
    for q in ("q0", "q1", "q3", "q6", "q7"):   # the same scores in both orders: a different answer preferred
        assert rows[q]["status"] == "inconsistent" and rows[q]["chosen"] is None
        assert rows[q]["swap"]["position_consistent"] is False
        assert [o["swapped"] for o in rows[q]["swap"]["orders"]] == [False, True]
    first, second = rows["q0"]["swap"]["orders"]
    assert (first["scores"], first["chosen"], second["scores"], second["chosen"]) == ([8.0, 3.0], 0, [3.0, 8.0], 1)
    assert rows["q2"]["status"] == "tie" and rows["q2"]["swap"]["position_consistent"] is True
    assert rows["q4"]["status"] == "unparsable" and rows["q4"]["swap"]["position_consistent"] is None
    assert rows["q5"]["status"] == "identical"
    # the second order's request really has the answers exchanged
    bodies = [split_prompt(request_text(r["body"])) for r in server.requests]
    assert ("q0", "answer A0", "answer B0") in [b[:3] for b in bodies]
    assert ("q0", "answer B0", "answer A0") in [b[:3] for b in bodies]
    summary = json.loads((tmp_path / "swap.summary.json").read_text())
    assert summary["swap_check"] is True
    assert (summary["position_inconsistent"], summary["position_consistent"]) == (5, 1)
    assert summary["status"] == {"identical": 1, "inconsistent": 5, "tie": 1, "unparsable": 1}
    assert summary["paid_requests"] == sum(EXPECTED_SWAP.values())
    # downstream: no verdict is no pair, counted
    assert build_pairs.main(["--judged", str(swapped), "--out", str(tmp_path / "dpo.json")]) == 0
    stats = json.loads((tmp_path / "dpo.stats.json").read_text())
    assert stats["pairs"] == 0 and stats["inconsistent"] == 5 and stats["tie"] == 1


def test_swap_check_keeps_what_a_fair_judge_prefers(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    plain, swapped = tmp_path / "plain.jsonl", tmp_path / "swap.jsonl"
    with ChatCompletionServer(Fair()) as server:
        assert judge.main(argv(answers, folder, plain, server)) == 0
        assert judge.main(argv(answers, folder, swapped, server, "--swap-check")) == 0
    p = [json.loads(x)["judge"] for x in plain.read_text().splitlines()]
    s = [json.loads(x)["judge"] for x in swapped.read_text().splitlines()]
    assert [j["status"] for j in s] == [j["status"] for j in p]
    assert [j["chosen"] for j in s] == [j["chosen"] for j in p] == [0, 1, None, 1, 0, None, 0, 1]
    assert [j["scores"] for j in s] == [j["scores"] for j in p]
    summary = json.loads((tmp_path / "swap.summary.json").read_text())
    assert (summary["position_inconsistent"], summary["position_consistent"]) == (0, 7)


def test_swap_check_with_three_answers_exchanges_every_match(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    for r in rows:
        r["answers"].append(r["answers"][0].replace("answer A", "answer C"))
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, swapped = tmp_path / "plain.jsonl", tmp_path / "swap.jsonl"
    with ChatCompletionServer(Fair()) as server:
        assert judge.main(argv(answers, folder, plain, server)) == 0
        assert judge.main(argv(answers, folder, swapped, server, "--swap-check")) == 0
    p = [json.loads(x)["judge"] for x in plain.read_text().splitlines()]
    s = [json.loads(x)["judge"] for x in swapped.read_text().splitlines()]
    assert [(j["status"], j["chosen"], j["rejected"]) for j in s] == [(j["status"], j["chosen"], j["rejected"]) for j in p]
    assert s[0]["status"] == "ok" and s[0]["swap"]["position_consistent"] is True
    pairs = [m["pair"] for m in s[0]["matches"]]
    assert pairs == [[0, 1], [2, 0], [1, 0], [0, 2]]   # the published matches, then each exchanged


def test_swap_check_reuses_the_published_orders_cache_and_pays_only_the_swapped_order(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    out, cache = tmp_path / "j.jsonl", tmp_path / "shared.cache.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, out, server, "--cache", str(cache))) == 0
        n = len(server.requests)
        assert n == sum(EXPECTED_200.values())
        assert judge.main(argv(answers, folder, tmp_path / "s.jsonl", server, "--cache", str(cache),
                               "--swap-check")) == 0
    new = [split_prompt(request_text(r["body"]))[1] for r in server.requests[n:]]
    assert all(a.startswith("answer B") for a in new)     # only swapped prompts (Answer 1 = B) are new
    entries = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(entries) == len({e["key"] for e in entries}) == sum(EXPECTED_SWAP.values())


def test_swap_check_faults_are_retried_and_change_nothing(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    clean, faulty = tmp_path / "clean.jsonl", tmp_path / "faulty.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, clean, server, "--swap-check", "--concurrency", "1")) == 0
    faults = {"q0": [Reply(status=429, headers={"Retry-After": "0.05"})], "q1": [Reply(status=500)],
              "q3": [Reply(status=503, delay=5)], "q6": [Reply(status=502)]}
    with ChatCompletionServer(Script(faults)) as server:
        assert judge.main(argv(answers, folder, faulty, server, "--swap-check", "--timeout", "1")) == 0
    assert faulty.read_bytes() == clean.read_bytes()
    assert count_200(server) == EXPECTED_SWAP
    summary = json.loads((tmp_path / "faulty.summary.json").read_text())
    assert summary["retries"] == {"429": 1, "5xx": 2, "timeout": 1}


def test_swap_check_resume_pays_nothing_twice(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, tmp_path / "clean.jsonl", server, "--swap-check")) == 0
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script({"q1": [Reply(status=500)]})) as server:
        for cap in ("5", "4"):
            assert judge.main(argv(answers, folder, out, server, "--swap-check", "--max-requests", cap)) == EXIT_FAILED
            assert not out.exists()
        assert judge.main(argv(answers, folder, out, server, "--swap-check")) == 0
        assert count_200(server) == EXPECTED_SWAP      # every completion paid exactly once overall
    assert out.read_bytes() == (tmp_path / "clean.jsonl").read_bytes()


# ---------------------------------------------------------------------------- several judges
def write_judges(path, servers, models=None, env="OPENAI_API_KEY"):
    models = models or [f"judge-{k}" for k in range(len(servers))]
    path.write_text(json.dumps([{"model": m, "base_url": s.base_url, "api_key_env": env}
                                for m, s in zip(models, servers)]))
    return path


def panel_argv(answers, folder, out, judges_file, *extra):
    return ["--answers", str(answers), "--image-folder", str(folder), "--out", str(out),
            "--judges", str(judges_file), "--timeout", "10", "--concurrency", "3", *extra]


def test_two_judges_keep_only_what_both_prefer(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Fair()) as a, ChatCompletionServer(Fair()) as b, \
            ChatCompletionServer(Fair(contrary=True)) as c:
        agree = write_judges(tmp_path / "agree.json", [a, b])
        assert judge.main(panel_argv(answers, folder, out, agree)) == 0
        rows = [json.loads(x)["judge"] for x in out.read_text().splitlines()]
        assert [j["chosen"] for j in rows] == [0, 1, None, 1, 0, None, 0, 1]
        assert rows[0]["status"] == "ok" and rows[0]["agree"] == 2 and rows[0]["model"] == "judge-0 + judge-1"
        assert [(x["model"], x["base_url"], x["chosen"]) for x in rows[0]["judges"]] == [
            ("judge-0", a.base_url, 0), ("judge-1", b.base_url, 0)]
        disagree = write_judges(tmp_path / "disagree.json", [a, c])
        assert judge.main(panel_argv(answers, folder, tmp_path / "d.jsonl", disagree)) == 0
        rows = [json.loads(x)["judge"] for x in (tmp_path / "d.jsonl").read_text().splitlines()]
        assert [j["status"] for j in rows] == ["no_majority"] * 2 + ["tie"] + ["no_majority"] * 2 + ["identical"] + [
            "no_majority"] * 2
        assert all(j["chosen"] is None and j["agree"] == 0 for j in rows)
        summary = json.loads((tmp_path / "d.summary.json").read_text())
        assert [j["model"] for j in summary["judges"]] == ["judge-0", "judge-1"]
        assert summary["status"] == {"identical": 1, "no_majority": 6, "tie": 1}
        three = write_judges(tmp_path / "three.json", [a, b, c])
        assert judge.main(panel_argv(answers, folder, tmp_path / "t.jsonl", three, "--swap-check")) == 0
        rows = [json.loads(x)["judge"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
        assert [j["chosen"] for j in rows] == [0, 1, None, 1, 0, None, 0, 1] and rows[0]["agree"] == 2
        assert all("swap" in x for x in rows[0]["judges"])
    assert build_pairs.main(["--judged", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "dpo.json")]) == 0
    stats = json.loads((tmp_path / "dpo.stats.json").read_text())
    assert stats["pairs"] == 0 and stats["no_majority"] == 6


def without_urls(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        for j in r["judge"]["judges"]:
            j.pop("base_url")
    return rows


def test_judges_fault_paths_retry_and_resume_pay_nothing_twice(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    with ChatCompletionServer(Script()) as a, ChatCompletionServer(Fair()) as b:
        judges_file = write_judges(tmp_path / "judges.json", [a, b])
        assert judge.main(panel_argv(answers, folder, tmp_path / "clean.jsonl", judges_file, "--swap-check")) == 0
    out = tmp_path / "j.jsonl"
    script = Script({"q0": [Reply(status=429, headers={"Retry-After": "0.05"})], "q1": [Reply(status=500)]})
    with ChatCompletionServer(script) as a, ChatCompletionServer(Fair()) as b:
        judges_file = write_judges(tmp_path / "judges.json", [a, b])
        args = panel_argv(answers, folder, out, judges_file, "--swap-check")
        assert judge.main(args + ["--max-requests", "6"]) == EXIT_FAILED and not out.exists()
        assert len(a.requests) + len(b.requests) == 6    # one cap for the whole panel
        assert judge.main(args + ["--max-requests", "5"]) == EXIT_FAILED
        assert judge.main(args) == 0
        assert count_200(a) == EXPECTED_SWAP              # judge 0 paid every completion once
        assert sum(count_200(b).values()) == 2 * 7        # judge 1: both orders of the 7 distinct pairs
        assert statuses_by_question(a)["q0"][:2] == [429, 200]
        n = len(a.requests) + len(b.requests)
        assert judge.main(args + ["--max-requests", "0"]) == 0       # all cached
        assert len(a.requests) + len(b.requests) == n
    assert without_urls(out) == without_urls(tmp_path / "clean.jsonl")   # the servers' ports differ, nothing else
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    assert [j["position_inconsistent"] for j in summary["judges"]] == [5, 0]


def test_judges_keys_come_from_each_entrys_env_and_never_leak(tmp_path, monkeypatch, capsys):
    answers, folder = make_dataset(tmp_path)
    monkeypatch.setenv("KEY_A", KEY)
    monkeypatch.setenv("KEY_B", "sk-other-0000-DO-NOT-LEAK")
    with ChatCompletionServer(Fair(), api_key=KEY) as a, \
            ChatCompletionServer(Fair(), api_key="sk-other-0000-DO-NOT-LEAK") as b:
        path = tmp_path / "judges.json"
        path.write_text(json.dumps([{"model": "ja", "base_url": a.base_url, "api_key_env": "KEY_A"},
                                    {"model": "jb", "base_url": b.base_url, "api_key_env": "KEY_B"}]))
        assert judge.main(panel_argv(answers, folder, tmp_path / "j.jsonl", path)) == 0
        monkeypatch.delenv("KEY_B")
        assert judge.main(panel_argv(answers, folder, tmp_path / "k.jsonl", path)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{path}, entry 2 (jb): no API key: set $KEY_B" in err and KEY not in err


@pytest.mark.parametrize("content,expected", [
    ("not json", "not a valid judges file"),
    ("[]", "non-empty list"),
    ('{"model": "x"}', "non-empty list"),
    ('["gpt-4o"]', "entry 1: a judge must be an object"),
    ('[{"model": "a"}, {"modle": "b"}]', "entry 2: unknown key(s) ['modle']"),
    ('[{"base_url": "http://127.0.0.1:1/v1"}]', "entry 1: 'model' is missing"),
    ('[{"model": 4}]', "entry 1: 'model' has the wrong type"),
    ('[{"model": "a"}, {"model": "a"}]', "entry 2: model 'a' is already entry 1"),
])
def test_bad_judges_file_is_one_line_naming_file_and_entry(tmp_path, key_env, capsys, content, expected):
    answers, folder = make_dataset(tmp_path)
    path = tmp_path / "judges.json"
    path.write_text(content)
    assert judge.main(panel_argv(answers, folder, tmp_path / "j.jsonl", path)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(path) in err and expected in err and "Traceback" not in err


def test_judges_file_missing_and_yaml(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    assert judge.main(panel_argv(answers, folder, tmp_path / "j.jsonl", tmp_path / "nope.json")) == EXIT_BAD_INPUT
    assert "nope.json: cannot read the judges file" in capsys.readouterr().err
    pytest.importorskip("yaml")
    with ChatCompletionServer(Fair()) as a, ChatCompletionServer(Fair()) as b:
        path = tmp_path / "judges.yaml"
        path.write_text(f"- model: ja\n  base_url: {a.base_url}\n- model: jb\n  base_url: {b.base_url}\n")
        assert judge.main(panel_argv(answers, folder, tmp_path / "j.jsonl", path)) == 0
    assert json.loads((tmp_path / "j.jsonl").read_text().splitlines()[0])["judge"]["agree"] == 2


def test_plain_http_judge_entry_is_refused(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    path = tmp_path / "judges.json"
    path.write_text(json.dumps([{"model": "a", "base_url": "http://judge.example.org/v1"}]))
    assert judge.main(panel_argv(answers, folder, tmp_path / "j.jsonl", path)) == EXIT_BAD_INPUT
    assert "entry 1 (a): base_url http://judge.example.org/v1 is plain http" in capsys.readouterr().err


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# ---------------------------------------------------------------------------- the position-biased phantom judge
@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory):
    """120 pairs (30 phantoms × 4 closed questions), one right and one wrong answer each; the right
    one is Answer 1 in half of them."""
    from stllava.demo.phantoms import closed_questions, make_split

    root = tmp_path_factory.mktemp("swap")
    phantoms = make_split(str(root), 30, seed="swap-check/0", prefix="s")
    rng = random.Random(3)
    lines = []
    for ph in phantoms:
        for q, a in closed_questions(ph, rng):
            right, wrong = a.capitalize() + ".", ("No." if a == "yes" else "Yes.")
            first = len(lines) % 2 == 0
            lines.append({"question_id": f"{ph.name}_{len(lines)}", "image": ph.name, "question": q,
                          "answers": [right, wrong] if first else [wrong, right], "right": 0 if first else 1})
    (root / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, lines


def swap_judged(root, name, position_bias):
    from stllava.demo.phantom_judge import JUDGE_NAME, serve

    server = serve(str(root / "facts.json"), str(root / "images"), position_bias=position_bias, noise_seed=11)
    try:
        rc = judge.main(["--answers", str(root / "answers.jsonl"), "--image-folder", str(root / "images"),
                         "--out", str(root / f"{name}.jsonl"), "--base-url", server.base_url, "--model", JUDGE_NAME,
                         "--concurrency", "8", "--swap-check"])
    finally:
        server.stop()
    assert rc == 0
    return [json.loads(x)["judge"] for x in open(root / f"{name}.jsonl")]


@pytest.mark.parametrize("p", [1.0, 0.5, 0.0])
def test_swap_check_catches_the_position_biased_phantom_judge(phantom_pairs, key_env, p):
    root, lines = phantom_pairs
    t0 = time.monotonic()
    got = swap_judged(root, f"bias{p}", p)
    caught = sum(j["status"] == "inconsistent" for j in got) / len(lines)
    kept = [(j, x) for j, x in zip(got, lines) if j["status"] == "ok"]
    assert all(j["chosen"] == x["right"] for j, x in kept)  # what survives the check is right
    assert all(j["status"] in ("ok", "inconsistent") for j in got)
    if p == 1.0:     # Answer 1 always wins: every pair flips with the order, none is kept
        assert caught == 1.0 and not kept
    elif p == 0.5:   # caught when the order with the wrong answer first is biased: half, 120 draws (sd 0.046)
        assert abs(caught - 0.5) < 0.15
    else:
        assert caught == 0.0 and len(kept) == len(lines)
    summary = json.loads((root / f"bias{p}.summary.json").read_text())
    assert summary["position_inconsistent"] == round(caught * len(lines))
    assert time.monotonic() - t0 < 120
