"""stllava.tooling: the flags, template choice, chunking and resume shared by the generating tools."""
import argparse
import json
import logging

import pytest

from stllava.eval import model_vqa
from stllava.selftrain import answers, questions
from stllava.tooling import (
    ToolError,
    chunk_of,
    read_done,
    resolve_conv_mode,
    settle_conv_mode,
    split_list,
)

PARSERS = {"model_vqa": model_vqa.build_parser, "questions": questions.build_parser, "answers": answers.build_parser}
REQUIRED = {"model_vqa": ["--question-file", "q", "--answers-file", "a"],
            "questions": ["--image-folder", "i", "--out", "o"],
            "answers": ["--questions", "q", "--image-folder", "i", "--out", "o"]}


def test_split_list_and_chunk_of_follow_llava():
    ten = list(range(10))
    assert [len(c) for c in split_list(ten, 4)] == [3, 3, 3, 1]  # ceil(10/4) = 3 per chunk
    assert sum(split_list(ten, 4), []) == ten
    assert split_list(list(range(5)), 4) == [[0, 1], [2, 3], [4]]  # only 3 chunks exist
    assert chunk_of(list(range(5)), 4, 3) == []  # LLaVA raised IndexError here
    assert chunk_of(ten, 1, 0) == ten
    for n in range(1, 12):  # every n: the chunks, in order, are the items exactly once
        assert sum((chunk_of(ten, n, k) for k in range(n)), []) == ten
    for n, k in ((2, 2), (2, -1), (0, 0)):
        with pytest.raises(ToolError, match="--chunk-idx must be in"):
            chunk_of(ten, n, k)


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_one_bad_input_flag_spelled_the_same_with_hidden_old_names(tool):
    parser = PARSERS[tool]()
    base = ["--model-path", "m", *REQUIRED[tool]]
    assert parser.parse_args(base).skip_bad is False
    for flag in ("--skip-bad", "--skip-missing-images", "--skip-bad-images"):
        assert parser.parse_args(base + [flag]).skip_bad is True, flag
    text = parser.format_help()
    assert "--skip-bad " in text and "--skip-missing-images" not in text and "--skip-bad-images" not in text
    for flag in ("--num-chunks", "--chunk-idx", "--overwrite", "--conv-mode", "--batch-size", "--seed"):
        assert flag in text  # the shared skeleton's flags, in every tool
    assert parser.parse_args(base).conv_mode is None  # decided later: flag, checkpoint, tool default


def _checkpoint(tmp_path, config, name="ckpt"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(folder)


def test_template_is_the_flag_else_the_recorded_one_else_the_default(tmp_path, caplog):
    recorded = _checkpoint(tmp_path, {"model_type": "llava_llama", "conv_mode": "v1_sq"}, "recorded")
    assert resolve_conv_mode("llava_v1", recorded, "vicuna_v1") == ("llava_v1", "from --conv-mode")
    assert resolve_conv_mode(None, recorded, "vicuna_v1") == ("v1_sq", f"recorded in {recorded}/config.json")
    assert resolve_conv_mode(None, str(tmp_path / "absent"), "vicuna_v1")[0] == "vicuna_v1"
    plain = _checkpoint(tmp_path, {"model_type": "llava_llama"}, "plain")
    mode, why = resolve_conv_mode(None, plain, "llava_v1")
    assert mode == "llava_v1" and "records no conv_mode" in why
    broken = _checkpoint(tmp_path, "{not json", "broken")  # the loader reports that; here: the default
    assert resolve_conv_mode(None, broken, "v1")[0] == "v1"
    with pytest.raises(ToolError, match=r"unknown conversation template 'v9' \(from --conv-mode\)"):
        resolve_conv_mode("v9", plain, "v1")
    bad = _checkpoint(tmp_path, {"conv_mode": "v9"}, "bad")
    with pytest.raises(ToolError, match=r"'v9' \(from .*bad/config.json\).*fix: pass --conv-mode"):
        resolve_conv_mode(None, bad, "v1")
    args = argparse.Namespace(conv_mode=None, model_path=recorded)
    with caplog.at_level(logging.INFO, logger="stllava.tooling"):
        assert settle_conv_mode(args, "vicuna_v1") == "v1_sq" == args.conv_mode
    assert f"conversation template v1_sq (recorded in {recorded}/config.json)" in caplog.text


def test_read_done_checks_settings_and_overwrite_starts_over(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    assert read_done(out, "id", {"seed": 0}) == set()
    rows = [{"id": 1, "settings": {"seed": 0, "conv_mode": "v1"}}, {"id": 2, "settings": {"seed": 0, "conv_mode": "v1"}}]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": 3, "sett')  # + a line cut by a kill
    assert read_done(out, "id", {"seed": 0, "conv_mode": "v1"}) == {"1", "2"}
    with pytest.raises(ToolError, match=r"out.jsonl, line 1: written with settings \{'conv_mode': 'v1'\}, this run "
                                        r"has \{'conv_mode': 'v1_sq'\}; fix: .*pass --overwrite"):
        read_done(out, "id", {"seed": 0, "conv_mode": "v1_sq"})
    old = tmp_path / "old.jsonl"  # written before records carried their settings
    old.write_text('{"id": 1}\n')
    with pytest.raises(ToolError, match=r"line 1: written with settings None"):
        read_done(old, "id", {"seed": 0})
    with caplog.at_level(logging.WARNING, logger="stllava.tooling"):
        assert read_done(out, "id", {"seed": 1}, overwrite=True) == set()
    assert not out.exists() and "--overwrite: starting" in caplog.text
    out.write_text('{"id": 1, "settings": {}}\nnot json\n{"id": 2, "settings": {}}\n')
    with pytest.raises(ToolError, match=r"line 2: not valid JSON.*cannot resume"):
        read_done(out, "id", {})
