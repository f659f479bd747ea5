"""Run an ASGI app on uvicorn: in a background thread (tests, the demo's judge, benchmarks) or in
the calling thread with uvicorn's own Ctrl-C / SIGTERM handling (the command-line servers).

The listening socket is bound in the constructor, so ``port=0`` picks a free port and
``base_url`` is known before the server starts.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

logger = logging.getLogger(__name__)


class UvicornServer:
    """``app`` on ``host:port`` (default 127.0.0.1, 0 = a free port) under uvicorn.

    ``access_log``: log one line per request (method, path, status; never bodies or headers).
    ``graceful_s``: how long stopping waits for in-flight requests before closing them.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
                 graceful_s: float | None = None):
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
        config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on",
                                timeout_graceful_shutdown=graceful_s, timeout_keep_alive=30)
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
