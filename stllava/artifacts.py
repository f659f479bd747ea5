"""One "made with these settings from these inputs" marker for every step and tool.

Whatever stllava reuses instead of redoing records the settings it was made with, and is
checked against the settings of the run that wants to reuse it:

* the generating tools' output records (``settings`` in every JSONL record, ``stllava.tooling``);
* the demo's and the study's step folders (``<folder>/.done.json``, ``stllava.demo.runner``);
* the merged DPO start model (``<output_dir>/start_model/stllava_start_model.json``,
  ``stllava.train.train_dpo``);
* the cache of DPO reference log-probs (``ref_log_probs.json``, ``stllava.train.ref_cache``).

All of them use this module: one canonical form of the settings (:func:`canonical`), one marker
form on disk (a JSON object whose ``settings`` field holds that form, :func:`marker`), one
comparison that names each differing key as ``key: recorded → this run`` (:func:`mismatch`) and
one error (:class:`ArtifactError`). What a caller does with a mismatch is its own policy: the
tools and the demo refuse it (a result is never mixed with another setting's), the DPO start
model is merged again and the reference cache recomputed (see docs/Training.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from stllava.errors import StllavaError
from stllava.jsonl import write_json_atomic

SETTINGS = "settings"
# Files written before this module recorded their settings under these names (read, never written).
_LEGACY_FIELDS = ("fingerprint",)  # the reference log-prob cache


class _Absent:
    """A key one side of a comparison does not have (shown as ``absent``)."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


class ArtifactError(StllavaError):
    """An artifact (a file, a folder's marker, a record) that cannot be reused with this run's
    settings: made with other settings, or its marker is unreadable. ``reason`` is the message
    without file and fix (for callers that log it and redo the work); ``differences`` holds
    ``{key: (recorded, this run)}`` (empty for an unreadable marker)."""

    def __init__(self, message: str, *, file: str | None = None, record: str | int | None = None,
                 fix: str | None = None, differences: dict | None = None):
        self.reason, self.differences = message, differences or {}
        super().__init__(message, file=file, record=record, fix=fix)


def canonical(settings: Any) -> Any:
    """``settings`` as JSON reads it back: keys sorted, tuples as lists, anything JSON cannot hold
    (paths, dtypes, ...) as its ``str``. Two settings are the same exactly when their canonical
    forms are equal."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def digest(settings: Any, length: int = 10) -> str:
    """The first ``length`` hex digits of the SHA-256 of the canonical form's JSON text (sorted
    keys, ASCII): a short name that differs when any setting differs (the demo's ``{key}``
    folders)."""
    blob = json.dumps(canonical(settings), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def _compare(have: Any, want: Any) -> tuple[bool, dict[str, tuple[Any, Any]]]:
    if have == want:  # the common case, without a JSON round trip per record
        return True, {}
    have, want = canonical(have), canonical(want)
    if have == want:
        return True, {}
    have_d = have if isinstance(have, dict) else {}
    want_d = want if isinstance(want, dict) else {}
    keys = sorted(set(have_d) | set(want_d))
    return False, {k: (have_d.get(k, ABSENT), want_d.get(k, ABSENT)) for k in keys
                   if k not in have_d or k not in want_d or have_d[k] != want_d[k]}


def differences(have: Any, want: Any) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, this run)}`` for every key whose canonical value differs, sorted by key;
    a key one side lacks shows as :data:`ABSENT`. ``have`` that is not a JSON object (a record
    written without settings) counts as recording no key."""
    return _compare(have, want)[1]


def describe(diff: dict[str, tuple[Any, Any]]) -> str:
    """``"key: recorded → this run, ..."`` for :func:`differences` (values as ``repr``)."""
    return ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in diff.items())


def mismatch(have: Any, want: Any) -> str | None:
    """None when the recorded settings ``have`` equal this run's ``want`` (canonically); else the
    sentence naming what differs: ``"made with other settings (recorded → this run: k: a → b)"``,
    or, when ``have`` is not a settings object, ``"made without recorded settings ..."``."""
    same, diff = _compare(have, want)
    if same:
        return None
    if not isinstance(canonical(have), dict):
        return "made without recorded settings (written by an older version)"
    return f"made with other settings (recorded → this run: {describe(diff)})"


def check(have: Any, want: Any, *, file: str, record: str | int | None = None, fix: str | None = None) -> None:
    """Refuse (ArtifactError naming ``file``, ``record``, what differs and ``fix``) recorded
    settings ``have`` that differ from this run's ``want``; returns None when they match."""
    why = mismatch(have, want)
    if why is not None:
        raise ArtifactError(why, file=file, record=record, fix=fix, differences=differences(have, want))


def marker(settings: Any, **extra: Any) -> dict:
    """The marker object: ``extra``'s fields, then ``settings`` in canonical form."""
    return {**extra, SETTINGS: canonical(settings)}


def recorded_settings(obj: Any) -> Any:
    """The settings a marker object records: its ``settings`` field; a file written before this
    module may hold them under ``fingerprint`` (the reference cache) or be the settings object
    itself (the DPO start marker). Returns None for something that is not a JSON object."""
    if not isinstance(obj, dict):
        return None
    for name in (SETTINGS, *_LEGACY_FIELDS):
        if name in obj:
            return obj[name]
    return obj


def write_marker(path: str | os.PathLike, settings: Any, **extra: Any) -> None:
    """Write :func:`marker` ``(settings, **extra)`` to ``path`` atomically (readers see no half file)."""
    write_json_atomic(path, marker(settings, **extra))


def read_marker(path: str | os.PathLike, *, fix: str | None = None) -> Any:
    """The settings recorded in the marker file ``path`` (see :func:`recorded_settings`), or None
    when there is no such file. Refuses (ArtifactError naming ``path`` and ``fix``) a marker that
    is not readable JSON."""
    path = str(path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"unreadable marker ({e})", file=path, fix=fix) from None
    return recorded_settings(obj)


def check_marker(path: str | os.PathLike, settings: Any, *, fix: str | None = None) -> bool:
    """True when the marker file ``path`` records ``settings``, False when there is no marker.
    Refuses (ArtifactError naming ``path``, what differs and ``fix``) a marker made with other
    settings or unreadable."""
    path = str(path)
    if not os.path.isfile(path):
        return False
    check(read_marker(path, fix=fix), settings, file=path, fix=fix)
    return True


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path`` (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()
