"""answers --backend openai against stllava.serve.api serving the same checkpoint: the sampled
answers (each request carries its answer's derived seed) equal the in-process path's, record for
record; resume; retries counted and a failure stopping the run in one line (against the
scripted stub server); questions refuse the backend in one line."""
import json
import re

import pytest
from helpers.serving import model_server
from PIL import Image

from stllava.selftrain import answers, questions


@pytest.fixture()
def qa(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (44, 30 + 8 * i), (30 + 90 * i, 120, 60)).save(folder / f"im{i}.png")
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"image": f"im{i}.png", "questions": [f"What is in part {k}?" for k in range(3)],
                                         "question_ids": [f"im{i}.png#q{k}" for k in range(3)]}) + "\n"
                             for i in range(2)))
    return folder, qfile


def _args(folder, qfile, out, *extra):
    return answers.build_parser().parse_args([
        "--image-folder", str(folder), "--questions", str(qfile), "--out", str(out), "--max-new-tokens", "8",
        "--min-new-tokens", "2", "--no-progress", *extra])


def _answers(path):
    return [(r["question_id"], r["answers"], r["answer_seeds"]) for r in map(json.loads, path.read_text().splitlines())]


def test_sampled_answers_through_the_server_equal_the_in_process_ones(pretrained, qa, tmp_path):
    folder, qfile = qa
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    answers.run(_args(folder, qfile, local, "--model-path", "tiny", "--batch-size", "4"), loaded=pretrained[:3])
    with model_server(pretrained, "llava_v1", max_batch=8) as (url, _):
        s = answers.run(_args(folder, qfile, remote, "--backend", "openai", "--base-url", url, "--model", "tiny",
                              "--concurrency", "6"))
    assert _answers(remote) == _answers(local) and len(_answers(local)) == 6
    assert len({a for _, pair, _ in _answers(local) for a in pair}) > 3  # the seeds do give different samples
    assert s["written"] == 6 and s["remote"]["http_requests"] == 12 and s["remote"]["failed"] == 0
    rec = json.loads(remote.read_text().splitlines()[0])
    assert rec["model"] == "tiny" and rec["settings"]["backend"] == "openai" and rec["settings"]["base_url"] == url


def test_resume_after_a_cut_short_file(pretrained, qa, tmp_path):
    folder, qfile = qa
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    with model_server(pretrained, "llava_v1") as (url, _):
        remote = ("--backend", "openai", "--base-url", url, "--model", "tiny", "--concurrency", "4")
        answers.run(_args(folder, qfile, full, *remote))
        lines = full.read_text().splitlines(keepends=True)
        part.write_text("".join(lines[:2]) + lines[2][:15])
        s = answers.run(_args(folder, qfile, part, *remote))
    assert s["already_done"] == 2 and s["written"] == 4 and s["remote"]["http_requests"] == 8
    assert _answers(part) == _answers(full)


def test_questions_refuse_the_openai_backend_in_one_line(qa, tmp_path, capsys):
    folder, _ = qa
    rc = questions.main(["--image-folder", str(folder), "--out", str(tmp_path / "q.jsonl"), "--backend", "openai"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: --backend openai cannot ask the "
                                                               "self-questioning turn")


def test_retries_are_counted_a_failure_stops_the_run_in_one_line_and_a_rerun_resumes(qa, tmp_path, capsys, caplog):
    from stllava.demo.openai_stub import ChatCompletionServer, Reply, request_text

    folder, _ = qa
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"image": f"im{i}.png", "questions": [f"Q{i}{k}" for k in range(3)]}) + "\n"
                             for i in range(2)))
    state = {"broken": True, "seen": 0}

    def scorer(body):
        state["seen"] += 1
        text = request_text(body)
        if state["seen"] == 1:
            return Reply(status=429, headers={"Retry-After": "0"})
        if state["broken"] and text == "Q10":
            return Reply(status=500)
        return f"answer to {text} with seed {body['seed']} at T={body['temperature']} top_k={body['top_k']}"

    caplog.set_level("INFO")
    with ChatCompletionServer(scorer, model="stub") as server:
        argv = ["--image-folder", str(folder), "--questions", str(qfile), "--out", str(tmp_path / "a.jsonl"),
                "--backend", "openai", "--base-url", server.base_url, "--model", "stub", "--concurrency", "1",
                "--max-retries", "2", "--no-progress"]
        rc = answers.main(argv)
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and err.startswith("error: giving up on question 'im1.png#q0' after 3 "
                                                                   "attempts; last error: 500")
        counts = re.search(r"(\d+) HTTP requests, (\d+) completions, retries (.*), (\d+) failed", caplog.text)
        assert counts[2] == "6" and counts[3] == "{'429': 1, '5xx': 2}" and counts[4] == "1"
        assert counts[1] == "10"  # 6 answers + the 429 retry + the failing question's 3 attempts
        done = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in done] == ["im0.png#q0", "im0.png#q1", "im0.png#q2"]
        assert done[0]["answers"][0] == f"answer to Q00 with seed {done[0]['answer_seeds'][0]} at T=1.2 top_k=100"

        state["broken"] = False
        caplog.clear()
        assert answers.main(argv) == 0
        s = re.search(r"(\d+) HTTP requests, (\d+) completions, retries none, 0 failed", caplog.text)
        assert s[1] == s[2] == "6"  # only the three missing questions were asked
    done = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in done] == [f"im{i}.png#q{k}" for i in range(2) for k in range(3)]
