"""Chat messages → prompt and images (stllava.serve.inputs) and the engine's streaming helpers."""
import pytest
from checkpoint_factory import ASSET_IMAGE
from serve_utils import data_url

from stllava.conversation import VICUNA_SYSTEM
from stllava.eval import model_vqa
from stllava.serve.engine import first_stop, streamable
from stllava.serve.inputs import ImageLimits, build_prompt
from stllava.serve.protocol import APIError, ChatRequest, parse_request

IMG = {"type": "image_url", "image_url": {"url": data_url(ASSET_IMAGE)}}


def messages(*raw):
    return ChatRequest.model_validate({"messages": list(raw)}).messages


def test_one_question_renders_exactly_as_model_vqa():
    for content in ([{"type": "text", "text": "Is there a fracture?"}, IMG],
                    [IMG, {"type": "text", "text": "Is there a fracture?"}]):  # the part order does not matter
        chat = build_prompt(messages({"role": "user", "content": content}), "v1", ImageLimits())
        want = model_vqa.build_prompt(model_vqa.Question(1, 0, "x.jpg", "Is there a fracture?"), "vicuna_v1")
        assert chat.prompt == want
        assert len(chat.images) == 1 and chat.images[0].mode == "RGB"


def test_conversation_golden_with_system_and_literal_image_tags_kept_as_plain_text():
    # A typed "<image>" is text (a zero-width space after its "<"), never a second image slot.
    chat = build_prompt(messages(
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": [{"type": "text", "text": "What <image>is it?"}, IMG]},
        {"role": "assistant", "content": "A chest X-ray."},
        {"role": "user", "content": [{"type": "text", "text": "Any "}, {"type": "text", "text": "<image>nodule?"}]},
    ), "v1", ImageLimits())
    assert chat.prompt == ("You are a radiologist. USER: <image>\nWhat <\u200bimage>is it? ASSISTANT: A chest "
                           "X-ray.</s>USER: Any <\u200bimage>nodule? ASSISTANT:")
    assert chat.prompt.count("<image>") == 1
    text_only = build_prompt(messages({"role": "user", "content": "hi"}), "v1", ImageLimits())
    assert text_only.prompt == f"{VICUNA_SYSTEM} USER: hi ASSISTANT:" and text_only.images == []


@pytest.mark.parametrize("raw, words", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected an assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [IMG]}, {"role": "user", "content": "b"}],
     "only accepted in user messages"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "b"}],
     "needs text content"),
    ([{"role": "system", "content": "s"}], "last message must be a user message"),
    ([{"role": "user", "content": [{"type": "text", "text": " "}]}], "a user message needs text content or an image"),
    ([{"role": "user", "content": [IMG]}, {"role": "assistant", "content": "x"}, {"role": "user", "content": [IMG]}],
     "more images than this model takes"),
])
def test_conversations_the_template_cannot_hold_are_refused(raw, words):
    with pytest.raises(APIError) as e:
        build_prompt(messages(*raw), "v1", ImageLimits())
    assert e.value.status == 400 and words in e.value.message


def test_parse_request_refuses_unsupported_features_and_keeps_the_raw_body():
    body, req = parse_request(b'{"messages": [{"role": "user", "content": "x"}], "stop": "END", "seed": 3}')
    assert body["stop"] == "END" and req.stop_list() == ["END"] and req.seed == 3 and req.temperature is None
    for extra, words in (('"logprobs": true', "'logprobs' is not supported"),
                         ('"response_format": {"type": "json_object"}', "response_format"),
                         ('"stop": ["a", "b", "c", "d", "e"]', "at most 4 stop sequences"),
                         ('"seed": -1', "seed")):
        with pytest.raises(APIError) as e:
            parse_request(('{"messages": [{"role": "user", "content": "x"}], ' + extra + "}").encode())
        assert words in e.value.message


def test_streamable_text_holds_back_what_may_still_change():
    assert streamable("the left lung", []) == "the left lung"
    assert streamable("the left ", []) == "the left"            # trailing space: the answer is stripped
    assert streamable("the left US", ["USER:"]) == "the left"    # may become the stop string
    assert streamable("the left U", ["UX", "USER:"]) == "the left"
    assert streamable("ends </", []) == "ends"                    # may become the </s> the clean-up removes
    assert streamable("caf\ufffd", []) == "caf"                   # an incomplete character
    assert first_stop("a USER: b ###", ["###", "USER:"]) == 2 and first_stop("abc", ["x"]) is None
