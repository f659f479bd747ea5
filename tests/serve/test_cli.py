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
from stllava.model.builder import load_pretrained_model
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


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    return load_pretrained_model(tiny_bundle["model"], device="cpu")


def test_session_streams_the_greedy_answer_and_keeps_one_image(loaded):
    from PIL import Image

    tok, model, proc, _ = loaded
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
