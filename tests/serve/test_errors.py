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


def _chat(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, **kw}


def _raw(**kw) -> bytes:
    """A request body with some fields written verbatim (JSON that json.dumps would not write)."""
    return ("{" + ", ".join([f'"messages": {json.dumps(_chat()["messages"])}'] + [f'"{k}": {v}' for k, v in kw.items()])
            + "}").encode()


MALFORMED = [  # (name, body, the field the error names (param), words in the message)
    ("nested 100000 deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nests too deeply"),
    ("nested in an ignored field", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "messages": []}', None,
     "nests too deeply"),
    ("5000-digit max_tokens", _raw(max_tokens="9" * 5000), "max_tokens", "an integer of 5000 digits"),
    ("5000-digit negative seed", _raw(seed="-" + "9" * 5000), "seed", "an integer of 5000 digits"),
    ("30-digit seed", _raw(seed="9" * 30), "seed", "less than 9223372036854775808"),
    ("5000-digit string max_tokens", _chat(max_tokens="9" * 5000), "max_tokens", "max_tokens"),
    ("1e300 max_tokens", _chat(max_tokens=1e300), "max_tokens", "max_tokens"),
    ("NaN temperature", _raw(temperature="NaN"), "temperature", "finite number"),
    ("Infinity top_p", _raw(temperature=1, top_p="Infinity"), "top_p", "finite number"),
    ("-Infinity temperature", _raw(temperature="-Infinity"), "temperature", "finite number"),
    ("1e999 temperature", _raw(temperature="1e999"), "temperature", "finite number"),
    ("huge n", _raw(n="9" * 40), "n", "only one choice per request"),
    ("5000-digit n", _raw(n="9" * 5000), "n", "an integer of 5000 digits"),
    ("negative min_tokens", _chat(min_tokens=-1), "min_tokens", "greater than or equal to 0"),
    ("top_k negative", _chat(top_k=-5), "top_k", "greater than or equal to 0"),
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
     "messages.0.content", "lone surrogate"),
    ("lone surrogate in a text part", b'{"messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": "\\udfff x"}]}]}', "messages.0.content.0.text", "lone surrogate"),
    ("lone surrogate in the system message", b'{"messages": [{"role": "system", "content": "\\ud800"}, '
     b'{"role": "user", "content": "hi"}]}', "messages.0.content", "lone surrogate"),
    ("lone surrogate in stop", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "\\ud83d"]}',
     "stop.1", "lone surrogate"),
    ("lone surrogate in model", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
     "model", "lone surrogate"),
    ("lone surrogate in a key", b'{"\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}', None,
     "lone surrogate"),
    ("content is a number", _chat(messages=[{"role": "user", "content": 3}]), "messages.0.content", "string"),
]


def test_malformed_and_out_of_range_fields_get_a_quick_400_naming_the_field(start_server, caplog):
    """Each once gave a 500 (RecursionError, int-string ValueError, the tokenizer's TypeError on a
    lone surrogate) or a misleading message; now a 400 naming the field, in well under a second."""
    caplog.set_level(logging.ERROR)
    srv = start_server(window_s=0.0)
    for name, body, param, words in MALFORMED:
        t0 = time.perf_counter()
        status, _, reply = post(srv.url, "/v1/chat/completions", body)
        took = time.perf_counter() - t0
        assert status == 400, (name, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"}, name
        assert words in reply["error"]["message"] and reply["error"]["param"] == param, (name, reply)
        assert took < 1.0, (name, took)
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    assert srv.engine.stats()["requests"] == 0 and srv.engine.stats()["failed_batches"] == 0
    # the surrogate pair of a real emoji is fine
    status, _, reply = post(srv.url, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": '
                                                             b'"\\ud83d\\ude00"}], "max_tokens": 1}')
    assert status == 200, reply


def test_temperatures_too_small_to_sample_with_decode_greedily(start_server):
    """1e-300 once overflowed the logits to inf (500: "probability tensor contains inf"). Like vLLM,
    a temperature below 1e-5 means greedy decoding."""
    srv = start_server(window_s=0.0)
    greedy = post(srv.url, "/v1/chat/completions", _chat(max_tokens=6, min_tokens=6))[2]
    for t in (1e-300, 5e-324, 1e-6):
        status, _, reply = post(srv.url, "/v1/chat/completions", _chat(max_tokens=6, min_tokens=6, temperature=t,
                                                                       seed=1))
        assert status == 200, (t, reply)
        assert reply["choices"][0]["message"] == greedy["choices"][0]["message"], t
    assert srv.engine.stats()["failed_batches"] == 0


def test_a_huge_prompt_is_refused_by_its_length_before_tokenizing(start_server, tiny_loaded):
    """15 MB of text once took 7-16 s of tokenizing before its 400; the character bound (the context
    length × the longest vocabulary piece) refuses it at once."""
    srv = start_server(window_s=0.0)
    text = "lesion " * 2_200_000  # 15.4 MB
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": text}]
    t0 = time.perf_counter()
    status, _, reply = post(srv.url, "/v1/chat/completions", {"messages": history, "max_tokens": 2})
    took = time.perf_counter() - t0
    assert status == 400 and reply["error"]["param"] == "messages[2].content", reply
    assert reply["error"]["code"] == "context_length_exceeded"
    assert "characters" in reply["error"]["message"] and "15,400," in reply["error"]["message"], reply
    assert took < 3.0, took
    # a prompt just past the context, within the character bound, is still measured in tokens
    status, _, reply = post(srv.url, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "lesion " * 1200}], "max_tokens": 2})
    assert status == 400 and "the prompt takes" in reply["error"]["message"]


def test_a_chunked_body_over_the_limit_gets_413_without_being_held():
    import http.client

    from stllava.serve.protocol import create_app
    from stllava.serve.server import UvicornServer

    class Never:
        def model_ids(self):
            return ["x"]

        def health(self):
            return {}

        async def complete(self, req, body, request):
            raise AssertionError("not reached")

    server = UvicornServer(create_app(Never(), max_body_bytes=100_000)).start()
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        chunks = (b"x" * 10_000 for _ in range(1000))  # 10 MB, no Content-Length
        conn.request("POST", "/v1/chat/completions", chunks, {"Content-Type": "application/json"},
                     encode_chunked=True)
        r = conn.getresponse()
        reply = json.loads(r.read())
        assert r.status == 413 and "exceeds the limit of 100000 bytes" in reply["error"]["message"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close while the client still sends: it did not read 10 MB either way
    finally:
        server.stop()


def test_an_image_in_the_system_message_is_refused_not_dropped(start_server):
    srv = start_server(window_s=0.0)
    system = {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."},
                                            {"type": "image_url", "image_url": {"url": data_url(ASSET_IMAGE)}}]}
    status, _, reply = post(srv.url, "/v1/chat/completions", {"messages": [system, {"role": "user", "content": "hi"}],
                                                               "max_tokens": 2})
    assert status == 400 and reply["error"]["param"] == "messages[0]", reply
    assert "images are only accepted in user messages" in reply["error"]["message"]
