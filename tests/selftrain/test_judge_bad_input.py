"""The judge with hostile servers and inputs (issue 14 §4): a 200 whose body is not JSON, a wrong
--base-url, a connection dropped without a reply, an image over the pixel limit, an empty answers
file, a rule file that is not UTF-8. Real openai client, real local servers."""
import json
import socket
import threading
import time

import pytest
from bad_files import write_bomb_png
from test_judge import KEY, Script, argv, count_200, make_dataset, statuses_by_question

from stllava.demo.openai_stub import ChatCompletionServer, Reply
from stllava.errors import EXIT_BAD_INPUT, EXIT_FAILED
from stllava.selftrain import judge

HTML = b"<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_a_transient_html_200_is_retried_and_changes_nothing(tmp_path, key_env):
    """A proxy answering 200 with an HTML page crashed the judge ('str' object has no attribute
    'usage', no summary). Now it is a failed attempt, asked again."""
    answers, folder = make_dataset(tmp_path)
    clean, faulty = tmp_path / "clean.jsonl", tmp_path / "faulty.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, clean, server, "--concurrency", "1")) == 0
    faults = {"q0": [Reply(raw_body=HTML, media_type="text/html")],
              "q6": [Reply(raw_body=b"<html>", media_type="text/html"), Reply(raw_body=b"{not json")]}
    with ChatCompletionServer(Script(faults)) as server:
        assert judge.main(argv(answers, folder, faulty, server)) == 0
    assert faulty.read_bytes() == clean.read_bytes()
    assert statuses_by_question(server)["q0"] == [200, 200] and statuses_by_question(server)["q6"] == [200] * 3
    summary = json.loads((tmp_path / "faulty.summary.json").read_text())
    assert summary["retries"] == {"malformed response": 3} and summary["complete"]


def test_a_persistent_html_200_ends_in_a_clear_error_within_the_bounds(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script({"q1": [Reply(raw_body=HTML, media_type="text/html")] * 10})) as server:
        code = judge.main(argv(answers, folder, out, server, "--max-retries", "2", "--concurrency", "1"))
    assert code == EXIT_FAILED and not out.exists()
    assert statuses_by_question(server)["q1"] == [200, 200, 200]  # 1 + --max-retries attempts, then stop
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    summary = json.loads((tmp_path / "j.summary.json").read_text())  # the summary is written
    assert summary["error"] == ("giving up on img1_q1 (line 2) after 3 attempts; last error: malformed response "
                                "(HTTP 200 with a body that is not JSON, starting "
                                "'<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>')")
    assert summary["retries"] == {"malformed response": 2}
    # q0 was judged first (the one paid request); q5's identical answers need no request and are
    # settled whenever the pool reaches them: nothing else was asked after q1 gave up
    assert summary["paid_requests"] == 1 and summary["http_requests"] == 4
    assert summary["status"]["ok"] == 1 and set(summary["status"]) <= {"ok", "identical"}
    assert count_200(server)["q0"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_fails_fast_naming_the_url(tmp_path, key_env):
    """A wrong --base-url retried for 43 s and ended with "Connection error."."""
    answers, folder = make_dataset(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.monotonic()
    code = judge.main(["--answers", str(answers), "--image-folder", str(folder), "--out", str(tmp_path / "j.jsonl"),
                       "--base-url", url, "--concurrency", "1"])
    assert code == EXIT_FAILED and time.monotonic() - t0 < 10
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    assert summary["error"].startswith(f"cannot connect to {url}/ for img0_q0 (line 1): connection refused "
                                       "([Errno 111] Connection refused); nothing is listening there. Fix: check "
                                       "--base-url")
    assert summary["http_requests"] == 1 and summary["retries"] == {}


def test_other_connection_errors_are_retried_then_name_url_and_cause(tmp_path, key_env):
    """A server that accepts and hangs up at once: a connection error that may pass, so retried."""
    answers, folder = make_dataset(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def hang_up():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        code = judge.main(["--answers", str(answers), "--image-folder", str(folder), "--out",
                           str(tmp_path / "j.jsonl"), "--base-url", url, "--concurrency", "1", "--max-retries", "1"])
    finally:
        listener.close()
    assert code == EXIT_FAILED
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    error = summary["error"]
    assert error.startswith(f"giving up on img0_q0 (line 1) after 2 attempts; last error: connection to {url}/ (")
    # the cause, as the HTTP stack saw the hang-up (which one depends on timing)
    assert "Server disconnected without sending a response" in error or "Connection reset by peer" in error
    assert error.endswith("). Rerun later (finished items are reused) or raise --max-retries.")
    assert summary["retries"] == {"connection": 1} and len(accepted) == 2


def test_an_image_over_the_pixel_limit_is_named_or_skipped(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    write_bomb_png(folder / "xray.jpg")  # questions 1, 4, 7: a 15000x15000 PNG (misnamed, as data often is)
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, out, server)) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err == (f"error: {answers}, line 2: image {folder / 'xray.jpg'} cannot be read: image too large: "
                       "225,000,000 pixels, over the limit of 89,478,485; set STLLAVA_MAX_IMAGE_PIXELS to accept "
                       "larger images. Fix the record, or pass --skip-bad to skip and count it.\n")
        assert server.requests == []
        assert judge.main(argv(answers, folder, out, server, "--skip-bad")) == 0
    summary = json.loads((tmp_path / "j.summary.json").read_text())
    assert summary["skipped_bad_input"] == 3 and [s["line"] for s in summary["skipped"]] == [2, 5, 8]
    assert [json.loads(line)["question"] for line in out.read_text().splitlines()] == ["q0", "q2", "q3", "q5", "q6"]


def test_an_empty_answers_file_is_an_error_unless_allowed(tmp_path, key_env, capsys):
    _, folder = make_dataset(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "j.jsonl"
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(empty, folder, out, server)) == EXIT_BAD_INPUT
        assert capsys.readouterr().err == (f"error: {empty} holds no records; fix: pass the answers file of the "
                                           "answers stage (or --allow-empty when an empty file is expected)\n")
        assert judge.main(argv(empty, folder, out, server, "--allow-empty")) == 0
    assert out.read_text() == ""


def test_a_rule_file_that_is_missing_or_not_utf8_is_one_line(tmp_path, key_env, capsys):
    answers, folder = make_dataset(tmp_path)
    rule = tmp_path / "rule_v2.txt"
    rule.write_bytes("Rate each answer for the médical image.".encode("latin-1"))
    with ChatCompletionServer(Script()) as server:
        assert judge.main(argv(answers, folder, tmp_path / "j.jsonl", server, "--rule", str(rule))) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"error: {rule}, line 1: not UTF-8 text (byte 0xe9 at column 27)") and err.count("\n") == 1
        rule.unlink()
        assert judge.main(argv(answers, folder, tmp_path / "j.jsonl", server, "--rule", str(rule))) == EXIT_BAD_INPUT
        assert capsys.readouterr().err == (f"error: {rule}: cannot read the rule file (No such file or directory); "
                                           "fix: --rule\n")
