"""The stage-2 judge can be a served model: ``python -m stllava.selftrain.judge --base-url`` against
``python -m stllava.serve.api`` (both real processes). A random tiny model's scores are mostly
unparsable; the run must still complete and count every item."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
KEY = "sk-judge-served-0a1b2c"


@pytest.mark.slow
def test_judge_runs_against_the_served_model(tiny_bundle, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (32, 32), (10, 90, 200)).save(folder / "b.jpg", format="JPEG")
    records = [{"question_id": f"q{i}", "image": ["a.png", "b.jpg"][i % 2], "question": f"Is there a lesion {i}?",
                "answers": [f"yes, on the left {i}", f"no {i}"]} for i in range(5)]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "stllava.serve.api", "--model-path", tiny_bundle["model"],
                               "--device", "cpu", "--port", str(port), "--served-model-name", "tiny-judge",
                               "--batch-window-ms", "50"], cwd=REPO, env={**env, "STLLAVA_API_KEY": KEY},
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Application startup complete" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        out = tmp_path / "judged.jsonl"
        judge = subprocess.run(
            [sys.executable, "-m", "stllava.selftrain.judge", "--answers", str(answers), "--image-folder",
             str(folder), "--out", str(out), "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "tiny-judge",
             "--max-tokens", "16", "--concurrency", "5", "--timeout", "60"],
            cwd=REPO, env={**env, "OPENAI_API_KEY": KEY}, capture_output=True, text=True, timeout=300)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            health = json.load(r)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert judge.returncode == 0, judge.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(5)]  # every item, in order
    summary = json.loads((tmp_path / "judged.summary.json").read_text())
    assert sum(summary["status"].values()) == 5 and summary["complete"] is True
    assert set(summary["status"]) <= {"ok", "tie", "unparsable"}
    for r in rows:  # each reply is the model's text, scored or counted as unparsable
        assert r["judge"]["served_model"] == "tiny-judge" and r["judge"]["replies"]
    # every HTTP request the judge paid for was answered by the model, several in one generate call
    assert summary["paid_requests"] == health["requests"] >= 5
    assert health["batches"] < health["requests"] and health["failed_batches"] == 0
    assert KEY not in (tmp_path / "server.log").read_text()
