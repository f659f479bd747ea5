"""Run an ASGI app on uvicorn: in a background thread (tests, the demo's judge, benchmarks) or in
the calling thread with uvicorn's own Ctrl-C / SIGTERM handling (the command-line servers).

The listening socket is bound in the constructor, so ``port=0`` picks a free port and
``base_url`` is known before the server starts.

Slow clients: uvicorn times out only idle keep-alive connections, and an ASGI app sees a request
only once its headers are complete, so a client that sends its headers (or body) a byte at a time
holds a connection, and with enough of them every connection, forever. The deadline therefore
lives in the HTTP protocol: :class:`RequestTimeoutH11Protocol` answers 408 and closes a connection
whose request is not received whole within ``request_timeout`` seconds; ``max_connections`` caps
the connections served at once (uvicorn's ``limit_concurrency``: the ones beyond get 503).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class RequestTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request whole (headers and body):
    ``request_timeout`` seconds from the connection's opening for its first request, from the
    first byte for the next ones on a keep-alive connection. Past it, a partly received request
    is answered 408 (OpenAI-style error JSON) and the connection closed; one that sent nothing is
    just closed. Producing the answer is not timed. Subclassed with the seconds set by
    :func:`request_timeout_protocol`."""

    request_timeout: float = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._received = False  # a byte of the current request arrived
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._received = True
        super().data_received(data)
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # a request is still on its way
            if self._deadline is None:
                self._arm()
        else:  # received whole (or the connection is done): the rest is the app's time
            self._disarm()
            self._received = False

    def on_response_complete(self) -> None:
        super().on_response_complete()  # goes on with a pipelined request already received, if any
        pipelined = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and self.conn.trailing_data[0])
        if pipelined and self._deadline is None and not self.transport.is_closing():
            self._received = True  # part of the next request is here: its clock starts now
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self._received:
            logger.info("closing the connection from %s: its request was not received whole within %g s",
                        "%s:%d" % self.client if self.client else "a client", self.request_timeout)
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing answered yet
                self.transport.write(_timeout_response(self.request_timeout))
        self.transport.close()


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"request not received whole within {seconds:g} s",
                                 "type": "invalid_request_error", "param": None, "code": "408"}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def request_timeout_protocol(seconds: float) -> type[RequestTimeoutH11Protocol]:
    """The :class:`RequestTimeoutH11Protocol` with a ``seconds`` deadline (uvicorn's ``http=``)."""
    if not seconds > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {seconds}")
    return type("RequestTimeoutH11Protocol", (RequestTimeoutH11Protocol,), {"request_timeout": float(seconds)})


class UvicornServer:
    """``app`` on ``host:port`` (default 127.0.0.1, 0 = a free port) under uvicorn.

    ``access_log``: log one line per request (method, path, status; never bodies or headers).
    ``graceful_s``: how long stopping waits for in-flight requests before closing them.
    ``request_timeout``: seconds a client has to send each request whole (None: no limit; see
    :class:`RequestTimeoutH11Protocol`). ``max_connections``: connections served at once (None: no
    limit); a request on one more gets 503 and its connection is closed.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
                 graceful_s: float | None = None, request_timeout: float | None = None,
                 max_connections: int | None = None):
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        http = request_timeout_protocol(request_timeout) if request_timeout is not None else "auto"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP; without
        # it every reply waited ~40 ms for the client's delayed ACK (Nagle), 44 ms per judge request
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        # log_config=None: uvicorn leaves the process's logging set-up alone.
        # limit_concurrency counts the connection asking too, so N + 1 lets N be served at once.
        config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on",
                                timeout_graceful_shutdown=graceful_s, timeout_keep_alive=30, http=http,
                                limit_concurrency=None if max_connections is None else max_connections + 1)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.sock.getsockname()[0]

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "UvicornServer":
        """Serve in a daemon thread; returns once the app has started (RuntimeError if it did not)."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start (see the log above)")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, run the app's shutdown, close the socket."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(timeout=2)
        self.sock.close()

    def run(self) -> None:
        """Serve in the calling thread until Ctrl-C / SIGTERM (uvicorn then lets in-flight requests
        finish before returning)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()
