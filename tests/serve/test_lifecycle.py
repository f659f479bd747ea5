"""A client that disconnects stops its generation; SIGTERM lets in-flight requests finish, then the
server process exits 0; remote images are fetched only when allowed."""
import http.client
import http.server
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from checkpoint_factory import ASSET_IMAGE
from serve_utils import data_url, image_message, post

from stllava.serve.inputs import ImageLimits

REPO = pathlib.Path(__file__).resolve().parents[2]


def body(**kw):
    return {"messages": [image_message("Describe the image.", data_url(ASSET_IMAGE))], "temperature": 0, **kw}


def open_request(url, payload, timeout=60):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
    return conn


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_client_that_disconnects_stops_its_generation(start_server):
    srv = start_server(window_s=0.0)
    # streamed: read two events, then hang up
    conn = open_request(srv.url, body(max_tokens=800, min_tokens=800, stream=True))
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: srv.engine.stats()["cancelled"] == 1 and srv.engine.running == 0)
    first = srv.engine.stats()["generated_tokens"]
    assert first < 400, f"{first} of 800 tokens generated after the client left"
    # whole answer: the client gives up while it is generating
    conn = open_request(srv.url, body(max_tokens=800, min_tokens=800))
    wait_for(lambda: srv.engine.running == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: srv.engine.stats()["cancelled"] == 2 and srv.engine.running == 0)
    assert srv.engine.stats()["generated_tokens"] - first < 400
    # the server goes on serving
    status, _, reply = post(srv.url, "/v1/chat/completions", body(max_tokens=3, min_tokens=3))
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_remote_images_are_fetched_only_when_allowed(start_server):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = os.path.dirname(ASSET_IMAGE)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=folder))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{os.path.basename(ASSET_IMAGE)}"
    try:
        remote = {"messages": [image_message("Is it normal?", url)], "temperature": 0, "max_tokens": 6}
        refused = start_server(window_s=0.0)
        status, _, reply = post(refused.url, "/v1/chat/completions", remote)
        assert status == 400 and "--allow-remote-images" in reply["error"]["message"]
        allowed = start_server(window_s=0.0, limits=ImageLimits(allow_remote=True))
        status, _, fetched = post(allowed.url, "/v1/chat/completions", remote)
        assert status == 200
        inline = post(allowed.url, "/v1/chat/completions", {**remote, "messages": [
            image_message("Is it normal?", data_url(ASSET_IMAGE))]})[2]
        assert fetched["choices"][0]["message"] == inline["choices"][0]["message"]
        status, _, reply = post(allowed.url, "/v1/chat/completions", {**remote, "messages": [
            image_message("Is it normal?", url + ".missing")]})
        assert status == 400 and "HTTP 404" in reply["error"]["message"]
    finally:
        httpd.shutdown()


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(tiny_bundle, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "stllava.serve.api", "--model-path", tiny_bundle["model"],
                             "--device", "cpu", "--port", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: "Application startup complete" in (tmp_path / "server.log").read_text(), timeout=120)
        conn = open_request(url, body(max_tokens=300, min_tokens=300, stream=True))
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        sse = r.read().decode()
        conn.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and sse.rstrip().endswith("data: [DONE]")
    text = (tmp_path / "server.log").read_text()
    assert "300 completion tokens, length" in text and "Finished server process" in text
    assert "conversation template v1 (default; the checkpoint config records no conv_mode)" in text
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
