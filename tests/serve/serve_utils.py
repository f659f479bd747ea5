"""Helpers of the server tests: data URLs, raw HTTP, a started server's handles."""
import base64
import http.client
import json
import urllib.parse


def data_url(path, mime="image/jpeg") -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def image_message(question: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": question},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def post(base: str, path: str, body, headers=None, timeout=60):
    """``(status, headers, parsed JSON or text)`` of a raw POST (no client-side checks or retries)."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(raw)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), raw


class Running:
    """A started model server: ``url``, ``base_url`` (…/v1), ``backend``, ``engine``."""

    def __init__(self, backend, server):
        self.backend, self.engine, self.server = backend, backend.engine, server
        self.url, self.base_url = server.url, server.url + "/v1"
