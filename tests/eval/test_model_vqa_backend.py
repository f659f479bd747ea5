"""model_vqa --backend openai against stllava.serve.api serving the same checkpoint: greedy answers
equal the in-process path's record for record; resume; a refused connection is one counted line."""
import json
import re
import socket

import pytest
from helpers.serving import model_server
from PIL import Image

from stllava.eval import model_vqa
from stllava.tooling import ToolError

QUESTIONS = ["What is shown in the image?", "Is there a fracture?", "Which side is abnormal?", "Is this a CT scan?",
             "How many lesions are there?", "Is the heart <image> enlarged?"]


@pytest.fixture()
def bench(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 9 * i, 36), (40 * i, 90, 200 - 30 * i)).save(folder / f"im{i}.png")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "image": f"im{i % 3}.png", "text": q}) + "\n"
                             for i, q in enumerate(QUESTIONS)))
    return folder, qfile


def _args(folder, qfile, out, *extra):
    return model_vqa.build_parser().parse_args([
        "--question-file", str(qfile), "--image-folder", str(folder), "--answers-file", str(out),
        "--max-new-tokens", "12", "--min-new-tokens", "3", "--no-progress", *extra])


def _texts(path):
    return [(r["question_id"], r["text"]) for r in map(json.loads, path.read_text().splitlines())]


def test_greedy_answers_through_the_server_equal_the_in_process_ones(pretrained, bench, tmp_path):
    folder, qfile = bench
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    model_vqa.run(_args(folder, qfile, local, "--model-path", "tiny", "--batch-size", "4"), loaded=pretrained[:3])
    with model_server(pretrained, "vicuna_v1", max_batch=8) as (url, backend):
        s = model_vqa.run(_args(folder, qfile, remote, "--backend", "openai", "--base-url", url, "--model", "tiny",
                                "--concurrency", "4"))
    assert _texts(remote) == _texts(local) and len(_texts(local)) == len(QUESTIONS)
    assert any(text for _, text in _texts(local))
    recs = [json.loads(line) for line in remote.read_text().splitlines()]
    assert {r["model_id"] for r in recs} == {"tiny"}
    settings = recs[0]["settings"]
    assert (settings["backend"], settings["base_url"], settings["model"]) == ("openai", url, "tiny")
    assert "model_path" not in settings and "conv_mode" not in settings
    assert s["answered"] == len(QUESTIONS) and s["remote"]["http_requests"] == len(QUESTIONS)
    assert s["remote"]["failed"] == 0 and s["remote"]["retries"] == {}
    assert max(backend.engine.batch_sizes) > 1  # the concurrent requests were batched by the server


def test_resume_asks_only_what_is_missing_and_refuses_another_server(pretrained, bench, tmp_path):
    folder, qfile = bench
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    with model_server(pretrained, "vicuna_v1") as (url, backend):
        remote = ("--backend", "openai", "--base-url", url, "--model", "tiny", "--concurrency", "2")
        model_vqa.run(_args(folder, qfile, full, *remote))
        lines = full.read_text().splitlines(keepends=True)
        part.write_text("".join(lines[:3]) + lines[3][:20])  # three records and a cut-short fourth
        s = model_vqa.run(_args(folder, qfile, part, *remote))
        assert s["already_answered"] == 3 and s["answered"] == 3 and s["remote"]["http_requests"] == 3
        assert _texts(part) == _texts(full)
        with pytest.raises(Exception, match="model"):  # another served name: another model, refused
            model_vqa.run(_args(folder, qfile, part, "--backend", "openai", "--base-url", url, "--model", "other"))
        with pytest.raises(Exception, match="backend"):  # the in-process path does not resume it either
            model_vqa.run(_args(folder, qfile, part, "--model-path", "tiny"), loaded=pretrained[:3])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_is_one_counted_line(bench, tmp_path, capsys, caplog):
    folder, qfile = bench
    caplog.set_level("INFO")
    url = f"http://127.0.0.1:{_free_port()}/v1"
    rc = model_vqa.main(["--question-file", str(qfile), "--image-folder", str(folder), "--answers-file",
                         str(tmp_path / "a.jsonl"), "--backend", "openai", "--base-url", url, "--model", "tiny",
                         "--no-progress", "--concurrency", "2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    # the two requests in flight race: either may be the first refused
    assert re.match(rf"error: cannot connect to {re.escape(url)}/ for question_id [01]: connection refused", lines[0])
    # counted, and not retried: each request that was in flight is one HTTP request and one failure
    counts = re.search(r"(\d+) HTTP requests, 0 completions, retries none, (\d+) failed", caplog.text)
    assert counts and counts[1] == counts[2] and 1 <= int(counts[1]) <= 2, caplog.text
    assert not (tmp_path / "a.jsonl").read_text()


@pytest.mark.parametrize("extra, why", [
    (("--model", "tiny"), "--base-url"),
    (("--base-url", "http://127.0.0.1:9/v1"), "--model"),
    (("--base-url", "http://10.1.2.3:8000/v1", "--model", "tiny"), "plain http"),
    (("--base-url", "http://127.0.0.1:9/v1", "--model", "tiny", "--model-path", "ckpt"), "--backend local"),
    (("--base-url", "http://127.0.0.1:9/v1", "--model", "tiny", "--num-beams", "2"), "beam"),
])
def test_flags_the_openai_backend_cannot_honour_are_refused(bench, tmp_path, extra, why, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    folder, qfile = bench
    with pytest.raises(ToolError, match=why):
        model_vqa.run(_args(folder, qfile, tmp_path / "a.jsonl", "--backend", "openai", *extra))


def test_the_local_backend_still_needs_a_model_path(bench, tmp_path):
    folder, qfile = bench
    with pytest.raises(ToolError, match="--model-path is required"):
        model_vqa.run(_args(folder, qfile, tmp_path / "a.jsonl"))
