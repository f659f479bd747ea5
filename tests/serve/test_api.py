"""stllava.serve.api through the real openai client: whole and streamed answers with an image,
greedy answers equal to eval.model_vqa's, concurrent requests batched without changing answers."""
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_utils import data_url, image_message

from stllava.eval import model_vqa
from stllava.mm_utils import tokenizer_image_token

ASSETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "stllava", "assets", "vqa_rad",
                                       "images", "*.jpg")))
QUESTIONS = ["What is shown in the image?", "Is there a fracture?", "Which side is abnormal?", "Is this a CT scan?",
             "How many lesions are there?", "Is the heart enlarged?", "What organ is shown?", "Is it normal?"]


def client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def _kw(kw):
    """Request keywords; vLLM's ``min_tokens`` extension goes in the body as extra_body."""
    kw = {"model": "tiny", "temperature": 0, "max_tokens": 24, **kw}
    if "min_tokens" in kw:
        kw["extra_body"] = {"min_tokens": kw.pop("min_tokens")}
    return kw


def ask(srv, question, image, **kw):
    """The whole reply of one chat request about ``image`` (a file)."""
    kw = _kw(kw)
    return client(srv).chat.completions.create(messages=[image_message(question, data_url(image))], **kw)


def ask_streamed(srv, question, image, **kw):
    """(pieces, finish_reason, usage) of one streamed chat request."""
    kw = _kw(kw)
    stream = client(srv).chat.completions.create(messages=[image_message(question, data_url(image))], stream=True,
                                                 stream_options={"include_usage": True}, **kw)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return pieces, finish, usage


def test_openai_client_gets_whole_and_streamed_answers_with_an_image(start_server, tiny_loaded):
    tok, model, _, _ = tiny_loaded
    srv = start_server()
    r = ask(srv, QUESTIONS[0], ASSETS[0], min_tokens=3)
    text = r.choices[0].message.content
    assert text and r.model == "tiny" and r.choices[0].message.role == "assistant"
    # prompt positions = the rendered prompt's text tokens + the image's feature positions
    prompt = model_vqa.build_prompt(model_vqa.Question(1, 0, "x.jpg", QUESTIONS[0]), "v1")
    patches = model.get_model().get_vision_tower().num_patches
    assert r.usage.prompt_tokens == len(tokenizer_image_token(prompt, tok)) - 1 + patches
    assert 3 <= r.usage.completion_tokens <= 24
    assert (r.usage.completion_tokens == 24) == (r.choices[0].finish_reason == "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    pieces, finish, usage = ask_streamed(srv, QUESTIONS[0], ASSETS[0], min_tokens=3)
    assert len(pieces) > 1, "the answer came in one piece: not streamed"
    assert "".join(pieces) == text and finish == r.choices[0].finish_reason
    assert usage.model_dump() == r.usage.model_dump()

    models = client(srv).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_answers_equal_model_vqa_while_batched(start_server, tiny_loaded, tmp_path):
    tok, model, proc, _ = tiny_loaded
    qs = [{"question_id": i, "image": os.path.basename(ASSETS[i]), "text": QUESTIONS[i]} for i in range(6)]
    qfile, afile = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    args = model_vqa.build_parser().parse_args([
        "--model-path", "tiny", "--question-file", str(qfile), "--image-folder", os.path.dirname(ASSETS[0]),
        "--answers-file", str(afile), "--max-new-tokens", "32", "--no-progress", "--batch-size", "4"])
    model_vqa.run(args, loaded=(tok, model, proc))
    expected = {json.loads(line)["question_id"]: json.loads(line)["text"] for line in afile.read_text().splitlines()}

    srv = start_server(max_batch=6, window_s=2.0)  # the six requests arrive within the window: one batch
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: ask(srv, QUESTIONS[i], ASSETS[i], max_tokens=32), range(6)))
    assert [r.choices[0].message.content for r in replies] == [expected[i] for i in range(6)]
    assert list(srv.engine.batch_sizes) == [6]


def test_eight_concurrent_requests_are_batched_and_answers_do_not_depend_on_batch_mates(start_server):
    srv = start_server(max_batch=8, window_s=2.0)
    jobs = [dict(question=QUESTIONS[i], image=ASSETS[i], temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=12 + i)
            for i in range(8)]
    jobs[7]["seed"] = jobs[0]["seed"]  # same seed, other prompt: another answer; same prompt: the same

    def run(job):
        return ask(srv, job["question"], job["image"],
                   **{k: v for k, v in job.items() if k not in ("question", "image")}).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    assert list(srv.engine.batch_sizes) == [8]
    srv.engine.window_s = 0.0
    alone = [run(job) for job in jobs]  # one at a time: batches of one
    assert list(srv.engine.batch_sizes) == [8] + [1] * 8
    assert together == alone
    assert len(set(together)) > 4, together  # the seeds and prompts do give different samples


def test_rows_end_at_their_own_max_tokens_and_stop_strings(start_server):
    srv = start_server(max_batch=3, window_s=0.0)
    full = ask(srv, QUESTIONS[1], ASSETS[1], max_tokens=30, min_tokens=5).choices[0].message.content
    short = ask(srv, QUESTIONS[2], ASSETS[2], max_tokens=5, min_tokens=5)
    mid = len(full) // 2
    stop = next(full[i:i + 2] for i in range(mid, len(full) - 1) if full[i:i + 2].strip() == full[i:i + 2])
    want_cut = full[:full.find(stop)].rstrip()

    srv.engine.window_s = 2.0
    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(ask, srv, QUESTIONS[1], ASSETS[1], max_tokens=30, min_tokens=5)
        b = pool.submit(ask, srv, QUESTIONS[2], ASSETS[2], max_tokens=5, min_tokens=5)
        c = pool.submit(ask_streamed, srv, QUESTIONS[1], ASSETS[1], max_tokens=30, min_tokens=5, stop=[stop])
        a, b, (pieces, finish, usage) = a.result(), b.result(), c.result()
    assert list(srv.engine.batch_sizes)[-1] == 3
    assert a.choices[0].message.content == full
    assert b.choices[0].message.content == short.choices[0].message.content
    assert (b.choices[0].finish_reason, b.usage.completion_tokens) == ("length", 5)
    assert "".join(pieces) == want_cut and finish == "stop" and stop not in "".join(pieces)
    assert usage.completion_tokens < a.usage.completion_tokens
    srv.engine.window_s = 0.0
    whole = ask(srv, QUESTIONS[1], ASSETS[1], max_tokens=30, min_tokens=5, stop=stop)
    assert whole.choices[0].message.content == want_cut and whole.choices[0].finish_reason == "stop"


def test_conversation_continues_with_the_image_of_the_first_turn(start_server):
    srv = start_server()
    c = client(srv)
    first = [image_message(QUESTIONS[0], data_url(ASSETS[3]))]
    a1 = c.chat.completions.create(model="tiny", messages=first, temperature=0, max_tokens=8,
                                   extra_body={"min_tokens": 2})
    history = first + [{"role": "assistant", "content": a1.choices[0].message.content},
                       {"role": "user", "content": QUESTIONS[5]}]
    a2 = c.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=8,
                                   extra_body={"min_tokens": 2})
    # one image, counted once; the second prompt holds the first question and answer
    assert a2.usage.prompt_tokens > a1.usage.prompt_tokens + a1.usage.completion_tokens
    assert a2.choices[0].message.content


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
def test_api_key_is_required_when_set(start_server, path):
    srv = start_server(api_key="sk-serve-test-1234")
    with pytest.raises(openai.AuthenticationError):
        if path == "/v1/models":
            client(srv, key="sk-wrong").models.list()
        else:
            client(srv, key="sk-wrong").chat.completions.create(model="tiny", messages=[
                {"role": "user", "content": "hi"}], max_tokens=2)
    ok = client(srv, key="sk-serve-test-1234").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"min_tokens": 2})
    assert ok.usage.completion_tokens == 2
