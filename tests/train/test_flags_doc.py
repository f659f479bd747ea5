"""docs/Flags.md is the table generated from the argument dataclasses, and the published launch
scripts' flags are all flags of the entry point they start."""
import os
import re
import runpy
import sys

import pytest

from stllava.train import arguments

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGENERATE = "python -m stllava.train.arguments --markdown > docs/Flags.md"


def test_flags_doc_is_the_generated_table():
    with open(os.path.join(REPO, "docs", "Flags.md"), encoding="utf-8") as f:
        assert f.read() == arguments.flags_markdown(), f"docs/Flags.md is stale: run {REGENERATE}"


def test_the_table_has_a_row_per_declared_flag_with_each_entry_points_default():
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:4]]
            for line in arguments.flags_markdown().splitlines() if line.startswith("| `--")}
    # the first action of a destination: --no_<flag> (store_false) comes after the flag it negates
    sft, dpo = ({a.dest: a.default for a in reversed(arguments.LlavaArgumentParser(types, "p")._actions)}
                for types in (arguments.SFT_ARGUMENTS, arguments.DPO_ARGUMENTS))
    assert rows["--version"] == ["`v1_sq`", "`v1`"] and rows["--lora_dropout_vit"] == ["`0.2`", "`0.1`"]
    assert rows["--dpo_beta"] == ["—", "`0.1`"] and rows["--model_base"] == ["—", "(none)"]
    declared = set()
    for cls in (*arguments.SFT_ARGUMENTS, *arguments.DPO_ARGUMENTS):
        for klass in cls.__mro__:
            if klass.__module__ == arguments.__name__:
                declared |= set(klass.__annotations__)
    assert set(rows) == {f"--{n}" for n in declared}
    for flag, (in_sft, in_dpo) in rows.items():  # a default shown is the parser's default
        for parsed, cell in ((sft, in_sft), (dpo, in_dpo)):
            name = flag[2:]
            assert (cell == "—") == (name not in parsed), flag
            if cell not in ("—", "(none)"):
                assert cell == f"`{parsed[name]}`", flag


def test_markdown_command_prints_the_table(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["arguments", "--markdown"])
    runpy.run_module("stllava.train.arguments", run_name="__main__")
    assert capsys.readouterr().out == arguments.flags_markdown()


@pytest.mark.parametrize("script, types", [("sqllava_med.sh", arguments.SFT_ARGUMENTS),
                                           ("dpo_finetune.sh", arguments.DPO_ARGUMENTS)])
def test_every_flag_of_the_published_scripts_is_a_flag_of_its_entry_point(script, types):
    with open(os.path.join(REPO, script)) as f:
        code = "\n".join(line for line in f if not line.lstrip().startswith("#"))
    passed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*)", code))
    known = {s for a in arguments.LlavaArgumentParser(types, "p")._actions for s in a.option_strings}
    assert len(passed) > 40 and passed <= known, passed - known
