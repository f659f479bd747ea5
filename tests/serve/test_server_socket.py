"""The server's accepted connections have Nagle's algorithm off (TCP_NODELAY): with it on, every
small reply waited for the client's delayed ACK, ~40 ms per request on a keep-alive connection."""
import http.client
import socket

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
