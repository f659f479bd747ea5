"""The OpenAI chat-completions protocol on FastAPI: one implementation, pluggable backends.

:func:`create_app` builds the app both servers of the project run: ``stllava.serve.api`` (a
model backend, :mod:`stllava.serve.engine`) and ``stllava.demo.openai_stub`` (a Python
scorer backend: the phantom judge and the judge's fault tests). It owns what the protocol fixes:

- routes ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` (and ``GET /``, the
  chat page, when asked for);
- the request schema (:class:`ChatRequest`: string content or ``text`` / ``image_url`` parts);
- ``Authorization: Bearer`` checking (constant-time), the body-size limit (413), ``Content-Type:
  application/json`` on POST (415), the ``Host`` allow-list against DNS rebinding (421), and
  OpenAI-style error JSON for every failure (``{"error": {"message", "type", "param", "code"}}``),
  never a traceback — a malformed body (nested too deeply, integers of thousands of digits, lone
  surrogates, NaN) included: 400 naming the field;
- the reply shapes: :func:`completion_body` and server-sent-event chunks (:func:`sse_stream`)
  ending with ``data: [DONE]``.

A backend implements ``model_ids()``, ``health()``, ``async complete(req, body, request)`` (returns
a Response; raises :class:`APIError` for a refusal) and optionally ``start()`` / ``stop()`` and
``arriving(change)`` (told when a request starts and ends reading its body).
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, AsyncIterator, Literal, NamedTuple, Protocol, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               421: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_overloaded"}
# Request fields we refuse rather than silently ignore when they ask for something (OpenAI features
# a LLaVA model does not have).
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "audio", "prediction", "presence_penalty", "frequency_penalty")


class APIError(Exception):
    """A refusal sent as OpenAI-style error JSON with ``status`` (and extra ``headers``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or str(status)
        self.kind = kind or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_json(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------- schema
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: the string content, or its text parts joined."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or [] if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        return [p.image_url.url for p in self.content or [] if isinstance(p, ImagePart)] \
            if isinstance(self.content, list) else []


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """A chat-completions request. ``top_k`` and ``min_tokens`` are vLLM's extensions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


MAX_INT_DIGITS = 100  # longer JSON integers are refused (Python refuses str <-> int beyond 4300 digits)
_SURROGATE = re.compile("[\ud800-\udfff]")


class LongInt:
    """A JSON integer of more than :data:`MAX_INT_DIGITS` digits, kept as its digit count: no field
    takes it (the schema refuses it by name) and nothing converts it to ``int`` or back."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def _validation_error(err: ValidationError) -> APIError:
    """The most specific pydantic error as APIError 400 ``field.path: message``, ``param`` the
    field path (the input value is left out: it may hold image bytes)."""
    errors = sorted(err.errors(include_url=False), key=lambda e: -len(e["loc"]))
    e = errors[0]
    # Union-member labels ("str", "list[...]") are pydantic's bookkeeping, not field names.
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p == "str")))
    msg = f"an integer of {e['input'].digits} digits is out of range" if isinstance(e.get("input"), LongInt) \
        else e["msg"]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{loc or 'body'}: {msg}{more}", param=loc or None)


def _find_surrogate(body) -> str | None:
    """The path (``messages.0.content``) of the first string, or key, of ``body`` holding a lone
    surrogate (JSON may escape one, ``"\\ud800"``; it is not text: the tokenizer and UTF-8 refuse it),
    ``""`` for a key at the top; None when there is none. Iterative: any depth the parser took."""
    stack = [((), body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return ".".join(path)
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                if _SURROGATE.search(k):
                    return ".".join(path)
                stack.append(((*path, k), v))
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), v) for i, v in reversed(list(enumerate(value))))
    return None


def parse_request(raw: bytes) -> tuple[dict, ChatRequest]:
    """``(body dict, ChatRequest)`` of a raw request body; :class:`APIError` 400 when it is not
    JSON (or nests deeper than the parser goes), does not fit the schema (integers of more than
    :data:`MAX_INT_DIGITS` digits, NaN and infinities, lone surrogates included: ``param`` names
    the field), or asks for a feature this server does not have."""
    try:
        body = json.loads(raw, parse_int=lambda t: LongInt(t) if len(t) > MAX_INT_DIGITS else int(t))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body nests too deeply (arrays or objects inside each other) to be "
                       "parsed") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    where = _find_surrogate(body)
    if where is not None:
        raise APIError(400, f"{where or 'a key of the body'}: holds a lone surrogate (a \\ud800-\\udfff "
                       "escape that is not half of a pair), which is not text", param=where or None)
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    if req.n != 1:
        raise APIError(400, f"n={req.n}: only one choice per request is supported", param="n")
    if len(req.stop_list()) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    return body, req


# ---------------------------------------------------------------------------------------- replies
class Result(NamedTuple):
    """A finished answer: its text, OpenAI's ``finish_reason`` and the token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, content: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    """A non-streamed ``chat.completion`` object with one choice and ``usage``."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": usage_json(prompt_tokens, completion_tokens)}


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def sse_stream(cid: str, model: str, events: AsyncIterator[tuple[str, Any]],
                     include_usage: bool = False) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format from ``events``: ``("delta", text)`` items,
    then one ``("done", Result)`` (its text is not sent again); an :class:`APIError`
    raised by ``events`` becomes an ``{"error": ...}`` event. Always ends with ``data: [DONE]``."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for kind, value in events:
            if kind == "delta":
                if value:
                    yield chunk({"content": value})
            else:
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [], "usage": usage_json(value.prompt_tokens, value.completion_tokens)})
    except APIError as e:
        yield _sse(e.to_json())
    yield _sse("[DONE]")


def streaming_response(stream: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


# ---------------------------------------------------------------------------------------- the app
class Backend(Protocol):
    def model_ids(self) -> list[str]: ...

    def health(self) -> dict: ...

    async def complete(self, req: ChatRequest, body: dict, request: Request) -> Response: ...


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; :class:`APIError` 413 as soon as it is known to exceed ``limit`` bytes
    (from Content-Length, else while reading), so a huge body is never held in memory; 400 when
    the client goes away before sending all of it (nobody reads that answer)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(piece)
    except ClientDisconnect:  # e.g. closed by the server's request timeout (stllava.serve.server)
        raise APIError(400, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def check_json(request: Request) -> None:
    """Refuse (415) a POST whose ``Content-Type`` is not ``application/json``. A web page can send
    any other site a form or ``text/plain`` POST without asking (a "simple" cross-site request);
    ``application/json`` needs a CORS preflight, which this server never grants."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {given[:100]!r}" if given else
                       "Content-Type must be application/json (the request has none)")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port or None)`` of a Host header or an allow-list entry, lower-cased, IPv6 without
    brackets (``[::1]:8000`` -> ``("::1", 8000)``; a bare ``::1`` is a host); None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] or None
    elif value.count(":") > 1:
        host, port = value, None
    else:
        host, _, port = value.partition(":")
        port = port or None
    if not host or (port is not None and not (port.isdigit() and len(port) <= 5)):
        return None
    return host, None if port is None else int(port)


def host_allowed(header: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request's ``Host`` header names this server: ``allowed`` holds host names or
    addresses (any port), ``host:port`` entries (that port only), or ``*`` (any Host)."""
    if "*" in allowed:
        return True
    given = _split_host(header) if header else None
    if given is None:
        return False
    for entry in allowed:
        want = _split_host(entry)
        if want is not None and want[0] == given[0] and want[1] in (None, given[1]):
            return True
    return False


class HostCheck:
    """ASGI middleware: a request whose ``Host`` is not in ``allowed`` gets 421 before any route
    runs. Against DNS rebinding: a web page whose own name the attacker points at 127.0.0.1 can
    reach a loopback server from the visitor's browser, but its requests carry that name."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app, self.allowed = app, list(allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not host_allowed(host, self.allowed):  # the list itself is not echoed
                await APIError(421, f"Host {(host or '')[:100]!r} is not one this server answers to; if clients "
                               "reach it by that name, start it with --allowed-hosts naming it").response()(
                                   scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_key(request: Request, api_key: str | None) -> None:
    """Refuse (401) a request without ``Authorization: Bearer <api_key>`` when a key is set. The
    comparison takes the same time wherever the strings differ (hmac.compare_digest)."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def page_html() -> str:
    return resources.files("stllava.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def create_app(backend, *, api_key: str | None = None, max_body_bytes: int = 32 * 2 ** 20,
               page: bool = False, title: str = "stllava", allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` over the OpenAI chat-completions protocol.

    ``api_key``: required as a Bearer token on ``/v1/*`` when set (``/health`` and the page stay
    open). ``max_body_bytes``: larger bodies get 413. ``page``: serve the chat page at ``/``.
    ``allowed_hosts``: every route answers only requests whose ``Host`` matches (:func:`host_allowed`;
    None: any Host). POSTs must be ``Content-Type: application/json`` (415 otherwise).
    The backend's ``start()`` / ``stop()`` run at app startup / after the last request finished.
    """
    @asynccontextmanager
    async def lifespan(app):
        if hasattr(backend, "start"):
            backend.start()
        try:
            yield
        finally:
            if hasattr(backend, "stop"):
                backend.stop()

    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug: logged here, never sent as a traceback
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, f"internal server error ({type(exc).__name__})").response()

    # A backend that batches may wait for requests whose body is still arriving (see engine.py).
    arriving = getattr(backend, "arriving", lambda change: None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, api_key)
        check_json(request)
        arriving(1)
        try:
            body, req = parse_request(await read_body(request, max_body_bytes))
        finally:
            arriving(-1)
        return await backend.complete(req, body, request)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, api_key)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "local"} for m in backend.model_ids()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", **backend.health()}

    if page:
        html = page_html()

        @app.get("/", response_class=HTMLResponse)
        async def chat_page():
            return HTMLResponse(html)

    return app
