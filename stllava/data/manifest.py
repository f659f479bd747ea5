"""Checksums of a data folder: write a manifest another machine can verify against, and verify one.

A manifest is JSON, the same shape as a checkpoint's (``stllava/train/manifest.py``)::

    {"format": 1, "tool": "stllava.data.download", "sources": {...},
     "files": {"slake/test.json": {"sha256": "...", "size": 636288}, ...}}

``sources`` records where the files came from (hub repository and the commit it resolved to, base
URLs). Beside it the download writes ``SHA256SUMS`` in ``sha256sum`` format, so a machine without
stllava can check with ``sha256sum -c SHA256SUMS``.

:func:`verify_folder` re-hashes a folder against either format (a JSON manifest, or ``sha256sum``
lines ``<64 hex>  <path>`` / ``<64 hex> *<path>`` as in ``../shared/data/vqa_rad/SHA256SUMS``)
and returns the files missing, changed and extra, by name. "Extra" means a file under a folder the
manifest covers (the first component of each listed path) that the manifest does not list, so other
files beside the data folders are not counted. Paths from a manifest are relative and may not leave
its folder.

Files under ``.cache/`` (huggingface_hub's download metadata), ``.download/`` (the downloader's
own state) and ``*.part`` files (downloads in progress) are never listed nor counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from stllava.artifacts import file_sha256  # noqa: F401 (also this module's name for it)
from stllava.errors import StllavaError

MANIFEST_NAME, SUMS_NAME = "manifest.json", "SHA256SUMS"
IGNORED_DIRS = (".cache", ".download")
PART_SUFFIX = ".part"
_CHUNK = 1 << 22
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class ManifestError(StllavaError, ValueError):
    """A manifest or checksum file that cannot be read; the message names the file, line and fix."""


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git object id of the file at ``path`` (SHA-1 of ``"blob <size>\\0" + content``): what the
    Hugging Face hub publishes as ``blobId`` for files it does not store in LFS."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def ignored(rel: str) -> bool:
    """True for paths the manifest never lists: under ``.cache/`` or ``.download/``, or ``*.part``."""
    parts = PurePosixPath(rel).parts
    return any(p in IGNORED_DIRS for p in parts[:-1]) or rel.endswith(PART_SUFFIX)


def list_files(folder: Path, roots: Iterable[str]) -> list[str]:
    """Every regular file under ``folder/<root>`` for each root (a folder, walked recursively, or a
    file), as sorted ``/``-separated paths relative to ``folder``, ignored paths left out."""
    out = set()
    for root in roots:
        top = folder / root
        if top.is_file():
            out.add(root)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in IGNORED_DIRS]
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
                if not ignored(rel):
                    out.add(rel)
    return sorted(out)


def safe_relpath(rel: str, where: str) -> str:
    """``rel`` when it is a relative path that stays inside its folder; else :class:`ManifestError`."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise ManifestError(f"{where}: path {rel!r} is absolute or leaves the folder; fix: list paths relative "
                            "to the manifest's folder")
    return str(p)


def read_checksums(path: str | os.PathLike) -> dict[str, dict]:
    """Read a JSON manifest or a ``sha256sum`` file; returns ``{relative path: {"sha256", "size"?}}``.

    Refuses (:class:`ManifestError`) a missing file, JSON without a ``files`` object, a sums line
    that is not ``<64 hex>  <path>`` (naming the line), and paths that leave the folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file; fix: pass the manifest.json or SHA256SUMS written by "
                            "`python -m stllava.data.download`")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            files = json.loads(text)["files"]
            entries = {safe_relpath(rel, str(path)): {"sha256": str(e["sha256"]).lower(),
                                                       **({"size": int(e["size"])} if "size" in e else {})}
                       for rel, e in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{path}: not a manifest ({type(e).__name__}: {e}); fix: pass the manifest.json "
                                "written by `python -m stllava.data.download`") from None
        return entries
    entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _SUMS_LINE.match(line.rstrip("\r"))
        if not m:
            raise ManifestError(f"{path}: line {n}: expected '<sha256>  <path>' (sha256sum format), got "
                                f"{line[:80]!r}; fix: pass a manifest.json or a file written by sha256sum")
        entries[safe_relpath(m.group(2), f"{path}: line {n}")] = {"sha256": m.group(1).lower()}
    return entries


def write_manifest(folder: Path, files: dict[str, dict], sources: dict) -> Path:
    """Write ``folder/manifest.json`` (``files``: ``{rel: {"sha256", "size"}}``) and ``folder/SHA256SUMS``
    atomically; returns the manifest's path."""
    doc = {"format": 1, "tool": "stllava.data.download", "sources": sources,
           "files": {rel: files[rel] for rel in sorted(files)}}
    manifest = folder / MANIFEST_NAME
    for target, text in ((manifest, json.dumps(doc, indent=1) + "\n"),
                         (folder / SUMS_NAME, "".join(f"{files[r]['sha256']}  {r}\n" for r in sorted(files)))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)  # a run killed while writing leaves the old file, never half of one
    return manifest


@dataclass
class VerifyResult:
    """What :func:`verify_folder` found; every list holds paths relative to the folder, sorted."""

    folder: Path
    n_listed: int
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra)

    def lines(self) -> list[str]:
        """The report: one line per problem file, then a summary line with the counts."""
        out = [f"{kind}: {rel}" for kind, rels in (("missing", self.missing), ("changed", self.changed),
                                                     ("extra", self.extra)) for rel in rels]
        out.append(f"{self.folder}: {self.n_listed} files listed, {len(self.missing)} missing, "
                   f"{len(self.changed)} changed, {len(self.extra)} extra -> {'OK' if self.ok else 'MISMATCH'}")
        return out


def verify_folder(checksums: str | os.PathLike, folder: str | os.PathLike | None = None) -> VerifyResult:
    """Re-hash ``folder`` (default: the checksum file's own folder) against ``checksums`` (see
    :func:`read_checksums`); returns a :class:`VerifyResult`. A file whose size differs is
    "changed" without being hashed."""
    checksums = Path(checksums)
    entries = read_checksums(checksums)
    folder = Path(folder) if folder is not None else checksums.parent
    result = VerifyResult(folder, len(entries))
    for rel, entry in sorted(entries.items()):
        full = folder / rel
        if not full.is_file():
            result.missing.append(rel)
        elif ("size" in entry and full.stat().st_size != entry["size"]) or file_sha256(full) != entry["sha256"]:
            result.changed.append(rel)
    roots = {PurePosixPath(rel).parts[0] for rel in entries}
    result.extra = [rel for rel in list_files(folder, roots) if rel not in entries]
    return result
