"""Run comparison report (stllava.eval.report) and the eval shell scripts, end to end."""
import csv
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from stllava.eval import metrics, report
from stllava.eval.report import ReportError

REPO = pathlib.Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gt(qid, answer, answer_type):
    return {"id": qid, "image": f"{qid}.jpg", "answer_type": answer_type,
            "conversations": [{"from": "human", "value": f"<image>\nQ{qid}?"},
                              {"from": "gpt", "value": answer}]}


GT = [_gt(1, "left lung", "OPEN"), _gt(2, "yes", "CLOSED"), _gt(3, "no", "CLOSED")]


def _scored(folder, benchmark, texts):
    preds = [{"question_id": i + 1, "text": t} for i, t in enumerate(texts)]
    metrics.write_outputs(metrics.score(GT, preds), folder, {"benchmark": benchmark})
    return folder


def test_report_tables_csv_and_png(tmp_path):
    # run A: one folder holding two benchmarks; run B: a single metrics folder
    _scored(tmp_path / "a" / "vqa_rad", "vqa_rad", ["left left", "yes", "nodule"])
    _scored(tmp_path / "a" / "slake", "slake", ["left lung", "no", "no"])
    _scored(tmp_path / "b", "vqa_rad", ["lung", "Yes.", "No"])
    table = report.build_report([("A", str(tmp_path / "a")), ("B", str(tmp_path / "b"))],
                                tmp_path / "out", paper=True)
    assert list(table) == ["vqa_rad", "slake"]
    # A/vqa_rad: recall 2/3 → 66.67, F1 0.8 → 80.00, closed 2/2 substring, 1/2 strict
    a = table["vqa_rad"]["runs"]["A"]
    assert a["open_recall"] == pytest.approx(200 / 3) and a["closed_acc_strict"] == 50.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## VQA-RAD" in md and "## SLAKE" in md
    assert "| A | 66.67 | 80.00 | 100.00 | 50.00 |" in md
    # B/vqa_rad: "lung" vs "left lung": P 1, R 1/2, F1 2/3
    assert "| B | 50.00 | 66.67 | 100.00 | 100.00 |" in md
    assert "| STLLaVA-Med-7B (paper) | 37.12 | 10.83 | 60.35 | – |" in md
    assert "| STLLaVA-Med-7B (paper) | 46.69 | 11.46 | 57.69 | – |" in md
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["slake"]["paper"]["closed_acc"] == 57.69
    assert saved["slake"]["runs"]["A"]["closed_acc"] == 50.0
    with (tmp_path / "out" / "per_question.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and {r["run"] for r in rows} == {"A", "B"}
    assert {(r["run"], r["benchmark"]) for r in rows} == {("A", "vqa_rad"), ("A", "slake"),
                                                          ("B", "vqa_rad")}
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 5000
    from PIL import Image
    with Image.open(tmp_path / "out" / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


def test_report_without_paper_has_no_paper_row(tmp_path):
    _scored(tmp_path / "r", "pvqa", ["left lung", "yes", "no"])
    report.build_report([("R", str(tmp_path / "r"))], tmp_path / "out", make_plot=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## PathVQA" in md and "(paper)" not in md
    assert not (tmp_path / "out" / "report.png").exists()


def test_report_refuses_bad_runs(tmp_path, capsys):
    with pytest.raises(ReportError, match="expected NAME=DIR"):
        report.parse_run_arg("just-a-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.json"):
        report.load_run(tmp_path / "empty")
    _scored(tmp_path / "r", "vqa_rad", ["a", "b", "c"])
    with pytest.raises(ReportError, match="unique"):
        report.collect([("X", str(tmp_path / "r")), ("X", str(tmp_path / "r"))])
    assert report.main(["--run", f"X={tmp_path / 'empty'}", "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


# --- scripts/eval/*.sh with a stand-in answering model ----------------------------------------
FAKE_MODEL_VQA = '''
import argparse, json, math, os, pathlib
p = argparse.ArgumentParser()
for flag in ("--model-path", "--question-file", "--image-folder", "--answers-file", "--conv-mode"):
    p.add_argument(flag, required=True)
p.add_argument("--num-chunks", type=int, required=True)
p.add_argument("--chunk-idx", type=int, required=True)
p.add_argument("--temperature", type=float, required=True)
a = p.parse_args()
if os.environ.get("FAIL_CHUNK") == str(a.chunk_idx):
    raise SystemExit("stand-in model failed")
questions = [json.loads(l) for l in open(a.question_file)]
size = math.ceil(len(questions) / a.num_chunks)
chunk = questions[a.chunk_idx * size:(a.chunk_idx + 1) * size]
truth = {str(t["id"]): t["conversations"][1]["value"]
         for t in json.load(open(pathlib.Path(a.question_file).with_name("test.json")))}
with open(a.answers_file, "w") as f:
    for q in chunk:
        f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                            "text": truth[str(q["question_id"])], "answer_id": "x",
                            "model_id": a.model_path,
                            "metadata": {"gpu": os.environ["CUDA_VISIBLE_DEVICES"]}}) + "\\n")
'''


def _fake_python(tmp_path):
    """An interpreter wrapper that runs the stand-in for `-m stllava.eval.model_vqa`."""
    (tmp_path / "fake_model_vqa.py").write_text(FAKE_MODEL_VQA)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'''#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "stllava.eval.model_vqa" ]; then
    shift 2; exec "{sys.executable}" "{tmp_path / 'fake_model_vqa.py'}" "$@"
fi
exec "{sys.executable}" "$@"
''')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def _synthetic_vqa_rad(tmp_path):
    """Five VQA-RAD split-file records and their (dummy) images; returns the script's env."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(5):
        (images / f"synpic{i}.jpg").write_bytes(b"jpg")
        records.append({"qid": 100 + i, "image_name": f"synpic{i}.jpg", "question": f"Q{i}?",
                        "answer": ["yes", "no", "left lung", "axial", "Yes"][i],
                        "answer_type": ["CLOSED", "CLOSED", "OPEN", "OPEN", "CLOSED"][i],
                        "phrase_type": "freeform"})
    (tmp_path / "testset.json").write_text(json.dumps(records))
    return {**os.environ, "PYTHON": str(_fake_python(tmp_path)), "CUDA_VISIBLE_DEVICES": "3,5",
            "MODEL_PATH": "ckpt/stllava-test", "SRC": str(tmp_path / "testset.json"),
            "IMAGE_FOLDER": str(images), "EVAL_ROOT": str(tmp_path / "eval")}


def test_vqa_rad_script_shards_merges_and_scores(tmp_path):
    env = _synthetic_vqa_rad(tmp_path)
    proc = subprocess.run(["bash", str(REPO / "scripts/eval/vqa_rad.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = tmp_path / "eval/vqa_rad/answers/stllava-test"
    merged = [json.loads(l) for l in (answers / "merge.jsonl").read_text().splitlines()]
    assert [m["question_id"] for m in merged] == [100, 101, 102, 103, 104]
    assert [m["metadata"]["gpu"] for m in merged] == ["3", "3", "3", "5", "5"]
    assert sorted(p.name for p in answers.iterdir()) == ["2_0.jsonl", "2_1.jsonl", "merge.jsonl"]
    result = json.loads((tmp_path / "eval/results/stllava-test/vqa_rad/metrics.json").read_text())
    assert result["benchmark"] == "vqa_rad"
    assert result["overall"]["closed_acc"] == 100.0 and result["overall"]["open_recall"] == 100.0
    assert result["overall"]["n_scored"] == 5


def test_vqa_rad_script_stops_when_a_shard_fails(tmp_path):
    env = {**_synthetic_vqa_rad(tmp_path), "FAIL_CHUNK": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts/eval/vqa_rad.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "answering shard 1 of 2 failed" in proc.stderr
    assert not (tmp_path / "eval/results").exists()


def test_scripts_differ_only_in_their_benchmark():
    def skeleton(name):
        lines = (REPO / "scripts/eval" / name).read_text().splitlines()
        return [l for l in lines if not l.startswith("#") and not l.startswith(("BENCH=", "SRC=",
                                                                               "IMAGE_FOLDER="))]
    assert skeleton("vqa_rad.sh") == skeleton("slake.sh") == skeleton("pvqa.sh")
    for name, bench in (("vqa_rad.sh", "vqa_rad"), ("slake.sh", "slake"), ("pvqa.sh", "pvqa")):
        assert f"BENCH={bench}\n" in (REPO / "scripts/eval" / name).read_text()
