"""Getting files: resumable HTTP downloads, Hugging Face hub files, and what went wrong with each.

Nothing here stops at the first bad file: every function returns a :class:`Failure` (or None) so the
caller can go on and report them all by name at the end (docs/Data.md).

* :func:`fetch_url` downloads into ``<file>.part`` and renames when complete. A rerun continues a
  ``.part`` file with an HTTP ``Range`` request; a server that ignores the range (answers 200)
  restarts it from zero. A body shorter than its ``Content-Length`` is reported as truncated and the
  ``.part`` file is kept for the next run. Written with the standard library because no maintained
  client keeps a partial file across runs and reports it (huggingface_hub's ``http_get`` retries
  inside one call and deletes its temporary file when it gives up).
* :class:`Hub` lists a dataset repository at one commit (``HfApi.dataset_info``, which publishes the
  SHA-256 of every LFS file and the git blob id of the others) and downloads files with
  ``hf_hub_download`` into a local folder; the endpoint comes from ``--hf-endpoint`` / ``HF_ENDPOINT``.
* :func:`check_file` compares a downloaded file with the size and checksum its source published.
* :class:`VerifiedStore` remembers files already checked (size, mtime, SHA-256), so a rerun skips
  them without downloading or hashing again.
"""
from __future__ import annotations

import fnmatch
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stllava.data.manifest import PART_SUFFIX, file_sha256, git_blob_sha1

logger = logging.getLogger(__name__)

# Kinds of failure, in report order.
MISSING, CHECKSUM, TRUNCATED = "missing", "checksum mismatch", "truncated"
BAD_FILE, ERROR = "bad content", "download error"
KINDS = (MISSING, CHECKSUM, TRUNCATED, BAD_FILE, ERROR)
USER_AGENT = "stllava-data-download/1"
TIMEOUT_S = 60


@dataclass(frozen=True)
class Failure:
    """One file that did not arrive intact: ``name`` is its path under the output folder."""

    kind: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.name} ({self.detail})"


@dataclass(frozen=True)
class Expect:
    """What a source publishes about a file; any field may be unknown (None)."""

    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None

    def key(self) -> str:
        """A string naming the published facts, stored with a verified file."""
        return f"size={self.size};sha256={self.sha256};git={self.git_sha1}"


class VerifiedStore:
    """Files checked by an earlier run: ``{rel: {"size", "mtime_ns", "sha256", "expect"}}`` in
    ``<out>/.download/verified.json``. An entry counts only while the file's size and mtime match."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / ".download" / "verified.json"
        try:
            self.entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        if not isinstance(self.entries, dict):  # a damaged state file only costs re-checking
            self.entries = {}

    def _stat(self, rel: str) -> tuple[int, int] | None:
        try:
            st = (self.out / rel).stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def current(self, rel: str, expect: str | None = None) -> bool:
        """True when ``rel`` was verified (against ``expect``'s key, when given) and has not changed."""
        e, st = self.entries.get(rel), self._stat(rel)
        return bool(isinstance(e, dict) and st and (e.get("size"), e.get("mtime_ns")) == st
                    and (expect is None or e.get("expect") == expect))

    def record(self, rel: str, sha256: str | None = None, expect: str = "") -> str:
        """Remember ``rel`` as verified (hashing it unless ``sha256`` is given); returns its SHA-256."""
        st = self._stat(rel)
        sha256 = sha256 or file_sha256(self.out / rel)
        self.entries[rel] = {"size": st[0], "mtime_ns": st[1], "sha256": sha256, "expect": expect}
        return sha256

    def sha256(self, rel: str) -> str:
        """SHA-256 of ``rel``: the stored one while the file is unchanged, else hashed (and stored)."""
        if self.current(rel):
            return self.entries[rel]["sha256"]
        return self.record(rel)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)


def check_file(path: Path, name: str, expect: Expect) -> tuple[Failure | None, str]:
    """Compare ``path`` with what its source published; returns (a CHECKSUM :class:`Failure` or None,
    the file's SHA-256)."""
    size, sha256 = path.stat().st_size, file_sha256(path)
    if expect.size is not None and size != expect.size:
        return Failure(CHECKSUM, name, f"{size} bytes, the source publishes {expect.size}"), sha256
    if expect.sha256 and sha256 != expect.sha256.lower():
        return Failure(CHECKSUM, name, f"sha256 {sha256[:12]}…, the source publishes {expect.sha256[:12]}…"), sha256
    if expect.git_sha1 and (got := git_blob_sha1(path)) != expect.git_sha1.lower():
        return Failure(CHECKSUM, name, f"git blob id {got[:12]}…, the source publishes "
                       f"{expect.git_sha1[:12]}…"), sha256
    return None, sha256


def reject(out: Path, rel: str) -> Path:
    """Move a file that failed its checksum to ``<out>/.download/rejected/<rel>`` (out of the data and the
    manifest, kept for inspection; a rerun downloads it again); returns the new path."""
    dest = out / ".download" / "rejected" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out / rel, dest)
    return dest


def fetch_url(url: str, dest: Path, name: str, timeout: float = TIMEOUT_S) -> Failure | None:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns None on success, else a Failure:
    MISSING for HTTP 404/410, TRUNCATED when the body stops short of its Content-Length (the part is
    kept), ERROR for anything else the server or network does."""
    part = dest.with_name(dest.name + PART_SUFFIX)
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already as long as the file, or longer: start over
            part.unlink()
            return fetch_url(url, dest, name, timeout)
        if e.code in (404, 410):
            return Failure(MISSING, name, f"HTTP {e.code} from {url}")
        return Failure(ERROR, name, f"HTTP {e.code} {e.reason} from {url}")
    except (urllib.error.URLError, OSError) as e:
        return Failure(ERROR, name, f"cannot reach {url}: {getattr(e, 'reason', e)}")
    with resp:
        if have and resp.status != 206:
            logger.info("%s: the server ignored the Range request; downloading from the start", url)
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        got, stopped = have, None
        try:
            with open(part, "ab" if have else "wb") as f:
                while block := resp.read(1 << 20):
                    f.write(block)
                    got += len(block)
        except (http.client.IncompleteRead, OSError) as e:  # cut connection, timeout
            stopped = e
        if stopped is not None or (total is not None and got < total):
            of = f" of {total}" if total is not None else f" ({type(stopped).__name__}: {stopped})"
            return Failure(TRUNCATED, name, f"got {got}{of} bytes from {url}; the part is kept in "
                           f"{part.name}: rerun to resume")
    os.replace(part, dest)
    return None


class Hub:
    """Dataset repositories on a Hugging Face hub endpoint (``huggingface_hub`` does the HTTP)."""

    def __init__(self, endpoint: str):
        from huggingface_hub import HfApi

        self.endpoint = endpoint.rstrip("/")
        self.api = HfApi(endpoint=self.endpoint)

    def list_files(self, repo: str, revision: str) -> tuple[str, dict[str, Expect]]:
        """Returns (the commit ``revision`` resolves to, {file: what the hub publishes about it}).
        Raises huggingface_hub's errors (repository or revision not found, network)."""
        info = self.api.dataset_info(repo, revision=revision, files_metadata=True)
        files = {}
        for s in info.siblings or []:
            if s.lfs:
                files[s.rfilename] = Expect(size=s.lfs.size, sha256=s.lfs.sha256)
            else:
                files[s.rfilename] = Expect(size=s.size, git_sha1=s.blob_id)
        return info.sha, files

    def download(self, repo: str, filename: str, commit: str, folder: Path, name: str) -> Failure | None:
        """``hf_hub_download`` of one file at ``commit`` into ``folder``; returns None or a Failure
        (MISSING for a 404, TRUNCATED for a size mismatch, ERROR otherwise)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        url = f"{self.endpoint}/datasets/{repo}/resolve/{commit}/{filename}"
        try:
            hf_hub_download(repo, filename, repo_type="dataset", revision=commit, local_dir=folder,
                            endpoint=self.endpoint)
        except EntryNotFoundError:
            return Failure(MISSING, name, f"HTTP 404 from {url}")
        except HfHubHTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            return Failure(MISSING if code in (404, 410) else ERROR, name, f"HTTP {code} from {url}")
        except Exception as e:  # network errors surface as the HTTP client's own types: report, go on
            if "Consistency check failed" in str(e):
                return Failure(TRUNCATED, name, f"{url}: {str(e).splitlines()[0]}")
            logger.debug("download of %s failed", url, exc_info=True)
            return Failure(ERROR, name, f"{url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def select(files: dict[str, Expect], patterns: tuple[str, ...] | None) -> dict[str, Expect]:
    """The files matching any of ``patterns`` (fnmatch; None keeps all), ``.gitattributes`` left out."""
    return {f: e for f, e in files.items() if f != ".gitattributes"
            and (patterns is None or any(fnmatch.fnmatch(f, p) for p in patterns))}
