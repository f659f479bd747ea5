"""JSON Lines helpers shared by the stage-2 tools (questions, answers, judge, build_pairs).

Three needs, written once:

* **reading** with the line number of every record and an error that names the file, the line and
  the fix when a line is not a JSON object (or skipping such lines when the caller asks to);
* **appending** one record per line, flushed at once, so that a run killed at any moment leaves
  every record it finished on disk (a ``kill -9`` can at worst cut the *last* line short);
* **resuming**: a cut-short last line is recognised (it has no trailing newline), dropped with a
  warning and trimmed off before appending again, instead of being reported as corrupt data --
  also when the cut falls inside a multi-byte UTF-8 character (records are written with
  ``ensure_ascii=False``);
* **opening**: a path that is a folder is named as one, and a device, pipe or socket is refused
  before it is read (:func:`not_a_file`, :class:`NotAFileError`): reading ``/dev/zero`` never ends;
* **decoding**: files are UTF-8; a file that is not (e.g. saved as Latin-1) is refused naming the
  file, the line and the byte (:class:`EncodingError`, :func:`read_utf8`), never a bare
  ``UnicodeDecodeError``.

The standard ``json`` module does the parsing; what no library does for us is the line-numbered
error and the tail repair, hence this small module.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from stllava.errors import StllavaError

logger = logging.getLogger(__name__)

__all__ = [
    "EncodingError",
    "JsonlError",
    "JsonlWriter",
    "NotAFileError",
    "dumps",
    "iter_jsonl",
    "not_a_file",
    "read_jsonl",
    "read_utf8",
    "repair_tail",
    "write_json_atomic",
    "write_jsonl_atomic",
]


class JsonlError(StllavaError, ValueError):
    """A line of a JSONL file is not a JSON object. ``path`` and ``line`` (1-based) say where. The
    message names no flag: a tool that can skip such lines (the judge's ``--skip-bad``) says so itself."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(
            f"{self.path}, line {line}: {reason}. Fix or delete that line (each line must be one JSON object)"
        )


class EncodingError(StllavaError, ValueError):
    """A file that is not UTF-8 text; the message names the file, the line and the byte."""


class NotAFileError(StllavaError, OSError):
    """A path that exists but is not a regular file: a folder, or a device, pipe or socket."""


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
          (stat.S_ISSOCK, "a socket"))


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a data file although it exists, e.g. ``"is a folder, not a
    file (it holds a.json, b.jsonl)"`` or ``"is not a regular file (a character device, which may
    never end)"``; None for a regular file (or a link to one) and for a path that does not exist
    (``open`` names that)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        try:
            data = sorted(n for n in os.listdir(path) if n.endswith((".json", ".jsonl")))
        except OSError:
            data = []
        held = ", ".join(data[:5]) + (", …" if len(data) > 5 else "") if data else "no .json or .jsonl file"
        return f"is a folder, not a file (it holds {held})"
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"is not a regular file ({kind}, which may never end)"


def check_regular_file(path: str | os.PathLike) -> None:
    """Refuse (:class:`NotAFileError`) a ``path`` that exists but is not a regular file (see
    :func:`not_a_file`) before anything reads it; returns None otherwise."""
    why = not_a_file(path)
    if why is not None:
        raise NotAFileError(f"{path} {why}; fix: give the path of a file")


_UTF8_FIX = "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column})"


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path`` decoded as UTF-8 (a leading byte-order mark is dropped).

    Refuses (:class:`EncodingError`) a file that is not UTF-8, naming the file, the line, the
    column and the byte, and (:class:`NotAFileError`) a folder or a device. Raises FileNotFoundError
    / OSError as ``open`` does."""
    check_regular_file(path)
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise EncodingError(f"{path}, line {line}: {_not_utf8(data[e.start], column)}; fix: {_UTF8_FIX}") from None


def dumps(record: Any) -> str:
    """One record as a single JSON line (no newline). Non-ASCII is kept as is (files are UTF-8)."""
    return json.dumps(record, ensure_ascii=False)


def _parse_line(path, lineno: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        # json's message for an open string ends in "starting at" (the position follows in str(e)).
        raise JsonlError(path, lineno, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise JsonlError(path, lineno, f"expected a JSON object, found {type(record).__name__}")
    return record


def iter_jsonl(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    on_bad: Callable[[JsonlError], None] | None = None,
    allow_truncated_tail: bool = False,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every non-blank line of ``path`` (1-based numbers).

    Refuses (raises :class:`JsonlError`) a line that is not a JSON object or not UTF-8 text, unless
    ``skip_bad``: then the line is skipped and ``on_bad(error)`` is called (use it to count and log).
    With ``allow_truncated_tail`` a malformed *last* line that lacks its newline -- what a
    killed writer leaves, possibly cut inside a multi-byte character -- is dropped with a warning
    instead (resume files only). Raises FileNotFoundError naming the path when it does not exist,
    :class:`NotAFileError` for a folder or a device.
    """
    path = Path(path)
    check_regular_file(path)
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
        data = data[3:]
    # Lines are decoded one by one, so a bad byte is reported on its own line and a cut-short tail
    # can be recognised whatever it was cut in. bytes.splitlines splits on \n, \r\n and \r, like
    # reading in text mode did.
    lines = data.splitlines(keepends=True)
    for i, raw in enumerate(lines):
        lineno = i + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            text, bad_byte = None, (raw[e.start], e.start + 1)
        if text is not None and not text.strip():
            continue
        try:
            if text is None:
                raise JsonlError(path, lineno, f"{_not_utf8(*bad_byte)}; {_UTF8_FIX}")
            yield lineno, _parse_line(path, lineno, text.rstrip("\r\n"))
        except JsonlError as err:
            last_cut = i == len(lines) - 1 and not raw.endswith((b"\n", b"\r"))
            if allow_truncated_tail and last_cut:
                logger.warning("%s, line %d: dropping a cut-short last line (an interrupted write)",
                               path, lineno)
                continue
            if not skip_bad:
                raise
            if on_bad is not None:
                on_bad(err)


def read_jsonl(path: str | os.PathLike, **kwargs) -> list[dict]:
    """All records of ``path`` as a list (line numbers dropped). Same refusals as :func:`iter_jsonl`."""
    return [record for _, record in iter_jsonl(path, **kwargs)]


def repair_tail(path: str | os.PathLike) -> int:
    """Trim a cut-short last line (no trailing newline) off ``path``; return the bytes removed.

    A complete last line that only lacks its newline (valid JSON) gets the newline added instead
    (returns 0). Missing or empty files are left alone. Use before appending to a resume file.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        try:
            json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            f.truncate(start)
            logger.warning("%s: removed a cut-short last line (%d bytes) left by an interrupted run",
                           path, len(tail))
            return len(tail)
        f.write(b"\n")
        return 0


class JsonlWriter:
    """Append records to a JSONL file, one line each, flushed (optionally fsync'ed) per record.

    Thread-safe: concurrent ``write`` calls never interleave lines. Opening repairs a cut-short
    tail first (see :func:`repair_tail`), so appending after a crash yields a clean file.
    Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync
        self._lock = threading.Lock()

    def write(self, record: Any) -> None:
        """Append ``record`` as one line and flush it to the OS before returning."""
        line = dumps(record) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write ``records`` as a whole JSONL file: readers see the old file or the new one, never half."""
    _write_atomic(Path(path), "".join(dumps(r) + "\n" for r in records))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as one JSON document, atomically (temporary file + rename)."""
    _write_atomic(Path(path), json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")
