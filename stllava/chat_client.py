"""The one client of OpenAI-compatible servers: the judge (:mod:`stllava.selftrain.judge_client`)
and generation through a serving engine (:mod:`stllava.remote_generation`) both ask through
:class:`ChatClient`.

Retries are the ``openai`` client's own (``max_retries``: 408/409/429/5xx, timeouts and connection
errors, exponential backoff with jitter, a ``Retry-After`` of up to two minutes honoured). What it
has no setting for is written here, in :class:`_AttemptTransport`, the HTTP transport every attempt
of the client's retry loop passes through: a cap on HTTP requests per run (retries included),
stopping at once when another request has failed, retry counts by kind for the run's summary, and
failing fast when the server refuses the connection (nothing listens at the base URL: retrying for
a minute would only hide a wrong URL). A 200 whose body does not parse -- cut short, or not JSON
at all, like a proxy's HTML error page -- is not retried by the client; :meth:`ChatClient.complete`
counts it as a failed attempt and asks again, within the same bound.

:func:`check_base_url` refuses plain http to a host that is not this machine (the key and every
image would cross the network unencrypted).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from openai.types.chat import ChatCompletion

from stllava.errors import EXIT_FAILED, StllavaError

logger = logging.getLogger("stllava.chat_client")


class ClientError(StllavaError, RuntimeError):
    """A run cannot go on: bad flags, a refused request, or retries used up. The message says why."""


class ClientAPIError(ClientError):
    """The server refused a request (4xx other than 408/409/429) or kept failing past the retries."""

    exit_code = EXIT_FAILED


class _Stopped(openai.OpenAIError):
    """Internal: the run is stopping (another request failed, or the request cap was reached). An
    ``OpenAIError`` because the client re-raises those untouched instead of retrying them."""


class _Refused(openai.OpenAIError):
    """Internal: the server refused the connection. An ``OpenAIError``, so the client re-raises it
    without retrying; :meth:`ChatClient.complete` turns it into the client's API error."""


class _NotJson(ValueError):
    """Internal: a 200 whose body is not JSON; the client then returns the body as a string."""


@dataclass
class Stats:
    """Counters of one run (thread-safe through ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    http_requests: int = 0
    paid: int = 0
    cache_hits: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    fresh_tokens: list[int] = field(default_factory=lambda: [0, 0])
    fresh_by_model: dict[str, list[int]] = field(default_factory=dict)  # several judges: tokens per model

    def count_retry(self, kind: str) -> None:
        with self.lock:
            self.retries[kind] = self.retries.get(kind, 0) + 1


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is a ``ConnectionRefusedError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConnectionRefusedError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _failure_kind(status: int) -> str:
    return "429" if status == 429 else "5xx" if status >= 500 else str(status)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(url: str | None, allow_insecure_http: bool, source: str = "--base-url",
                   error: type[StllavaError] = ClientError) -> None:
    """Refuse (``error``) a plain ``http://`` ``url`` to a host that is not this machine: the API
    key (a bearer header) and every image would cross the network unencrypted. With
    ``allow_insecure_http`` it is logged as a warning instead. Loopback hosts (``localhost``,
    127.0.0.0/8, ``::1``: the tests' and the demo's local servers) and https pass silently; so does
    None (the openai client's default, https). ``source`` names where the URL came from."""
    if not url:
        return
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "http" or _is_loopback(parts.hostname):
        return
    what = (f"{source} {url} is plain http to a host that is not this machine: the API key and every image "
            "would cross the network unencrypted")
    if not allow_insecure_http:
        raise error(f"{what}; fix: use https, or pass --allow-insecure-http for a server on a network you trust")
    logger.warning("%s (--allow-insecure-http given)", what)


class _AttemptTransport(httpx2.BaseTransport):
    """Every HTTP attempt of the ``openai`` client passes here (its retry loop has no hooks):
    takes a request slot (raising :class:`_Stopped` past the cap or once the run is stopping), and
    records why an attempt failed, so the retry that follows — sent by the same worker thread, the
    client being synchronous — is counted and logged by kind."""

    def __init__(self, owner: "ChatClient", inner: httpx2.BaseTransport):
        self.owner, self.inner = owner, inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        owner, ctx = self.owner, self.owner._ctx
        retry = int(request.headers.get("x-stainless-retry-count") or 0)
        if retry:
            kind = getattr(ctx, "failure", None) or "connection"
            owner.stats.count_retry(kind)
            logger.warning("%s: %s; retry %d/%d", getattr(ctx, "label", "request"), kind, retry, owner.max_retries)
        owner._take_request_slot()
        ctx.attempts = getattr(ctx, "attempts", 0) + 1
        ctx.failure = ctx.cause = None
        try:
            response = self.inner.handle_request(request)
        except httpx2.TimeoutException:
            ctx.failure = "timeout"
            raise
        except httpx2.TransportError as exc:
            ctx.failure, ctx.cause = "connection", str(exc) or type(exc).__name__
            if _refused(exc):
                raise _Refused(str(exc)) from exc
            raise
        if response.status_code >= 400:
            ctx.failure = _failure_kind(response.status_code)
        return response

    def close(self) -> None:
        self.inner.close()


class ChatClient:
    """Chat completions through an ``openai.OpenAI`` client with bounded, counted retries.

    ``max_requests`` caps HTTP requests (retries included) for this run; reaching it, or ``stop``
    being set, makes :meth:`complete` raise ``_Stopped``. ``stats`` counts requests and retries by
    kind; ``stats`` and ``stop`` may be given to share them between clients (one cap, one stop).
    Subclasses set ``api_error`` (the exception raised when a request fails for good) and
    ``resume_hint`` (how the user goes on after it)."""

    api_error: type[ClientError] = ClientAPIError
    resume_hint = ("finished items are reused from the cache", "finished items are reused")

    def __init__(self, *, base_url: str | None, api_key: str, timeout: float = 120.0, max_retries: int = 6,
                 max_requests: int | None = None, stats: Stats | None = None, stop: threading.Event | None = None):
        self.max_retries, self.max_requests = max_retries, max_requests
        self.secret = api_key
        self.stop = stop if stop is not None else threading.Event()  # given: shared by several clients
        self.stats = stats if stats is not None else Stats()
        self._ctx = threading.local()
        http = openai.DefaultHttpxClient(transport=_AttemptTransport(self, httpx2.HTTPTransport()))
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries,
                                    timeout=timeout, http_client=http)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def _take_request_slot(self) -> None:
        with self.stats.lock:
            if self.stop.is_set():
                raise _Stopped("stopping")
            if self.max_requests is not None and self.stats.http_requests >= self.max_requests:
                raise _Stopped(f"--max-requests {self.max_requests} reached")
            self.stats.http_requests += 1

    def complete(self, name: str, label: str, **request: Any) -> ChatCompletion:
        """One ChatCompletion of ``client.chat.completions.create(**request)``. ``name`` names the
        item in errors, ``label`` the request in retry logs. Raises ``api_error`` when the server
        refuses (a 4xx other than 408/409/429, or the connection) or the retries are used up, and
        ``_Stopped`` when the run stops."""
        self._ctx.label, self._ctx.attempts, self._ctx.failure = label, 0, None
        self._ctx.cause = None
        long_hint, short_hint = self.resume_hint
        for again in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(**request)
                if not isinstance(response, ChatCompletion):  # the client hands back a non-JSON body as text
                    raise _NotJson(f"HTTP 200 with a body that is not JSON, starting {str(response)[:60]!r}")
                return response
            except (json.JSONDecodeError, openai.APIResponseValidationError, _NotJson) as exc:
                # A 200 whose body does not parse (a proxy cut it short, or sent an HTML page) is not
                # retried by the client.
                if again == self.max_retries:
                    raise self.api_error(self.redact(f"giving up on {name} after {self._ctx.attempts} attempts; "
                                                     f"last error: malformed response ({exc})")) from None
                self.stats.count_retry("malformed response")
                logger.warning("%s: malformed response; asking again", label)
            except openai.APIStatusError as exc:
                if self._ctx.failure in ("429", "5xx", "408", "409"):
                    raise self._gave_up(name, f"{exc.status_code} ({exc})", short_hint) from None
                raise self.api_error(self.redact(
                    f"the server refused the request for {name} with HTTP {exc.status_code}: {exc}. Nothing "
                    f"was retried; fix the cause (model name, key, request size) and rerun -- {long_hint}.")) from None
            except _Refused as exc:
                raise self.api_error(self.redact(
                    f"cannot connect to {self.client.base_url} for {name}: connection refused ({exc}); "
                    "nothing is listening there. Fix: check --base-url (scheme, host, port, /v1) and that the "
                    f"server is running; {long_hint}.")) from None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                cause = getattr(self._ctx, "cause", None)
                why = f"{self._ctx.failure or 'connection'} to {self.client.base_url} ({cause or exc})"
                raise self._gave_up(name, why, short_hint) from None
        raise AssertionError("unreachable")

    def _gave_up(self, name: str, why: str, hint: str) -> ClientError:
        return self.api_error(self.redact(
            f"giving up on {name} after {self._ctx.attempts} attempts; last error: {why}. Rerun later "
            f"({hint}) or raise --max-retries."))
