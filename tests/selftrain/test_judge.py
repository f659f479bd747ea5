"""The stage-2 judge against the real openai client and a scripted local chat-completions server."""
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from stllava.demo.openai_stub import ChatCompletionServer, Reply, request_images, request_text
from stllava.errors import EXIT_BAD_INPUT, EXIT_FAILED
from stllava.selftrain import judge
from stllava.selftrain.judge_client import JudgeInputError
from stllava.selftrain.judge_prompt import build_prompt, encode_image, load_rule, parse_scores, split_prompt

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK"

# question -> what the judge model replies (the "content" behaviour, present in every run)
REPLIES = {
    "q0": ["8 3\nAnswer 1 names the organ correctly."],
    "q1": ["2, 9\nAnswer 2 is right."],
    "q2": ["7.5 7.5\nBoth equally good."],             # tie
    "q3": ["I think the first one.", "6 4\nOn reflection, answer 1."],  # garbage, then fine
    "q4": ["Scores: 8 and 6", "8/10 6/10"],              # unparsable twice
    "q6": ["5 6\nAnswer 2."],
    "q7": ["9 1\nAnswer 1."],
}
# q5 has two identical answers: never sent.
EXPECTED_200 = {"q0": 1, "q1": 1, "q2": 1, "q3": 2, "q4": 2, "q6": 1, "q7": 1}


class Script:
    """A phantom judge: replies from REPLIES by question and ask number, after scripted faults."""

    def __init__(self, faults=None, hang_after=None):
        self.faults = {q: list(v) for q, v in (faults or {}).items()}
        self.ok = {}             # question -> 200 replies sent
        self.lock = threading.Lock()
        self.hang_after = hang_after  # after this many 200s in total, hang every request (503)

    def __call__(self, body):
        q = split_prompt(request_text(body))[0]
        with self.lock:
            if self.faults.get(q):
                return self.faults[q].pop(0)
            if self.hang_after is not None and sum(self.ok.values()) >= self.hang_after:
                return Reply(status=503, delay=30)
            n = self.ok.get(q, 0)
            self.ok[q] = n + 1
        replies = REPLIES[q]
        return replies[min(n, len(replies) - 1)]


def make_dataset(root: Path, n_bad_lines=()):
    """8 questions on 3 images: a PNG, a JPEG and a PNG misnamed .jpg. Returns (answers, folder)."""
    folder = root / "images"
    folder.mkdir()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(folder / "ct.png")
    Image.new("RGB", (16, 16), (10, 90, 200)).save(folder / "xray.jpg", format="JPEG")
    Image.new("L", (20, 12), 128).save(folder / "misnamed.jpg", format="PNG")
    images = ["ct.png", "xray.jpg", "misnamed.jpg"]
    lines = []
    for i in range(8):
        a1, a2 = f"answer A{i}", f"answer B{i}"
        if i == 5:
            a2 = a1 + "  "
        rec = {"question_id": f"img{i % 3}_q{i}", "image": images[i % 3], "question": f"q{i}",
               "answers": [a1, a2], "model": "stllava-test", "seeds": [i, 100 + i]}
        lines.append(json.dumps(rec))
    path = root / "answers.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, folder


def argv(answers, folder, out, server, *extra):
    return ["--answers", str(answers), "--image-folder", str(folder), "--out", str(out),
            "--base-url", server.base_url, "--timeout", "10", "--concurrency", "3", *extra]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def statuses_by_question(server):
    out = {}
    for r in server.requests:
        q = split_prompt(request_text(r["body"]))[0]
        out.setdefault(q, []).append(r["status"])
    return out


def count_200(server):
    return {q: s.count(200) for q, s in statuses_by_question(server).items()}


# ---------------------------------------------------------------------------- pure functions
def test_parse_scores_golden():
    assert parse_scores("8 6\nbecause") == (8.0, 6.0)
    assert parse_scores("8,6") == (8.0, 6.0)
    assert parse_scores("7.5, 9\n") == (7.5, 9.0)
    assert parse_scores("\n 3  4 \nx") == (3.0, 4.0)
    assert parse_scores("5 5") == (5.0, 5.0)
    for bad in ("Scores: 8 6", "8/10 6/10", "8", "8 6 5", "", None, "nan 3", "inf 2", "8\n6"):
        assert parse_scores(bad) is None, bad


def test_prompt_layout_golden_and_inverse():
    text = build_prompt("Q?", "A one", "A two", "RULE")
    assert text == ("[Question]\nQ?\n\n[Answer 1]\nA one\n\n[End of Answer 1]\n\n"
                    "[Answer 2]\nA two\n\n[End of Answer 2]\n\n[System]\nRULE\n\n")
    assert split_prompt(text) == ("Q?", "A one", "A two", "RULE")
    with pytest.raises(ValueError):
        split_prompt("[Question]\nQ?")


def test_rule_file_is_versioned_and_says_what_spec_asks():
    rule = load_rule()
    assert rule.version == "medical_v1" and len(rule.sha256) == 64
    for word in ("helpfulness", "relevance", "accuracy", "level of detail", "1 to 10",
                 "single line containing only two values"):
        assert word in rule.text


def test_encode_image_mime_from_bytes(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", format="PNG")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png", format="JPEG")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "c.bmp")
    data = (tmp_path / "a.jpg").read_bytes()
    assert encode_image(data) == ("image/png", data)
    assert encode_image((tmp_path / "b.png").read_bytes())[0] == "image/jpeg"
    mime, png = encode_image((tmp_path / "c.bmp").read_bytes())  # BMP: re-encoded
    assert mime == "image/png" and png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="not a readable image"):
        encode_image(b"GIF89a but not really")


def test_prompt_module_and_phantom_judge_do_not_import_openai():
    """A judge server (the demo's phantom judge) needs the prompt layout, not the HTTP client."""
    code = ("import sys, stllava.selftrain.judge_prompt, stllava.demo.phantom_judge; "
            "assert 'openai' not in sys.modules and 'httpx2' not in sys.modules, "
            "sorted(m for m in sys.modules if 'openai' in m or 'httpx' in m)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import sys, stllava.selftrain.judge; assert 'openai' in sys.modules"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the check above can fail: the run module does import it


def test_price_table_and_overrides():
    assert judge.price_for("gpt-4o") == (2.5, 10.0)
    assert judge.price_for("gpt-4o-2024-05-13") == (5.0, 15.0)
    assert judge.price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.6)
    assert judge.price_for("my-local-model") is None
    assert judge.price_for("my-local-model", 1.0, 2.0) == (1.0, 2.0)
    assert judge.price_for("gpt-4o", price_out=20.0) == (2.5, 20.0)


# ---------------------------------------------------------------------------- end to end
def test_request_body_matches_spec(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    rule = (REPO / "stllava/selftrain/rules/medical_v1.txt").read_text().strip()
    with ChatCompletionServer(Script(), api_key=KEY) as server:
        assert judge.main(argv(answers, folder, tmp_path / "j.jsonl", server)) == 0
    bodies = {split_prompt(request_text(r["body"]))[0]: r["body"] for r in server.requests}
    assert set(bodies) == set(EXPECTED_200)
    images = {0: "ct.png", 1: "xray.jpg", 2: "misnamed.jpg"}
    mimes = {0: "image/png", 1: "image/jpeg", 2: "image/png"}  # from the bytes, not the name
    for q, body in bodies.items():
        i = int(q[1:])
        assert body["model"] == "gpt-4o" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        text_part, image_part = body["messages"][0]["content"]
        assert text_part == {"type": "text", "text": (
            f"[Question]\nq{i}\n\n[Answer 1]\nanswer A{i}\n\n[End of Answer 1]\n\n"
            f"[Answer 2]\nanswer B{i}\n\n[End of Answer 2]\n\n[System]\n{rule}\n\n")}
        url = image_part["image_url"]["url"]
        prefix = f"data:{mimes[i % 3]};base64,"
        assert image_part["type"] == "image_url" and url.startswith(prefix)
        assert base64.b64decode(url[len(prefix):]) == (folder / images[i % 3]).read_bytes()
        assert request_images(body) == [(mimes[i % 3], (folder / images[i % 3]).read_bytes())]


def test_statuses_recorded_never_silently_decided(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script(), api_key=KEY) as server:
        assert judge.main(argv(answers, folder, out, server)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [f"q{i}" for i in range(8)]  # every item, input order
    j = {r["question"]: r["judge"] for r in rows}
    assert (j["q0"]["status"], j["q0"]["scores"], j["q0"]["chosen"], j["q0"]["margin"]) == ("ok", [8.0, 3.0], 0, 5.0)
    assert (j["q1"]["status"], j["q1"]["scores"], j["q1"]["chosen"]) == ("ok", [2.0, 9.0], 1)
    assert (j["q2"]["status"], j["q2"]["chosen"], j["q2"]["reply"]) == ("tie", None, REPLIES["q2"][0])
    assert j["q3"]["status"] == "ok" and j["q3"]["replies"] == REPLIES["q3"] and j["q3"]["chosen"] == 0
    assert j["q4"]["status"] == "unparsable" and j["q4"]["replies"] == REPLIES["q4"]
    assert j["q4"]["scores"] is None and j["q4"]["chosen"] is None
    assert j["q5"]["status"] == "identical" and j["q5"]["replies"] == []
    assert rows[0]["model"] == "stllava-test" and rows[0]["seeds"] == [0, 100]  # provenance kept
    assert j["q0"]["rule_version"] == "medical_v1" and j["q0"]["served_model"] == "gpt-4o"
    assert count_200(server) == EXPECTED_200
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    assert summary["status"] == {"identical": 1, "ok": 5, "tie": 1, "unparsable": 1}
    assert summary["paid_requests"] == 9 and summary["complete"] is True
    usage = sum(r["judge"]["usage"]["prompt_tokens"] + r["judge"]["usage"]["completion_tokens"] for r in rows)
    assert usage == summary["tokens_this_run"]["prompt"] + summary["tokens_this_run"]["completion"] > 0
    assert summary["cost_usd_this_run"] == pytest.approx(
        (summary["tokens_this_run"]["prompt"] * 2.5 + summary["tokens_this_run"]["completion"] * 10) / 1e6, abs=1e-6)


def test_reask_ties_asks_once_more(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, out, server, "--reask-ties")) == 0
    assert count_200(server) == {**EXPECTED_200, "q2": 2}
    q2 = json.loads(out.read_text().splitlines()[2])["judge"]
    assert q2["status"] == "tie" and q2["replies"] == REPLIES["q2"] * 2 and q2["chosen"] is None


def test_faults_are_retried_and_change_nothing(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    clean, faulty = tmp_path / "clean.jsonl", tmp_path / "faulty.jsonl"
    with ChatCompletionServer(Script()) as server:  # one request at a time, no faults
        assert judge.main(argv(answers, folder, clean, server, "--concurrency", "1")) == 0
    faults = {
        "q0": [Reply(status=429, headers={"Retry-After": "0.05"})],
        "q1": [Reply(status=500)],
        "q3": [Reply(status=503, delay=5)],            # hangs past the 1 s client timeout
        "q6": [Reply(status=429, headers={"Retry-After": "0.05"}), Reply(status=502)],
    }
    with ChatCompletionServer(Script(faults)) as server:
        t0 = time.monotonic()
        assert judge.main(argv(answers, folder, faulty, server, "--timeout", "1")) == 0
        elapsed = time.monotonic() - t0
    assert faulty.read_bytes() == clean.read_bytes()
    statuses = statuses_by_question(server)
    assert statuses["q0"] == [429, 200]
    assert statuses["q1"] == [500, 200]
    assert statuses["q3"] == [503, 200, 200]   # timed out, retried; then garbage, re-asked once
    assert statuses["q6"] == [429, 502, 200]
    assert statuses["q2"] == [200] and statuses["q4"] == [200, 200]
    assert count_200(server) == EXPECTED_200
    q0 = [r["time"] for r in server.requests if request_text(r["body"]).startswith("[Question]\nq0\n")]
    assert q0[1] - q0[0] >= 0.05  # Retry-After honoured
    summary = json.loads((tmp_path / "faulty.summary.json").read_text())
    assert summary["retries"] == {"429": 2, "5xx": 2, "timeout": 1}
    assert summary["http_requests"] == 9 + 5
    assert elapsed < 10


def test_gives_up_after_max_retries(tmp_path, key_env, caplog):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script({"q1": [Reply(status=500)] * 10})) as server:
        code = judge.main(argv(answers, folder, out, server, "--max-retries", "2", "--concurrency", "1"))
    assert code == EXIT_FAILED and not out.exists()
    assert statuses_by_question(server)["q1"] == [500, 500, 500]
    assert "giving up on img1_q1 (line 2) after 3 attempts" in caplog.text


def test_bad_request_stops_with_server_message_and_no_key(tmp_path, key_env, caplog):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    msg = f"Invalid image_url: image too large (you sent key {KEY})"
    with ChatCompletionServer(Script({"q2": [Reply(status=400, error=msg)]})) as server:
        code = judge.main(argv(answers, folder, out, server, "--concurrency", "1"))
    assert code == EXIT_FAILED and not out.exists()
    assert statuses_by_question(server)["q2"] == [400]          # not retried
    assert set(statuses_by_question(server)) == {"q0", "q1", "q2"}  # nothing new started after it
    assert "HTTP 400" in caplog.text and "Invalid image_url: image too large" in caplog.text
    assert KEY not in caplog.text
    summary = (tmp_path / "j.summary.json").read_text()
    assert "image too large" in summary and KEY not in summary


def test_resume_after_max_requests_pays_nothing_twice(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, tmp_path / "clean.jsonl", server)) == 0
    out = tmp_path / "j.jsonl"
    script = Script({"q1": [Reply(status=500)]})
    with ChatCompletionServer(script) as server:
        assert judge.main(argv(answers, folder, out, server, "--max-requests", "4")) == EXIT_FAILED
        assert not out.exists() and len(server.requests) == 4
        summary = json.loads((tmp_path / "j.summary.json").read_text())
        assert summary["complete"] is False and summary["pending"] > 0
        assert judge.main(argv(answers, folder, out, server, "--max-requests", "3")) == EXIT_FAILED
        cache = tmp_path / "j.cache.jsonl"
        with open(cache, "a") as f:
            f.write('{"key": "cut short by a kill", "rep')     # what a kill mid-write leaves
        assert judge.main(argv(answers, folder, out, server)) == 0
        entries = [json.loads(line) for line in cache.read_text().splitlines()]  # the cut line is gone
        assert len(entries) == sum(EXPECTED_200.values()) == len({e["key"] for e in entries})
        assert count_200(server) == EXPECTED_200       # every completion paid exactly once overall
        n = len(server.requests)
        assert judge.main(argv(answers, folder, out, server, "--max-requests", "0")) == 0  # all cached
        assert len(server.requests) == n
    assert out.read_bytes() == (tmp_path / "clean.jsonl").read_bytes()


def test_corrupt_cache_line_is_named(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    (tmp_path / "j.cache.jsonl").write_text('{"key": "k", "reply": "8 6", "usage": {}}\nXX\n{"key": "k2"}\n')
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, tmp_path / "j.jsonl", server)) == EXIT_BAD_INPUT
        assert server.requests == []
    err = capsys.readouterr().err
    assert f"error: resume cache: {tmp_path / 'j.cache.jsonl'}, line 2: not valid JSON" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_kill_9_mid_run_then_resume(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, tmp_path / "clean.jsonl", server)) == 0
    out = tmp_path / "j.jsonl"
    cache = tmp_path / "j.cache.jsonl"
    script = Script(hang_after=4)  # 4 completions, then every request hangs until killed
    with ChatCompletionServer(script) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        cmd = [sys.executable, "-m", "stllava.selftrain.judge",
               *argv(answers, folder, out, server, "--concurrency", "2")]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not (cache.exists() and len(cache.read_text().splitlines()) >= 4):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            time.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=10)
        assert len(cache.read_text().splitlines()) == 4 and not out.exists()
        script.hang_after = None
        assert judge.main(argv(answers, folder, out, server)) == 0
        assert count_200(server) == EXPECTED_200
    assert out.read_bytes() == (tmp_path / "clean.jsonl").read_bytes()


def test_key_never_leaks_from_cli(tmp_path):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    env = {**os.environ, "MY_JUDGE_KEY": KEY}
    env.pop("OPENAI_API_KEY", None)
    texts = []
    faults = {"q1": [Reply(status=429, headers={"Retry-After": "0.01"})],
              "q4": [Reply(status=401, error=f"Incorrect API key provided: {KEY}")]}
    with ChatCompletionServer(Script(faults), api_key=KEY) as server:  # 401 unless the key is sent
        for extra in ([], ["--log-level", "DEBUG"]):
            cmd = [sys.executable, "-m", "stllava.selftrain.judge", "--api-key-env", "MY_JUDGE_KEY",
                   *argv(answers, folder, out, server, *extra)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            texts += [proc.stdout, proc.stderr]
        assert [p.returncode for p in [proc]] == [0]  # second run resumed past the 401
    assert "HTTP 401" in texts[1] and "Incorrect API key provided: ***" in texts[1]
    assert "retry 1/6" in texts[1]
    for f in tmp_path.iterdir():
        if f.is_file():
            texts.append(f.read_text(errors="replace"))
    assert len(texts) >= 7 and all(KEY not in t for t in texts)
    assert all(KEY not in json.dumps(r["body"]) for r in server.requests)


def test_missing_key_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    answers, folder = make_dataset(tmp_path)
    assert judge.main(["--answers", str(answers), "--image-folder", str(folder),
                       "--out", str(tmp_path / "j.jsonl")]) == EXIT_BAD_INPUT
    assert "error: no API key: set $OPENAI_API_KEY" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bad input
def test_malformed_line_is_named_or_skipped(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    lines = answers.read_text().splitlines()
    lines.insert(2, '{"question_id": "broken", "image": "ct.png",')    # line 3
    lines.insert(5, json.dumps({"question_id": "x", "image": "ct.png", "question": "q", "answers": ["a"]}))
    answers.write_text("\n".join(lines) + "\n")
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, out, server)) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"error: {answers}, line 3: not valid JSON" in err and "--skip-bad" in err
        assert server.requests == []
        assert judge.main(argv(answers, folder, out, server, "--skip-bad")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [f"q{i}" for i in range(8)]  # nothing else lost
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    assert summary["skipped_bad_input"] == 2
    assert [s["line"] for s in summary["skipped"]] == [3, 6]
    assert "at least two strings (found 1 items)" in summary["skipped"][1]["reason"]


def test_missing_or_unreadable_image_is_named_or_skipped(tmp_path, key_env):
    answers, folder = make_dataset(tmp_path)
    (folder / "xray.jpg").unlink()                       # questions 1, 4, 7
    (folder / "misnamed.jpg").write_bytes(b"not an image")  # questions 2, 5
    with pytest.raises(JudgeInputError, match=r"answers.jsonl, line 2: image 'xray.jpg' not found"):
        judge.load_items(answers, folder)
    items, skipped = judge.load_items(answers, folder, skip_bad=True)
    assert [it.record["question"] for it in items] == ["q0", "q3", "q6"]
    assert [s["line"] for s in skipped] == [2, 3, 5, 6, 8]
    assert "cannot be read" in skipped[1]["reason"]


def test_duplicate_question_id_is_refused(tmp_path):
    answers, folder = make_dataset(tmp_path)
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(JudgeInputError, match="line 9: question_id 'img0_q0' already used on line 1"):
        judge.load_items(answers, folder)
