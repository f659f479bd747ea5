"""``python -m stllava.serve.cli``: the chat demo, driven in a real terminal (pexpect) and in-process."""
import json
import logging
import os
import pathlib
import shutil
import sys

import pytest
from checkpoint_factory import ASSET_IMAGE

from stllava.constants import IMAGE_TOKEN_INDEX
from stllava.mm_utils import tokenizer_image_token
from stllava.serve import cli

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_chat_in_a_real_terminal(tiny_bundle):
    """Start, ask, streamed answer, a second turn, exit on an empty line — in a pseudo-terminal."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    child = pexpect.spawn(sys.executable, ["-m", "stllava.serve.cli", "--model-path", tiny_bundle["model"],
                                           "--image-file", ASSET_IMAGE, "--device", "cpu", "--temperature", "0",
                                           "--max-new-tokens", "8"],
                          cwd=str(REPO), env=env, encoding="utf-8", codec_errors="replace", timeout=120)
    try:
        child.expect(r"\| v1 \| cpu\] empty line or Ctrl-D to quit")
        answers = []
        for question in ("What is shown in the image?", "Is it normal?"):
            child.expect_exact("USER: ")
            child.sendline(question)
            child.expect_exact(question)  # the terminal echoes the line
            child.expect_exact("ASSISTANT: ")
            child.expect(r"\r\n(?=USER: )")
            answers.append(child.before)
        child.expect_exact("USER: ")
        child.sendline("")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert all(a.strip() for a in answers), answers


def test_session_streams_the_greedy_answer_and_keeps_one_image(pretrained):
    from PIL import Image

    tok, model, proc, _ = pretrained
    session = cli.ChatSession(model, tok, proc, Image.open(ASSET_IMAGE), "v1", temperature=0.0, max_new_tokens=12)
    pieces = []
    answer = session.ask("What is shown in the image?", pieces.append)
    # Same text as one non-streamed greedy generation of the same prompt.
    conv = cli.get_conv_template("v1")
    conv.append_message("USER", "<image>\nWhat is shown in the image?")
    conv.append_message("ASSISTANT", None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, return_tensors="pt")[None]
    out = model.generate(ids, images=session.pixels, max_new_tokens=12, do_sample=False)
    assert answer == tok.decode(out[0], skip_special_tokens=True).strip()
    assert len(pieces) >= 2 and "".join(pieces).strip() == answer  # delivered piece by piece

    session.ask("And the size?", None)
    prompt = session.conv.get_prompt()
    assert prompt.count("<image>") == 1 and f"ASSISTANT: {answer}</s>USER: And the size? ASSISTANT: " in prompt
    ids2 = tokenizer_image_token(prompt, tok)
    assert ids2.count(IMAGE_TOKEN_INDEX) == 1


def _run(argv, lines, caplog=None):
    feed = iter(lines)
    written = []

    def read(prompt):
        written.append(prompt)
        value = next(feed)
        if isinstance(value, BaseException):
            raise value
        return value

    status = cli.main(argv, read=read, write=written.append)
    return status, "".join(written)


def test_main_multi_turn_then_eof(tiny_bundle, caplog):
    argv = ["--model-path", tiny_bundle["model"], "--image-file", ASSET_IMAGE, "--device", "cpu",
            "--max-new-tokens", "4", "--conv-mode", "llava_v1", "--debug"]
    with caplog.at_level(logging.INFO, logger="stllava.serve.cli"):
        status, out = _run(argv, ["first", "second", EOFError()])
    assert status == 0
    assert out.count("USER: ") == 3 and out.count("ASSISTANT: ") == 2
    assert "curious human" in caplog.text  # --conv-mode llava_v1 overrides the inferred v1
    status, out = _run(argv, [""])
    assert status == 0 and "ASSISTANT: " not in out  # an empty line ends the chat at once


def test_conv_mode_inference(tiny_bundle, tmp_path):
    assert cli.infer_conv_mode(tiny_bundle["model"])[0] == "v1"
    for name, mtype, expected in (("stllava-med-7b", "llava", "v1"), ("sqllava-7b-lora", "llava", "v1"),
                                  ("llava-v1.5-7b", "llava", "llava_v1"), ("my-model", "llava", "v1")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": mtype, "mm_vision_tower": "x"}))
        assert cli.infer_conv_mode(str(d))[0] == expected, name
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "mm_projector.bin").write_bytes(b"")
    assert cli.infer_conv_mode(str(tmp_path / "proj"))[0] == "plain"
    # what training records wins over every name rule
    d = tmp_path / "llava-v1.5-recorded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "conv_mode": "v1_sq"}))
    assert cli.infer_conv_mode(str(d)) == ("v1_sq", f"recorded in {d / 'config.json'}")
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "conv_mode": "v9"}))
    with pytest.raises(cli.ChatInputError, match="records conv_mode 'v9'.*--conv-mode"):
        cli.infer_conv_mode(str(d))


def test_chat_uses_the_template_the_checkpoint_records(tiny_bundle, tmp_path, caplog):
    ckpt = tmp_path / "recorded"
    shutil.copytree(tiny_bundle["model"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "conv_mode": "v1_sq"}))
    argv = ["--model-path", str(ckpt), "--image-file", ASSET_IMAGE, "--device", "cpu", "--max-new-tokens", "4",
            "--debug"]
    with caplog.at_level(logging.INFO, logger="stllava.serve.cli"):
        status, out = _run(argv, ["hi", EOFError()])
    assert status == 0
    assert f"template v1_sq (recorded in {ckpt / 'config.json'})" in out and "| v1_sq | cpu]" in out
    assert "Again, do not ask about uncertain details" in caplog.text  # v1_sq's system prompt was used


@pytest.mark.parametrize("extra,needle,status_want", [
    (["--image-file", "https://example.org/x.png"], "--allow-url", 2),    # bad input
    (["--image-file", "/nonexistent/x.png"], "does not exist", 2),
    (["--image-file", ASSET_IMAGE, "--load-8bit"], "bitsandbytes", 1),    # this machine cannot run it
])
def test_main_errors(extra, needle, status_want, tiny_bundle, capsys):
    import importlib.util

    if "--load-8bit" in extra and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    status = cli.main(["--model-path", tiny_bundle["model"], "--device", "cpu"] + extra,
                      read=lambda p: pytest.fail("must not read"), write=lambda s: None)
    err = capsys.readouterr().err
    assert status == status_want and needle in err and err.startswith("error: ") and "Traceback" not in err


def test_main_reports_a_bad_checkpoint(tmp_path, capsys):
    status = cli.main(["--model-path", str(tmp_path), "--image-file", ASSET_IMAGE, "--device", "cpu"],
                      read=lambda p: pytest.fail("must not read"), write=lambda s: None)
    err = capsys.readouterr().err
    assert status == 2 and "no checkpoint layout recognised" in err and len(err.strip().splitlines()) == 1


# --- bad input: one line, never a traceback (issue 14 §4) ----------------------------------------
def _one_line_error(capsys, argv, lines=()):
    feed = iter(lines)
    status = cli.main(argv, read=lambda p: next(feed), write=lambda s: None)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return status, err


def _broken_checkpoint(tiny_bundle, tmp_path, kind):
    """A copy of the tiny checkpoint with one broken file; returns (folder, the file)."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / kind
    shutil.copytree(tiny_bundle["model"], folder, ignore=shutil.ignore_patterns("llm", "vision_tower"))
    weights = folder / "model.safetensors"
    if kind == "pickle":
        state = load_file(weights)
        weights.unlink()
        target = folder / "pytorch_model.bin"
        torch.save({**state, "x": _Exec(tmp_path / "PWNED")}, target)
    elif kind == "cut-safetensors":
        target = weights
        target.write_bytes(weights.read_bytes()[:5000])
    elif kind == "cut-bin":
        state = load_file(weights)
        weights.unlink()
        target = folder / "pytorch_model.bin"
        torch.save(state, target)
        target.write_bytes(target.read_bytes()[:3000])
    else:
        target = folder / "config.json"
        target.write_text(target.read_text()[:30])
    return folder, target


class _Exec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind,needle", [
    ("pickle", "is not a plain tensor checkpoint and was refused"),
    ("cut-safetensors", ": this weight file cannot be read"),
    ("cut-bin", ": this weight file cannot be read"),
    ("bad-config", ": this JSON file cannot be read (not valid JSON"),
])
def test_a_broken_checkpoint_file_is_one_line_naming_it(tiny_bundle, tmp_path, capsys, kind, needle):
    folder, target = _broken_checkpoint(tiny_bundle, tmp_path, kind)
    status, err = _one_line_error(capsys, ["--model-path", str(folder), "--image-file", ASSET_IMAGE, "--device", "cpu"])
    assert status == 2 and err.startswith(f"error: {target}") and needle in err
    assert not (tmp_path / "PWNED").exists()


def test_a_bad_image_is_one_line(tiny_bundle, tmp_path, capsys):
    from bad_files import write_bomb_png

    bomb = tmp_path / "bomb.png"
    write_bomb_png(bomb)
    status, err = _one_line_error(capsys, ["--model-path", tiny_bundle["model"], "--image-file", str(bomb),
                                           "--device", "cpu"])
    assert status == 2 and err == (f"error: --image-file {bomb}: image too large (225,000,000 pixels, over the "
                                   "limit of 89,478,485; set STLLAVA_MAX_IMAGE_PIXELS to accept larger images)\n")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(open(ASSET_IMAGE, "rb").read()[:2000])
    status, err = _one_line_error(capsys, ["--model-path", tiny_bundle["model"], "--image-file", str(cut),
                                           "--device", "cpu"])
    assert status == 2 and err.startswith(f"error: --image-file {cut}: truncated image (")


def test_a_16_bit_image_is_scaled_for_the_chat(tmp_path):
    import numpy as np
    from bad_files import write_png16

    path = tmp_path / "ct16.png"
    write_png16(path)
    assert abs(np.asarray(cli.load_image(str(path))).mean() - 127.5) < 0.6  # not ~254.5 (almost white)


def _positions(session, text):
    ids = tokenizer_image_token(session.conv.get_prompt() if text is None else text, session.tokenizer)
    return len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (session.image_positions - 1)


def test_a_question_past_the_context_is_refused_and_the_chat_goes_on(pretrained):
    """It was accepted silently, and every later answer of the conversation degraded."""
    from PIL import Image

    tok, model, proc, context_len = pretrained
    assert context_len == 1024 and cli.context_length(model) == 1024
    session = cli.ChatSession(model, tok, proc, Image.open(ASSET_IMAGE), "v1", temperature=0.0, max_new_tokens=6)
    assert session.image_positions == 64  # the tiny tower: (112 / 14)^2 patches
    long_question = "Describe the lung fields. " * 200
    conv = cli.get_conv_template("v1")
    conv.append_message("USER", "<image>\n" + long_question)
    conv.append_message("ASSISTANT", None)
    expected = _positions(session, conv.get_prompt())
    with pytest.raises(cli.PromptTooLongError) as e:
        session.ask(long_question)
    assert str(e.value).startswith(f"this question makes the prompt {expected} positions (64 of them the image, "
                                   f"{expected - 64} text tokens of the conversation so far and the question), over "
                                   "the model's context length of 1024; ask a shorter question")
    assert session.conv.messages == [] and session.first  # nothing of the refused turn stays
    fresh = cli.ChatSession(model, tok, proc, Image.open(ASSET_IMAGE), "v1", temperature=0.0, max_new_tokens=6)
    assert session.ask("What is shown?") == fresh.ask("What is shown?")  # the chat goes on, unharmed
    assert session.conv.get_prompt() == fresh.conv.get_prompt()


def test_an_answer_never_runs_past_the_context(pretrained, caplog):
    from PIL import Image

    tok, model, proc, _ = pretrained
    probe = cli.ChatSession(model, tok, proc, Image.open(ASSET_IMAGE), "v1", temperature=0.0, max_new_tokens=12)
    _, ids, positions = probe.add_question("What is shown?")
    session = cli.ChatSession(model, tok, proc, Image.open(ASSET_IMAGE), "v1", temperature=0.0, max_new_tokens=12,
                              context_len=positions + 3)
    with caplog.at_level(logging.WARNING, logger="stllava.serve.cli"):
        answer = session.ask("What is shown?")
    assert f"answer limited to 3 new tokens: the prompt takes {positions} of the {positions + 3}" in caplog.text
    assert len(tok(answer, add_special_tokens=False).input_ids) <= 3


def test_main_refuses_a_long_question_in_one_line_and_goes_on(tiny_bundle):
    argv = ["--model-path", tiny_bundle["model"], "--image-file", ASSET_IMAGE, "--device", "cpu",
            "--max-new-tokens", "4", "--temperature", "0"]
    status, out = _run(argv, ["lung " * 1500, "What is shown?", EOFError()])
    assert status == 0
    refusal = [line for line in out.splitlines() if "error: " in line]
    assert len(refusal) == 1 and refusal[0].startswith("USER: error: this question makes the prompt ")
    assert refusal[0].endswith("over the model's context length of 1024; ask a shorter question, or start a new chat "
                               "to drop the earlier turns")
    assert out.count("ASSISTANT: ") == 1  # the refused question got no answer; the next one did
