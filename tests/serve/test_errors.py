"""Every bad input and overload gets OpenAI-style error JSON with the right status — never a
traceback — while a good request running at the same time is unharmed; logs hold no key or image."""
import base64
import io
import json
import logging
import re
import threading
import time

import pytest
import torch
from checkpoint_factory import ASSET_IMAGE
from PIL import Image
from serve_utils import data_url, post

from stllava.serve.inputs import ImageLimits

KEY = "sk-serve-9f8e7d6c-DO-NOT-LOG"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ImageLimits(max_bytes=300_000, max_pixels=2_000_000)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def ask_body(url=None, text="What is shown?", **kw):
    content = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **kw}


def bad_cases():
    """(name, request body or raw bytes, headers, status, words the message must contain)."""
    g = torch.Generator().manual_seed(0)
    noise = Image.fromarray((torch.rand(400, 400, 3, generator=g) * 255).to(torch.uint8).numpy())
    good = data_url(ASSET_IMAGE)
    truncated = png(noise)[:5000]
    bomb = png(Image.new("1", (3000, 3000)))  # 9 M pixels in a few kB
    user = {"role": "user", "content": "hi"}
    return [
        ("not json", b"{nope", AUTH, 400, "not JSON"),
        ("json array", b"[1, 2]", AUTH, 400, "JSON object"),
        ("no messages", {"model": "tiny"}, AUTH, 400, "messages: Field required"),
        ("empty messages", {"messages": []}, AUTH, 400, "messages"),
        ("content is a number", {"messages": [{"role": "user", "content": 3}]}, AUTH, 400, "messages.0.content"),
        ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, AUTH, 400, "messages.0.role"),
        ("unsupported part", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         AUTH, 400, "input_audio"),
        ("image_url without url", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         AUTH, 400, "url"),
        ("assistant first", {"messages": [{"role": "assistant", "content": "x"}, user]}, AUTH, 400, "expected a user"),
        ("ends with assistant", {"messages": [user, {"role": "assistant", "content": "x"}]}, AUTH, 400, "last message"),
        ("image not decodable", ask_body(b64url(b"this is not an image")), AUTH, 400, "does not decode"),
        ("image truncated", ask_body(b64url(truncated)), AUTH, 400, "does not decode"),
        ("image bad base64", ask_body("data:image/png;base64,@@@@"), AUTH, 400, "not valid base64"),
        ("image too many bytes", ask_body(b64url(png(noise))), AUTH, 400, "larger than 300000 bytes"),
        ("decompression bomb", ask_body(b64url(bomb)), AUTH, 400, "3000x3000 pixels"),
        ("two images", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good}}, {"type": "image_url", "image_url": {"url": good}}]}]},
         AUTH, 400, "more images than this model takes"),
        ("http image", ask_body("http://127.0.0.1:9/x.png"), AUTH, 400, "--allow-remote-images"),
        ("file image", ask_body("file:///etc/passwd"), AUTH, 400, "base64 data URL"),
        ("max_tokens beyond context", ask_body(good, max_tokens=5000), AUTH, 400, "beyond the context"),
        ("prompt beyond context", ask_body(text="lesion " * 1200), AUTH, 400, "the prompt takes"),
        ("min_tokens over max_tokens", ask_body(min_tokens=9), AUTH, 400, "min_tokens=9"),
        ("temperature", ask_body(temperature=3), AUTH, 400, "temperature"),
        ("top_p", ask_body(top_p=0), AUTH, 400, "top_p"),
        ("n", ask_body(n=2), AUTH, 400, "n=2"),
        ("tools", ask_body(tools=[{"type": "function"}]), AUTH, 400, "'tools' is not supported"),
        ("wrong model", ask_body(model="gpt-4o"), AUTH, 404, "'gpt-4o' does not exist"),
        ("body too large", b"x" * 1_200_000, AUTH, 413, "exceeds the limit"),
        ("no key", ask_body(), {}, 401, "Incorrect API key"),
        ("wrong key", ask_body(), {"Authorization": "Bearer sk-wrong"}, 401, "Incorrect API key"),
    ]


def test_every_bad_input_gets_its_error_and_harms_no_other_request(start_server, caplog):
    caplog.set_level(logging.DEBUG)
    srv = start_server(api_key=KEY, max_body_bytes=1_000_000, limits=LIMITS)
    cases = bad_cases()
    long_req = ask_body(data_url(ASSET_IMAGE), text="Describe the image.", max_tokens=600, min_tokens=600, stream=True)
    running = {}
    t = threading.Thread(target=lambda: running.update(reply=post(srv.url, "/v1/chat/completions", long_req, AUTH)))
    t.start()
    while srv.engine.running == 0:  # the good request is generating while the bad ones arrive
        time.sleep(0.01)
    for name, body, headers, status, words in cases:
        got, hdrs, reply = post(srv.url, "/v1/chat/completions", body, headers)
        assert got == status, (name, reply)
        assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, name
        assert words in reply["error"]["message"], (name, reply)
        assert "Traceback" not in json.dumps(reply), name
        assert not re.search(r"[A-Za-z0-9+/=]{60}", reply["error"]["message"]), (name, "echoes base64 data")
    assert srv.engine.running == 1, "the bad requests outlived the good one: it was not running alongside"
    t.join(timeout=60)
    status, _, sse = running["reply"]
    assert status == 200 and sse.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    alone = post(srv.url, "/v1/chat/completions", {**long_req, "stream": False}, AUTH)[2]
    assert streamed == alone["choices"][0]["message"]["content"]
    assert srv.engine.stats()["failed_batches"] == 0 and srv.engine.stats()["requests"] == 2

    # other routes and methods answer in the same format
    assert post(srv.url, "/v2/nothing", {}, AUTH)[:1] == (404,)
    # nothing secret or bulky reached the logs
    payloads = [data_url(ASSET_IMAGE).split(",")[1][:200]] + [
        json.dumps(b)[-300:-100] for _, b, *_ in cases if isinstance(b, dict) and "base64," in json.dumps(b)]
    assert caplog.text and KEY not in caplog.text
    assert not [p for p in payloads if p in caplog.text]


def test_a_full_queue_answers_503_with_retry_after(start_server):
    srv = start_server(max_batch=1, max_queue=1, window_s=0.0)
    body = ask_body(data_url(ASSET_IMAGE), max_tokens=300, min_tokens=300)
    results = {}

    def send(name):
        results[name] = post(srv.url, "/v1/chat/completions", body)

    first = threading.Thread(target=send, args=("first",))
    first.start()
    while srv.engine.running == 0:
        time.sleep(0.005)
    second = threading.Thread(target=send, args=("queued",))
    second.start()
    while srv.engine.stats()["queued"] == 0:
        time.sleep(0.005)
    status, headers, reply = post(srv.url, "/v1/chat/completions", body)  # the queue holds one: full
    assert status == 503 and headers["retry-after"] == "1"
    assert reply["error"]["type"] == "server_overloaded" and "retry later" in reply["error"]["message"]
    first.join(60)
    second.join(60)
    assert results["first"][0] == results["queued"][0] == 200
    assert results["first"][2]["choices"][0]["message"] == results["queued"][2]["choices"][0]["message"]
    assert results["first"][2]["usage"]["completion_tokens"] == 300


@pytest.mark.parametrize("pixels", [50_000_000, 15000 * 15000])
def test_decompression_bombs_are_refused_from_the_header_with_default_limits(pixels):
    from stllava.serve.inputs import decode_image
    from stllava.serve.protocol import APIError

    side = int(pixels ** 0.5)
    raw = png(Image.new("1", (side, side)))
    assert len(raw) < 200_000
    with pytest.raises(APIError) as e:
        decode_image(raw, ImageLimits(), "messages[0].content")
    assert e.value.status == 400 and "pixels" in e.value.message
