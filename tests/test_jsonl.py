"""Shared JSONL helpers: numbered reads, clear errors, flushed appends, crash-tail repair."""
import json
import subprocess
import sys
import threading

import pytest

from stllava.jsonl import (
    JsonlError,
    JsonlWriter,
    iter_jsonl,
    read_jsonl,
    repair_tail,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_iter_gives_line_numbers_and_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2, "t": "é"}\n')
    assert list(iter_jsonl(p)) == [(1, {"a": 1}), (4, {"a": 2, "t": "é"})]
    assert read_jsonl(p) == [{"a": 1}, {"a": 2, "t": "é"}]


@pytest.mark.parametrize("line, reason", [
    ('{"a": 1', "not valid JSON (Expecting ',' delimiter at column 8)"),
    ("[1, 2]", "expected a JSON object, found list"),
    ("42", "expected a JSON object, found int"),
])
def test_bad_line_names_file_and_line(tmp_path, line, reason):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n' + line + '\n{"a": 4}\n')
    with pytest.raises(JsonlError) as info:
        list(iter_jsonl(p))
    err = info.value
    assert (err.path, err.line, err.reason) == (str(p), 3, reason)
    assert str(err).startswith(f"{p}, line 3: {reason}. Fix or delete that line")


def test_skip_bad_counts_and_keeps_everything_else(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\nnope\n{"a": 3}\n[]\n{"a": 5}\n')
    bad = []
    assert list(iter_jsonl(p, skip_bad=True, on_bad=bad.append)) == [(1, {"a": 1}), (3, {"a": 3}), (5, {"a": 5})]
    assert [e.line for e in bad] == [2, 4]


def test_truncated_tail_only_tolerated_when_asked(tmp_path):
    p = tmp_path / "cache.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": "cut sh')
    with pytest.raises(JsonlError, match="line 3"):
        list(iter_jsonl(p))
    assert read_jsonl(p, allow_truncated_tail=True) == [{"a": 1}, {"a": 2}]
    # a malformed line that is not the cut-short last one is still an error
    p.write_text('{"a": 1}\n{"a": 2\n{"a": 3}')
    with pytest.raises(JsonlError, match="line 2"):
        list(iter_jsonl(p, allow_truncated_tail=True))


def test_repair_tail(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"a": 1}\n{"a": 2')
    assert repair_tail(p) == len('{"a": 2')
    assert p.read_text() == '{"a": 1}\n'
    p.write_text('{"a": 1}\n{"a": 2}')          # complete record, only the newline missing
    assert repair_tail(p) == 0 and p.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert repair_tail(p) == 0 and repair_tail(tmp_path / "missing.jsonl") == 0


def test_writer_appends_after_repair_and_is_thread_safe(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"i": -1}\n{"i": -2, "x')
    with JsonlWriter(p) as w:
        threads = [threading.Thread(target=lambda k=k: [w.write({"i": k, "j": j, "pad": "x" * 500})
                                                        for j in range(50)]) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    records = read_jsonl(p)
    assert records[0] == {"i": -1} and len(records) == 1 + 200
    assert sorted((r["i"], r["j"]) for r in records[1:]) == [(k, j) for k in range(4) for j in range(50)]


def test_writer_flushes_each_record_before_a_kill(tmp_path):
    """A process killed right after write() returns (no close, no exit handlers) keeps the record."""
    p = tmp_path / "c.jsonl"
    code = ("import os, sys; from stllava.jsonl import JsonlWriter\n"
            "w = JsonlWriter(sys.argv[1]); w.write({'done': 1}); w.write({'done': 2}); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(p)]).returncode == 9
    assert read_jsonl(p) == [{"done": 1}, {"done": 2}]


def test_atomic_writers(tmp_path):
    write_jsonl_atomic(tmp_path / "x.jsonl", [{"a": 1}, {"b": "é"}])
    assert (tmp_path / "x.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    write_json_atomic(tmp_path / "y.json", [1, {"c": 2}], indent=None)
    assert json.loads((tmp_path / "y.json").read_text()) == [1, {"c": 2}]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.jsonl", "y.json"]  # no temp files left
