"""Shared JSONL helpers: numbered reads, clear errors, flushed appends, crash-tail repair."""
import json
import subprocess
import sys
import threading

import pytest

from stllava.jsonl import (
    EncodingError,
    JsonlError,
    JsonlWriter,
    dumps,
    iter_jsonl,
    read_jsonl,
    read_utf8,
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
    ('{"a": "open', "not valid JSON (Unterminated string starting at column 7)"),  # was "starting at at"
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


def test_a_line_that_is_not_utf8_is_named_or_skipped(tmp_path):
    """A Latin-1 line gave a bare UnicodeDecodeError without the file name."""
    p = tmp_path / "q.jsonl"
    p.write_bytes(b'{"a": 1}\n{"t": "caf\xe9"}\n{"a": 3}\n')
    with pytest.raises(JsonlError) as info:
        list(iter_jsonl(p))
    err = info.value
    assert (err.path, err.line) == (str(p), 2)
    assert err.reason == ("not UTF-8 text (byte 0xe9 at column 11); re-save the file as UTF-8 "
                          "(e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")
    assert str(err).startswith(f"{p}, line 2: not UTF-8 text")
    bad = []
    assert list(iter_jsonl(p, skip_bad=True, on_bad=bad.append)) == [(1, {"a": 1}), (3, {"a": 3})]
    assert [e.line for e in bad] == [2]
    with pytest.raises(JsonlError, match="line 2: not UTF-8"):  # not a cut-short tail: still an error
        list(iter_jsonl(p, allow_truncated_tail=True))


def test_a_tail_cut_inside_a_multibyte_character_is_trimmed(tmp_path, caplog):
    """Outputs are written with ensure_ascii=False: a kill can cut the last line inside "é"."""
    p = tmp_path / "answers.jsonl"
    first = dumps({"question_id": 1, "text": "été"}).encode()
    second = dumps({"question_id": 2, "text": "lésion"}).encode()
    cut = second[: second.index("é".encode()) + 1]  # the first of the two bytes of "é"
    p.write_bytes(first + b"\n" + cut)
    with pytest.raises(JsonlError, match="line 2: not UTF-8"):
        list(iter_jsonl(p))
    assert read_jsonl(p, allow_truncated_tail=True) == [{"question_id": 1, "text": "été"}]
    assert "dropping a cut-short last line" in caplog.text
    with JsonlWriter(p) as w:  # the resume path: trim the tail, append again
        w.write({"question_id": 2, "text": "lésion"})
    assert p.read_bytes() == first + b"\n" + second + b"\n"


def test_crlf_and_byte_order_mark(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": "\xc3\xa9"}\r\n')
    assert list(iter_jsonl(p)) == [(1, {"a": 1}), (2, {"a": "é"})]


def test_read_utf8_names_the_line_and_byte(tmp_path):
    p = tmp_path / "rule.txt"
    p.write_bytes("line one\nline twø\n".encode("latin-1"))
    with pytest.raises(EncodingError) as info:
        read_utf8(p)
    assert str(info.value) == (f"{p}, line 2: not UTF-8 text (byte 0xf8 at column 8); fix: re-save the file as "
                               "UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")
    p.write_bytes("\ufeffok é".encode("utf-8"))
    assert read_utf8(p) == "ok é"


# A path that is not a regular file (issue 21, docs/BadInputs.md): a folder is named as one, and a
# device is refused before it is read (reading /dev/zero never ends: it would fill the memory).

def _bounded(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child limited to 3 GiB of address space and 60 s: a reader that never
    ends fails there instead of taking the machine with it."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=limit)


@pytest.mark.parametrize("reader", ["iter_jsonl", "read_utf8"])
def test_a_device_is_refused_before_it_is_read(reader):
    proc = _bounded(f"from stllava.jsonl import NotAFileError, {reader} as r\n"
                    "try:\n    list(r('/dev/zero'))\nexcept NotAFileError as e:\n    print(e)\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("/dev/zero is not a regular file (a character device, which may never end); "
                                   "fix: give the path of a file")


@pytest.mark.parametrize("reader", [iter_jsonl, read_utf8])
def test_a_folder_is_named_as_a_folder(tmp_path, reader):
    from stllava.jsonl import NotAFileError

    (tmp_path / "q.jsonl").write_text("{}\n")
    with pytest.raises(NotAFileError) as e:
        list(reader(tmp_path))
    assert str(e.value) == f"{tmp_path} is a folder, not a file (it holds q.jsonl); fix: give the path of a file"
