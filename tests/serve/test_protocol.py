"""The one protocol implementation with a Python scorer backend (stllava.demo.openai_stub):
the same routes, schema, auth and error JSON as the model server, streaming included."""
import openai
import pytest
from serve_utils import post

from stllava.demo.openai_stub import ChatCompletionServer, Reply, request_text


def test_scorer_server_streams_checks_keys_and_answers_errors_in_openai_format():
    def scorer(body):
        text = request_text(body)
        if text == "fail":
            return Reply(status=429, error="slow down", headers={"Retry-After": "0.5"})
        if text == "bug":
            raise RuntimeError("scorer bug")
        return Reply(f"echo: {text}", usage=(7, 3))

    with ChatCompletionServer(scorer, api_key="sk-local", model="judge") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0)
        whole = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == "echo: hi" and whole.model == "gpt-4o"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (7, 3)
        stream = client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi"
        assert chunks[-1].usage.total_tokens == 10
        assert [m.id for m in client.models.list().data] == ["judge"]
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "fail"}])
        assert e.value.response.headers["retry-after"] == "0.5" and "slow down" in str(e.value)
        with pytest.raises(openai.InternalServerError, match="scorer raised RuntimeError: scorer bug"):
            client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "bug"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="sk-other", max_retries=0).models.list()
        status, _, reply = post(server.base_url[:-3], "/v1/chat/completions", {"messages": "nope"},
                                {"Authorization": "Bearer sk-local"})
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
        assert [r["status"] for r in server.requests] == [200, 200, 429, 500]  # what the scorer answered
