"""A shortened self-training loop end to end: every stage of `make demo`, real commands, minutes."""
import json
import os
import subprocess
import sys

import pytest

from stllava.demo.pipeline import STAGES

pytestmark = pytest.mark.slow


def test_quick_demo_loop_end_to_end(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "stllava.demo", "--quick", "--workdir", str(work)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in STAGES:
        assert (work / ".done" / stage).exists(), stage
    # every stage produced its real artefact
    assert (work / "sft" / "adapter_model.safetensors").exists() and (work / "sft" / "Vit-lora").is_dir()
    assert (work / "sft" / "non_lora_trainables.bin").exists()
    questions = [json.loads(x) for x in open(work / "selftrain" / "questions.jsonl")]
    assert len(questions) == 16 and all(q["questions"] for q in questions)
    judged = [json.loads(x) for x in open(work / "selftrain" / "judged.jsonl")]
    assert judged and all(j["judge"]["model"] == "phantom-judge" for j in judged)
    pairs = json.load(open(work / "selftrain" / "dpo_all.json"))
    assert pairs, "the quick loop must yield preference pairs for DPO"
    assert all(p["chosen_conversations"][0]["value"].startswith("<image>\n") for p in pairs)
    for model in ("start", "sft", "dpo"):
        for bench in ("phantom", "vqa_rad"):
            m = json.load(open(work / "eval" / model / bench / "metrics.json"))
            assert "closed_acc" in json.dumps(m)
    report = (work / "report" / "README.md").read_text()
    assert "phantom judge" in report and "| stage 3: DPO |" in report
    summary = json.load(open(work / "report" / "summary.json"))
    assert set(STAGES) - {"report"} <= set(summary["timings"])
    assert "novel" in summary["self_questions"]
    assert 0.0 <= summary["dpo_heldout"]["reward_accuracy"] <= 1.0
    assert (work / "dpo" / "adapter_model.safetensors").exists() and (work / "dpo_merged" / "config.json").exists()

    # a rerun reuses every finished stage and is fast
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stderr.count("done before, reused") == len(STAGES)
