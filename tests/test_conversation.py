"""Byte-exact prompts of every template (docs/Method.md#templates). Expected strings are written out by hand."""
import pytest

from stllava.conversation import conv_templates, get_conv_template

# Copied by hand from docs/Method.md#templates (not imported: the test must catch a typo in conversation.py).
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
         "helpful, detailed, and polite answers to the human's questions.")
SQ = (VICUNA + "Also, the artificial intelligence assistant is a curious virtual user. The virtual user "
      "asks complex questions that are relevant to the content in the image, for example, asking about "
      "background knowledge of the objects in the image, asking to discuss about events happening in the "
      "image, etc. Again, do not ask about uncertain details.")


def render(name, messages):
    conv = get_conv_template(name)
    for role_index, text in messages:
        conv.append_message(conv.roles[role_index], text)
    return conv.get_prompt()


@pytest.mark.parametrize("name,system", [("v1", VICUNA), ("vicuna_v1", VICUNA), ("llava_v1", LLAVA)])
def test_two_turn_prompt_is_byte_exact(name, system):
    prompt = render(name, [(0, "<image>\nWhat is shown?"), (1, "A chest x-ray."), (0, "Is it normal?"), (1, "No.")])
    assert prompt == (system + " USER: <image>\nWhat is shown? ASSISTANT: A chest x-ray.</s>"
                      "USER: Is it normal? ASSISTANT: No.</s>")


@pytest.mark.parametrize("name,system", [("v1", VICUNA), ("llava_v1", LLAVA), ("v1_sq", SQ)])
def test_generation_slot_has_no_trailing_space(name, system):
    prompt = render(name, [(0, "<image>\nWhat is shown?"), (1, None)])
    assert prompt == system + " USER: <image>\nWhat is shown? ASSISTANT:"
    assert render(name, [(0, "Q"), (1, "")]) == system + " USER: Q ASSISTANT:"


def test_spec_self_questioning_example():
    # docs/Method.md#self-questioning: `SYS USER: <image>\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>`
    prompt = render("v1_sq", [(0, "<image>\nQ1"), (1, "A1"), (2, "Q2</s>"), (1, "A2")])
    assert prompt == SQ + " USER: <image>\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>"


def test_vuser_generation_slot_for_question_sampling():
    # Stage 2 (docs/Method.md#questions): [USER: prompt, ASSISTANT: description, VUSER:] — the model writes a question.
    prompt = render("v1_sq", [(0, "<image>\nCan you describe the image in detail?"), (1, "A CT."), (2, None)])
    assert prompt == SQ + " USER: <image>\nCan you describe the image in detail? ASSISTANT: A CT.</s>VUSER:"


def test_image_token_moved_to_front_of_first_message():
    prompt = render("v1", [(0, "What is shown?\n<image>"), (1, "A CT.")])
    assert prompt == VICUNA + " USER: <image>\nWhat is shown? ASSISTANT: A CT.</s>"


def test_plain_template():
    # system "", separators "" and "\n", text only.
    assert render("plain", [(0, "<image>"), (1, "A chest x-ray.")]) == "<image>\nA chest x-ray.\n"
    assert render("plain", [(0, "Caption: <image>"), (1, "Brain MRI.")]) == "<image>\nCaption:Brain MRI.\n"
    assert render("plain", [(0, "<image>"), (1, None)]) == "<image>\n"


def test_templates_are_independent_copies():
    a = get_conv_template("v1")
    a.append_message("USER", "hi")
    assert get_conv_template("v1").messages == []
    assert conv_templates["v1"].messages == []


def test_unknown_template_lists_choices():
    with pytest.raises(ValueError) as err:
        get_conv_template("llava_v2")
    msg = str(err.value)
    assert "llava_v2" in msg
    for choice in ("v1", "vicuna_v1", "llava_v1", "v1_sq", "plain"):
        assert repr(choice) in msg


def test_unknown_role_is_refused():
    conv = get_conv_template("v1")
    with pytest.raises(ValueError, match="VUSER"):
        conv.append_message("VUSER", "a question")
