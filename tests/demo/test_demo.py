"""A shortened self-training loop end to end: every stage of `make demo`, real commands, minutes."""
import json
import os
import subprocess
import sys

import pytest

from stllava.demo.pipeline import STAGES

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


def demo(work, *extra, timeout=900):
    cmd = [sys.executable, "-m", "stllava.demo", "--quick", "--workdir", str(work), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_quick_demo_loop_end_to_end(tmp_path):
    work, twin = tmp_path / "demo", tmp_path / "twin"
    # two fresh runs in separate processes, side by side (one CPU thread each): the second is the
    # reproducibility check of the whole loop, from nothing, below
    cmd = [sys.executable, "-m", "stllava.demo", "--quick", "--workdir", str(twin)]
    second = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = demo(work)
    _, twin_err = second.communicate(timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert second.returncode == 0, twin_err[-3000:]
    # same seed, same numbers: two fresh runs give the same summary.json, byte for byte
    assert (twin / "report" / "summary.json").read_bytes() == (work / "report" / "summary.json").read_bytes()
    # every stage produced its real artefact, and says so in its marker
    for folder in ("tiny", "data", "labelled", "sft", "selftrain/questions", "selftrain/answers", "selftrain/judged",
                   "selftrain/pairs", "dpo"):
        assert (work / folder / ".done.json").exists(), folder
    assert (work / "sft" / "train" / "adapter_model.safetensors").exists()
    assert (work / "sft" / "train" / "Vit-lora").is_dir() and (work / "sft" / "merged" / "config.json").exists()
    questions = [json.loads(x) for x in open(work / "selftrain" / "questions" / "questions.jsonl")]
    assert len(questions) == 16 and all(q["questions"] for q in questions)
    judged = [json.loads(x) for x in open(work / "selftrain" / "judged" / "judged.jsonl")]
    assert judged and all(j["judge"]["model"] == "phantom-judge" for j in judged)
    pairs = json.load(open(work / "selftrain" / "pairs" / "dpo_all.json"))
    assert pairs, "the quick loop must yield preference pairs for DPO"
    assert all(p["chosen_conversations"][0]["value"].startswith("<image>\n") for p in pairs)
    assert (work / "dpo" / "train" / "adapter_model.safetensors").exists()

    summary = json.load(open(work / "report" / "summary.json"))
    m = summary["metrics"]
    # the start model is random: SFT must have learned the phantom task from 240 labelled phantoms
    assert m["start"]["phantom"]["closed_acc"] < 20.0 < m["sft"]["phantom"]["closed_acc"]
    assert summary["self_training_effect"]["closed_acc"] == pytest.approx(
        m["dpo"]["phantom"]["closed_acc"] - m["sft"]["phantom"]["closed_acc"])
    kinds = m["sft"]["phantom"]["per_kind"]
    assert set(kinds["closed"]) == {"presence", "modality", "side", "count"}
    assert set(kinds["open"]) <= {"modality", "count", "side", "size"} and "modality" in kinds["open"]
    assert summary["pairs"]["pairs"] == len(pairs)
    assert summary["self_questions"]["questions"] == sum(len(q["questions"]) for q in questions)
    report = (work / "report" / "README.md").read_text()
    assert "phantom judge" in report and "| stage 3: DPO on self-made pairs |" in report
    assert "Self-training effect in this run" in report
    assert "timings" not in summary and "sft" in json.load(open(work / "timings.json"))

    # a rerun reuses every finished stage; redoing the pairs (and what follows: DPO, evaluation,
    # report) gives the same summary.json, byte for byte
    before = (work / "report" / "summary.json").read_bytes()
    again = demo(work, "--redo", "pairs", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "report" / "summary.json").read_bytes() == before

    # README's pictures come from the run (``--figures``): the report's curves and a row of test phantoms
    from PIL import Image

    from stllava.demo.pipeline import Demo, DemoConfig
    from stllava.demo.report import copy_figures

    images = tmp_path / "images"
    written = copy_figures(Demo(DemoConfig(workdir=str(work))), str(images))
    assert sorted(os.listdir(images)) == ["demo_dpo_rewards.png", "demo_sft_loss.png", "phantoms.png"]
    assert all(Image.open(p).size[0] > 300 for p in written)


def test_bad_redo_stage_is_a_usage_error(tmp_path):
    out = demo(tmp_path / "demo", "--redo", "nonsense", timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_stage_list_matches_the_pipeline(tmp_path):
    from stllava.demo.pipeline import Demo, DemoConfig

    assert list(Demo(DemoConfig(workdir=str(tmp_path))).stage_table()) == STAGES
