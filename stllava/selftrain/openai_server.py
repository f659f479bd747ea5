"""A small local server speaking the OpenAI chat-completions protocol, with a pluggable scorer.

It exists so the judge (and the end-to-end demo) can be exercised with the *real* ``openai`` client
and no network: tests script faults (429 + Retry-After, 5xx, hung requests, garbage replies) and a
demo can plug in a "phantom judge" that knows the ground truth. Standard library only
(``http.server.ThreadingHTTPServer``); no third-party web framework is needed for three routes.

Routes: ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models``; anything else is 404.

The scorer is ``scorer(body: dict) -> str | Reply``: it receives the decoded JSON request body and
returns the assistant text, or a :class:`Reply` for full control (status, headers, delay, raw
body). Helpers :func:`request_text` and :func:`request_images` pull the prompt text and the image
bytes out of a request body.

Example::

    with ChatCompletionServer(lambda body: "8 6\\nAnswer 1 is better.") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="anything")
        ...
        server.requests  # every request seen: path, status, body (the auth header is never kept)
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["ChatCompletionServer", "Reply", "request_images", "request_text"]


@dataclass
class Reply:
    """What the server sends back for one request.

    ``content``: the assistant message text (status 200). ``status`` other than 200 sends an
    OpenAI-style error object carrying ``error``. ``headers`` are added (e.g. ``Retry-After``).
    ``delay`` seconds are slept first (a hung server; the sleep ends early when the server stops).
    ``raw_body`` is sent verbatim instead of JSON. ``usage`` = (prompt_tokens, completion_tokens);
    by default a crude estimate (characters / 4) so token accounting can be tested.
    """

    content: str | None = None
    status: int = 200
    error: str = "error injected by the test server"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw_body: bytes | None = None
    usage: tuple[int, int] | None = None
    model: str | None = None


Scorer = Callable[[dict], "str | Reply"]


def request_text(body: dict) -> str:
    """The concatenated text parts of all user messages of a chat-completions request body."""
    parts: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "".join(parts)


def request_images(body: dict) -> list[tuple[str, bytes]]:
    """``(mime_type, bytes)`` of every base64 data-URL image in the request, in order.

    Refuses (ValueError) an image URL that is not a ``data:<mime>;base64,`` URL or not valid base64.
    """
    images = []
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != "image_url":
                continue
            url = part["image_url"]["url"]
            head, sep, data = url.partition(",")
            if not (url.startswith("data:") and head.endswith(";base64") and sep):
                raise ValueError(f"image URL is not a base64 data URL: {url[:40]!r}")
            try:
                images.append((head[5:-7], base64.b64decode(data, validate=True)))
            except binascii.Error as e:
                raise ValueError(f"image data URL is not valid base64: {e}") from None
    return images


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one segment: unbuffered writes cost ~40 ms per reply (delayed ACK).
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # route http.server's stderr chatter to logging
        logger.debug("%s - %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout fired) while we slept: nothing to send it.
            self.close_connection = True

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_exceeded"}.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}
        self._send(status, json.dumps(body).encode(), headers)

    def _authorised(self) -> bool:
        owner = self.server.owner
        if owner.api_key is None:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {owner.api_key}":
            return True
        self._error(401, "Incorrect API key provided.")
        return False

    def do_GET(self):  # noqa: N802 (http.server naming)
        owner = self.server.owner
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}")
        if not self._authorised():
            return
        data = [{"id": owner.model, "object": "model", "created": 0, "owned_by": "local"}]
        self._send(200, json.dumps({"object": "list", "data": data}).encode())

    def do_POST(self):  # noqa: N802
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        if not self._authorised():
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            return self._error(400, f"request body is not JSON: {e}")
        if body.get("stream"):
            return self._error(400, "streaming is not supported by this test server")
        try:
            reply = owner.scorer(body)
        except Exception as e:  # a scorer bug must reach the client, not hang it
            logger.exception("scorer failed")
            reply = Reply(status=500, error=f"scorer raised {type(e).__name__}: {e}")
        if isinstance(reply, str):
            reply = Reply(content=reply)
        owner._record(self.path, body, reply.status)
        if reply.delay > 0 and owner._closing.wait(reply.delay):
            self.close_connection = True
            return
        if reply.raw_body is not None:
            return self._send(reply.status, reply.raw_body, reply.headers)
        if reply.status != 200:
            return self._error(reply.status, reply.error, reply.headers)
        content = reply.content or ""
        if reply.usage is not None:
            prompt_tokens, completion_tokens = reply.usage
        else:
            prompt_tokens, completion_tokens = len(request_text(body)) // 4 + 1, len(content) // 4 + 1
        with owner._lock:
            owner._completions += 1
            cid = owner._completions
        out = {
            "id": f"chatcmpl-local-{cid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or body.get("model", owner.model),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        self._send(200, json.dumps(out).encode(), reply.headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping never blocks interpreter exit
    block_on_close = False  # nor server_close()
    owner: "ChatCompletionServer"


class ChatCompletionServer:
    """An OpenAI-compatible chat-completions server on ``host`` (default 127.0.0.1), in a thread.

    ``port=0`` picks a free port; ``base_url`` is what to give ``openai.OpenAI(base_url=...)``.
    ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get a 401.
    ``requests`` lists every chat request received (``{"path", "body", "status", "time"}``, time
    from ``time.monotonic()``), in arrival order; a scripted-delay reply is listed with the status
    it would send, so give hung requests an error status. Headers are not kept, so the key never
    lands in it. ``stop()`` returns promptly even while a handler is sleeping on a scripted delay.
    """

    def __init__(self, scorer: Scorer, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, model: str = "local-judge"):
        self.scorer = scorer
        self.api_key = api_key
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._completions = 0
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}/v1"

    def _record(self, path: str, body: dict, status: int) -> None:
        with self._lock:
            self.requests.append({"path": path, "body": body, "status": status, "time": time.monotonic()})

    def start(self) -> "ChatCompletionServer":
        """Start serving in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"openai-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close the socket."""
        self._closing.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for command-line use)."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._closing.set()
            self._httpd.server_close()

    def __enter__(self) -> "ChatCompletionServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
