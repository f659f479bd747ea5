"""The server's connections: Nagle's algorithm off (TCP_NODELAY; with it on, every small reply
waited for the client's delayed ACK, ~40 ms per request on a keep-alive connection); a request not
received whole within ``request_timeout`` is answered 408 and closed (a slow client cannot hold a
connection forever); connections beyond ``max_connections`` get 503."""
import http.client
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from stllava.serve.server import UvicornServer


def test_accepted_connections_have_tcp_nodelay():
    app = Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong"))])
    server = UvicornServer(app).start()
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        for _ in range(2):  # the same keep-alive connection twice
            conn.request("GET", "/ping")
            assert conn.getresponse().read() == b"pong"
        connections = list(server.server.server_state.connections)
        assert len(connections) == 1
        sock = connections[0].transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        conn.close()
    finally:
        server.stop()


# ------------------------------------------------------------------ slow clients (docs/Serving.md)
def slow_app(delay_s: float = 0.0):
    """``GET /ping`` → pong; ``POST /echo`` → the body's length, after ``delay_s``."""
    import asyncio

    async def echo(request):
        body = await request.body()
        await asyncio.sleep(delay_s)
        return PlainTextResponse(str(len(body)))

    return Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong")),
                             Route("/echo", echo, methods=["POST"])])


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """(everything the server sent, seconds until it closed the connection); fails after ``limit_s``."""
    sock.settimeout(limit_s)
    t0, got = time.monotonic(), b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return got, time.monotonic() - t0
        got += piece


@pytest.mark.parametrize("sent", [
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",                        # headers cut short
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n0123456789",  # body cut short
    b"",                                                                              # nothing at all
])
def test_a_half_sent_request_is_closed_after_the_request_timeout(sent):
    server = UvicornServer(slow_app(), request_timeout=1.0).start()
    try:
        sock = socket.create_connection((server.host, server.port))
        t0 = time.monotonic()
        if sent:
            sock.sendall(sent)
        # Meanwhile normal requests are served.
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("GET", "/ping")
        assert conn.getresponse().read() == b"pong"
        got, _ = read_until_closed(sock, limit_s=5)
        waited = time.monotonic() - t0
        sock.close()
        assert 0.9 <= waited <= 2.5, waited
        if sent:
            assert got.startswith(b"HTTP/1.1 408 ") and b'"code": "408"' in got, got
        else:  # a connection that never sent a byte is closed without a reply
            assert got == b""
    finally:
        server.stop()


def test_a_pipelined_request_cut_short_is_closed_after_the_answer_to_the_first():
    server = UvicornServer(slow_app(), request_timeout=1.0).start()
    try:
        sock = socket.create_connection((server.host, server.port))
        t0 = time.monotonic()
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nabc")
        got, _ = read_until_closed(sock, limit_s=5)
        sock.close()
        assert got.startswith(b"HTTP/1.1 200 ") and b"pong" in got and b"HTTP/1.1 408 " in got, got
        assert time.monotonic() - t0 <= 2.5
    finally:
        server.stop()


def test_a_request_trickled_byte_by_byte_is_cut_at_the_deadline_not_per_byte():
    server = UvicornServer(slow_app(), request_timeout=1.0).start()
    try:
        sock = socket.create_connection((server.host, server.port))
        request = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n" + b"x" * 50
        t0, closed = time.monotonic(), False
        for byte in request:  # one byte every 50 ms: each arrives well within any per-read timeout
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - t0 > 3:
                break
        got, _ = read_until_closed(sock, limit_s=5)
        sock.close()
        assert closed or got.startswith(b"HTTP/1.1 408 "), got
        assert time.monotonic() - t0 < 3.5
    finally:
        server.stop()


def test_the_timeout_bounds_receiving_the_request_not_answering_it():
    server = UvicornServer(slow_app(delay_s=1.5), request_timeout=1.0).start()
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        for _ in range(2):  # twice on one keep-alive connection: the second request gets a fresh deadline
            conn.request("POST", "/echo", b"y" * 1000)
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b"1000")
        conn.close()
    finally:
        server.stop()


def test_connections_beyond_max_connections_get_503():
    server = UvicornServer(slow_app(delay_s=1.0), max_connections=2).start()
    try:
        busy = [http.client.HTTPConnection(server.host, server.port, timeout=10) for _ in range(2)]
        for c in busy:
            c.request("POST", "/echo", b"z")
        time.sleep(0.3)  # both are being answered
        extra = http.client.HTTPConnection(server.host, server.port, timeout=10)
        extra.request("GET", "/ping")
        assert extra.getresponse().status == 503
        for c in busy:
            r = c.getresponse()
            assert (r.status, r.read()) == (200, b"1")
            c.close()
    finally:
        server.stop()
