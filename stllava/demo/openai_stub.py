"""A local OpenAI chat-completions server whose answers come from a Python *scorer*.

It exists so the judge (and the end-to-end demo) can be exercised with the *real* ``openai`` client
and no network: tests script faults (429 + Retry-After, 5xx, hung requests, garbage replies, a 200
whose body is not JSON such as a proxy's HTML page: ``Reply(raw_body=..., media_type="text/html")``) and a
demo plugs in a "phantom judge" that knows the ground truth. It is the project's one protocol
implementation (:func:`stllava.serve.protocol.create_app`, FastAPI on uvicorn) with a scorer
backend instead of a model, so the phantom judge, the judge's fault tests and
``python -m stllava.serve.api`` share routes, schema, auth and error JSON.

Routes: ``POST /v1/chat/completions`` (``stream: true`` sends the reply as one SSE chunk),
``GET /v1/models``, ``GET /health``; anything else is a 404 error object.

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

import asyncio
import base64
import binascii
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from stllava.errors import StllavaError

try:
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from stllava.serve import protocol
    from stllava.serve.server import UvicornServer
except ImportError as e:  # the serve extra is missing
    raise StllavaError(f"the local OpenAI-compatible server needs FastAPI and uvicorn ({e})",
                       fix="pip install 'stllava[serve]'") from None

logger = logging.getLogger(__name__)

__all__ = ["ChatCompletionServer", "Reply", "ScorerBackend", "request_images", "request_text"]


@dataclass
class Reply:
    """What the server sends back for one request.

    ``content``: the assistant message text (status 200). ``status`` other than 200 sends an
    OpenAI-style error object carrying ``error``. ``headers`` are added (e.g. ``Retry-After``).
    ``delay`` seconds are slept first (a hung server; the sleep ends early when the server stops).
    ``raw_body`` is sent verbatim instead of JSON, with content type ``media_type`` (say
    ``text/html`` for a proxy's error page). ``usage`` = (prompt_tokens, completion_tokens);
    by default a crude estimate (characters / 4) so token accounting can be tested.
    """

    content: str | None = None
    status: int = 200
    error: str = "error injected by the test server"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw_body: bytes | None = None
    media_type: str = "application/json"
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


class ScorerBackend:
    """The protocol backend that answers with ``scorer(body)``; keeps the request log."""

    def __init__(self, scorer: Scorer, model: str):
        self.scorer, self.model = scorer, model
        self.requests: list[dict[str, Any]] = []
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._completions = 0

    def model_ids(self) -> list[str]:
        return [self.model]

    def health(self) -> dict:
        return {"model": self.model, "requests": len(self.requests)}

    def stop(self) -> None:
        self.closing.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``, ending early (returns True) when the server stops."""
        deadline = time.monotonic() + seconds
        while not self.closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.05))
        return True

    async def complete(self, req, body: dict, request) -> Response:
        try:
            reply = await run_in_threadpool(self.scorer, body)
        except Exception as e:  # a scorer bug must reach the client, not hang it
            logger.exception("scorer failed")
            reply = Reply(status=500, error=f"scorer raised {type(e).__name__}: {e}")
        if isinstance(reply, str):
            reply = Reply(content=reply)
        with self._lock:
            self.requests.append({"path": request.url.path, "body": body, "status": reply.status,
                                  "time": time.monotonic()})
        if reply.delay > 0 and await self._sleep(reply.delay):
            return protocol.APIError(503, "server is shutting down").response()
        if reply.raw_body is not None:
            return Response(reply.raw_body, status_code=reply.status, headers=reply.headers,
                            media_type=reply.media_type)
        if reply.status != 200:
            raise protocol.APIError(reply.status, reply.error, headers=reply.headers)
        content = reply.content or ""
        if reply.usage is not None:
            prompt_tokens, completion_tokens = reply.usage
        else:
            prompt_tokens, completion_tokens = len(request_text(body)) // 4 + 1, len(content) // 4 + 1
        with self._lock:
            self._completions += 1
            cid = f"chatcmpl-local-{self._completions}"
        model = reply.model or body.get("model", self.model)
        if req.stream:
            async def events():
                yield "delta", content
                yield "done", protocol.Result(content, "stop", prompt_tokens, completion_tokens)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return protocol.streaming_response(protocol.sse_stream(cid, model, events(), include_usage),
                                               reply.headers)
        return JSONResponse(protocol.completion_body(cid, model, content, "stop", prompt_tokens, completion_tokens),
                            headers=reply.headers)


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
        self.api_key = api_key
        self.model = model
        self.backend = ScorerBackend(scorer, model)
        self._server = UvicornServer(protocol.create_app(self.backend, api_key=api_key, title=model),
                                     host, port, graceful_s=5)

    @property
    def scorer(self) -> Scorer:
        return self.backend.scorer

    @scorer.setter
    def scorer(self, value: Scorer) -> None:
        self.backend.scorer = value

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.backend.requests

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        return f"{self._server.url}/v1"

    def start(self) -> "ChatCompletionServer":
        """Start serving in a daemon thread; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close the socket."""
        self.backend.closing.set()
        self._server.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for command-line use)."""
        try:
            self._server.run()
        finally:
            self.backend.closing.set()

    def __enter__(self) -> "ChatCompletionServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
