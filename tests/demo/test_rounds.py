"""Iterative self-training: round k starts from, and is referenced against, round k−1's model,
on a fresh draw of questions; per-round summaries on known inputs; the quick 2-round study."""
import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from stllava.demo import rounds
from stllava.demo.study import QUICK
from tests.demo.command_recorder import RecordingRunner, _Server


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_round_seeds_fresh_per_round_and_seed():
    assert rounds.round_seeds(1, 7) == {"questions": 7, "answers": 7, "train": 7}  # the one-round method's
    seen = {v for k in (2, 3) for seed in (0, 1) for v in rounds.round_seeds(k, seed).values()}
    assert len(seen) == 12  # every round, seed and step draws its own stream
    assert rounds.round_seeds(2, 0)["questions"] == rounds.stream_seed("round2-questions", 0)
    assert rounds.round_seeds(2, 0) == rounds.round_seeds(2, 0)
    with pytest.raises(ValueError):
        rounds.round_seeds(0, 0)


def test_two_rounds_chain_models_and_reference(tmp_path):
    """Round 2 asks, answers and trains from round 1's merged model, which is also DPO's reference
    (train_dpo's model with the adapters disabled) and the merge's base; fresh question seeds."""
    r = RecordingRunner(str(tmp_path))
    pool = rounds.Pool(r.path("unlabelled"), r.path("facts.json"))
    with mock.patch("stllava.demo.phantom_judge.serve", lambda facts, images, **kw: _Server()), \
            mock.patch.object(rounds, "pair_stats", lambda *a: {"pairs": 24}):
        out = rounds.run_rounds(r, r.path("cell"), r.path("sft", "merged"), pool, QUICK["loop"], 3, 2)
    by_log = {log: c for log, c, _ in r.commands}
    r1 = r.path("cell", "round1", "dpo-{key}", "merged")
    assert _arg(by_log["rounds_r1_q"], "--model-path") == r.path("sft", "merged")
    for log in ("rounds_r2_q", "rounds_r2_a"):
        assert _arg(by_log[log], "--model-path") == r1
    assert _arg(by_log["rounds_r2_dpo"], "--model_name_or_path") == r1
    assert _arg(by_log["rounds_r2_dpo"], "--ref_model") == "adapter_disabled"
    assert _arg(by_log["rounds_r2_dpo_merge"], "--model-base") == r1
    q1, q2 = _arg(by_log["rounds_r1_q"], "--seed"), _arg(by_log["rounds_r2_q"], "--seed")
    assert q1 == "3" and q2 == str(rounds.stream_seed("round2-questions", 3))
    assert _arg(by_log["rounds_r2_a"], "--seed") == str(rounds.stream_seed("round2-answers", 3))
    assert [x["round"] for x in out] == [1, 2]
    assert out[1]["start"] == os.path.relpath(r1, r.root) and out[1]["trained"] and out[1]["pairs"] > 0
    assert out[1]["model"] == os.path.join("cell", "round2", "dpo-{key}", "merged")


def _cell(seed, sft, r1, r2):
    row = lambda v: {"test": {"closed_acc": v, "open_recall": v / 2}, "pairs": 10}  # noqa: E731
    return {"seed": seed, "n_labelled": 100, "conditions": {"sft": {"test": {"closed_acc": sft,
                                                                             "open_recall": sft / 2}}},
            "rounds": [{"round": 1, **row(r1)}, {"round": 2, **row(r2)}]}


def test_summarize_on_known_inputs():
    study = rounds.summarize([_cell(1, 60.0, 63.0, 65.0), _cell(0, 70.0, 72.0, 71.0),
                              {"seed": 2, "n_labelled": 30, "conditions": {}}])  # no rounds: left out
    t = study["100"]
    assert t["round1"]["closed_acc"]["mean"] == 67.5 and t["round2"]["pairs"]["mean"] == 10
    assert t["round2 - round1"]["closed_acc"]["diffs"] == [-1.0, 2.0]  # seeds in order 0, 1
    assert t["round1 - sft"]["open_recall"]["diffs"] == [1.0, 1.5]
    assert "round1 - round1" not in t and list(study) == ["100"]
    assert rounds.summarize([{"seed": 0, "n_labelled": 100, "conditions": {}}]) == {}


def test_rounds_plan():
    plan = rounds.rounds_plan()
    assert plan["rounds"] == 3 and plan["sizes"] == (100,) and len(plan["seeds"]) == 5
    assert set(plan["conditions"]) == {"sft", "st"} and min(plan["seeds"]) >= 10  # not the search's seeds


@pytest.mark.slow
def test_quick_two_round_study(tmp_path):
    work = tmp_path / "rounds"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    # seed 10: a study refuses the settings search's seeds (0, 1); --quick keeps its own sizes and
    # seeds, so the plan's conditions are given here
    cmd = [sys.executable, "-m", "stllava.demo.study", "--quick", "--plan", "rounds", "--rounds", "2",
           "--conditions", "sft,st", "--seeds", "10", "--jobs", "1", "--workdir", str(work)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = json.load(open(work / "study.json"))
    (run,) = study["runs"]
    assert [x["round"] for x in run["rounds"]] == [1, 2]
    assert run["rounds"][1]["start"] == run["rounds"][0]["model"]
    assert run["rounds"][0]["seeds"]["questions"] != run["rounds"][1]["seeds"]["questions"]
    assert "round2" in study["rounds"]["24"]
