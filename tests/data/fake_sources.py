"""A local stand-in for the data sources of ``stllava.data.download``, on 127.0.0.1 only.

One ``http.server`` in a thread serves:

* the Hugging Face hub endpoints huggingface_hub uses: ``GET /api/datasets/{repo}/revision/{rev}``
  (``HfApi.dataset_info`` with ``blobs``: commit, file sizes, LFS SHA-256 or git blob ids) and
  ``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{file}`` (``hf_hub_download``: ``X-Repo-Commit``,
  ``ETag``, ``Content-Length``; a 404 carries ``X-Error-Code: EntryNotFound`` as the hub's does);
* any other path as a plain file server (LLaVA-Med's files, PMC tarballs), with ``Range`` support.

Faults to order (each names the end of a request path): ``missing`` paths answer 404 although the hub lists them; ``published`` overrides
what the hub listing says about a file (so the bytes served fail their checksum); ``truncate_once``
paths send half their body on the first GET, with the full ``Content-Length``, then close.
Every request is logged in ``requests`` as (method, path, Range header).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    published: dict[str, bytes] = field(default_factory=dict)  # what the listing describes instead


@dataclass
class FakeSources:
    repos: dict[str, Repo] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # plain HTTP: path -> bytes
    missing: set[str] = field(default_factory=set)
    truncate_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def start(self) -> str:
        """Serve in a daemon thread; returns the base URL."""
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def listing(self, repo_id: str) -> dict:
        repo = self.repos[repo_id]
        siblings = []
        for name, data in sorted(repo.files.items()):
            pub = repo.published.get(name, data)
            s = {"rfilename": name, "size": len(pub), "blobId": git_sha1(pub)}
            if name in repo.lfs:
                s["lfs"] = {"sha256": hashlib.sha256(pub).hexdigest(), "size": len(pub), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "sha": COMMIT, "siblings": siblings}


def _handler(src: FakeSources):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
                  cut: bool = False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if cut:
                self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(body[: len(body) // 2] if cut else body)
            if cut:
                self.close_connection = True

        def _file(self, path: str, data: bytes | None, head: bool, extra: dict) -> None:
            if data is None or any(path.endswith(m) for m in src.missing):
                return self._send(404, b"not found", {**extra, "X-Error-Code": "EntryNotFound"}, head)
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and int(m.group(1)) < len(data):
                start = int(m.group(1))
                return self._send(206, data[start:], {**extra, "Content-Range": f"bytes {start}-{len(data) - 1}/"
                                                      f"{len(data)}"}, head)
            if m:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            cut = next((t for t in src.truncate_once if path.endswith(t)), None) if not head else None
            if cut:
                src.truncate_once.discard(cut)
            self._send(200, data, extra, head, bool(cut))

        def _route(self, head: bool) -> None:
            path = self.path.split("?")[0]
            src.requests.append((self.command, path, self.headers.get("Range")))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/[^/]+", path)
            if m:
                if m.group(1) not in src.repos:
                    return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
                return self._send(200, json.dumps(src.listing(m.group(1))).encode(),
                                  {"Content-Type": "application/json"}, head)
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
            if m:
                repo = src.repos.get(m.group(1))
                data = repo.files.get(m.group(2)) if repo else None
                etag = hashlib.sha256(data).hexdigest() if data is not None else ""
                return self._file(path, data, head, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})
            self._file(path, src.files.get(path), head, {})

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    return Handler
