"""Requests a web page can make on a visitor's behalf are refused (docs/Serving.md, "Errors, limits
and safety"): a POST that is not ``Content-Type: application/json`` (a "simple" cross-site request
needs no CORS preflight) gets 415, and a ``Host`` header outside ``--allowed-hosts`` (a DNS-rebinding
page reaches 127.0.0.1 under its own name) gets 421, both as OpenAI-style error JSON. A server
bound beyond loopback without ``--allowed-hosts`` or ``--api-key`` does not start."""
import http.client
import json

import pytest
from serve_utils import post

from stllava.serve import api

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def raw(srv, method, path, body=b"", headers=None):
    """(status, parsed JSON or text) of a request with exactly ``headers`` (no Content-Type added)."""
    conn = http.client.HTTPConnection(srv.server.host, srv.server.port, timeout=60)
    conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    if body:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


def assert_openai_error(reply, status, words):
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["code"] == str(status) and words in reply["error"]["message"], reply


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_a_post_that_is_not_json_typed_gets_415(start_server, content_type):
    srv = start_server(window_s=0.0)
    headers = {"Content-Type": content_type} if content_type else {}
    status, reply = raw(srv, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(), headers)
    assert status == 415
    assert_openai_error(reply, 415, "Content-Type must be application/json")
    assert srv.engine.stats()["requests"] == 0


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON"])
def test_json_content_types_are_accepted(start_server, content_type):
    srv = start_server(window_s=0.0)
    status, reply = raw(srv, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                        {"Content-Type": content_type})
    assert status == 200 and reply["object"] == "chat.completion"


def test_hosts_outside_the_allow_list_get_421_on_every_route(start_server):
    srv = start_server(window_s=0.0, allowed_hosts=api.LOOPBACK_HOSTS)
    port = srv.server.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example",
                 "[::2]", "", "localhost@evil.example"):
        for method, path, body in (("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
                                   ("GET", "/v1/models", b""), ("GET", "/", b""), ("GET", "/health", b""),
                                   ("GET", "/no/such/route", b"")):
            status, reply = raw(srv, method, path, body, {"Host": host, "Content-Type": "application/json"})
            assert status == 421, (host, path, reply)
            assert_openai_error(reply, 421, "is not one this server answers to")
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}",
                 "LOCALHOST"):
        status, reply = raw(srv, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                            {"Host": host, "Content-Type": "application/json"})
        assert status == 200, (host, reply)
    assert post(srv.url, "/v1/chat/completions", CHAT)[0] == 200  # what clients send by default


def test_allow_list_entries_with_a_port_match_that_port_only_and_star_allows_all():
    from stllava.serve.protocol import host_allowed

    allowed = ["myserver.lan:8000", "10.0.0.5", "[fe80::1]", "::2"]
    assert host_allowed("myserver.lan:8000", allowed) and host_allowed("MyServer.lan:8000", allowed)
    assert not host_allowed("myserver.lan", allowed) and not host_allowed("myserver.lan:8001", allowed)
    assert host_allowed("10.0.0.5", allowed) and host_allowed("10.0.0.5:1234", allowed)
    assert host_allowed("[fe80::1]:80", allowed) and host_allowed("[::2]", allowed)
    assert not host_allowed("[fe80::2]", allowed) and not host_allowed(None, allowed)
    assert not host_allowed("10.0.0.5:notaport", allowed) and not host_allowed("[::1", allowed)
    assert host_allowed("anything.example", ["*"])


def test_host_policy_by_bind_address():
    assert api.host_policy("127.0.0.1", None, None) == list(api.LOOPBACK_HOSTS)
    assert api.host_policy("::1", None, "sk-x") == list(api.LOOPBACK_HOSTS)
    assert api.host_policy("127.0.0.2", None, None) == [*api.LOOPBACK_HOSTS, "127.0.0.2"]
    assert api.host_policy("0.0.0.0", "myserver.lan, 10.0.0.5:8000", None) == ["myserver.lan", "10.0.0.5:8000"]
    assert api.host_policy("0.0.0.0", None, "sk-x") is None  # the key guards it; any Host
    with pytest.raises(api.ServeError, match="--allowed-hosts") as e:
        api.host_policy("0.0.0.0", None, None)
    assert "--api-key" in str(e.value) and "\n" not in str(e.value)


def test_a_non_loopback_bind_without_allowed_hosts_or_key_is_refused_before_loading(capsys, monkeypatch, tmp_path):
    from stllava.errors import run_cli

    monkeypatch.delenv(api.API_KEY_ENV, raising=False)
    # The model path does not exist: the refusal must come first, before anything is loaded.
    status = run_cli(api.main, ["--model-path", str(tmp_path / "missing"), "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "--allowed-hosts" in err and "--api-key" in err and "missing" not in err


def test_the_chat_page_posts_json():
    """The page's requests stay accepted: its POST carries Content-Type: application/json (the
    browser test, tests/serve/test_page.py, drives it for real where chromium is installed)."""
    import re

    from stllava.serve.protocol import page_html

    html = page_html()
    headers = re.search(r"function headers\(\) \{(.*?)\n\}", html, re.S)
    assert headers and '"Content-Type": "application/json"' in headers.group(1)
    assert re.search(r'fetch\("/v1/chat/completions", \{method: "POST", headers: headers\(\)', html)
