"""The demo's commands are built from each stage's own parser: every value parses back to itself,
an unknown flag name fails when the command is built, and the commands equal the ones the demo ran
before they were built this way (tests/demo/golden_commands.json; order of flags aside)."""
import json
import os
from collections import Counter

import pytest
from command_recorder import RecordingRunner, portable, record, scenarios

from stllava.cli_args import ArgvError
from stllava.demo import commands, steps

HERE = os.path.dirname(os.path.abspath(__file__))
# The two flags whose spelling changed, not their value: a bare HfArgumentParser boolean is now
# written with its value, and 0. (a literal of the old command) is str(0.0).
RESPELLED = {("--vit_lora_enable", ()): ("--vit_lora_enable", ("True",)),
             ("--weight_decay", ("0.",)): ("--weight_decay", ("0.0",))}


def _split(cmd: list[str]) -> tuple[list[str], Counter]:
    """(the program: interpreter, -m, module, or the launcher up to the script; its flags as a
    multiset of (flag, values)). Positional values before the first flag count under flag ''."""
    cut = next((i + 1 for i, t in enumerate(cmd) if t.endswith(".py")), 3)
    flags, current, values = Counter(), "", []
    for token in cmd[cut:] + ["--"]:
        if token.startswith("--"):
            if current or values:
                flags[RESPELLED.get((current, tuple(values)), (current, tuple(values)))] += 1
            current, values = token, []
        else:
            values.append(token)
    return cmd[:cut], flags


@pytest.mark.parametrize("name", list(scenarios()))
def test_commands_equal_the_golden_ones_as_multisets_of_flag_and_values(name, tmp_path):
    with open(os.path.join(HERE, "golden_commands.json")) as f:
        golden = json.load(f)[name]
    new = portable(record(name, str(tmp_path)), str(tmp_path), commands.REPO)
    assert [c[0] for c in new] == [c[0] for c in golden]  # the same steps, in the same order
    for (log, cmd, env), (_, old_cmd, old_env) in zip(new, golden):
        assert env == old_env, log
        (prog, flags), (old_prog, old_flags) = _split(cmd), _split(old_cmd)
        assert prog == old_prog, log
        assert (flags - old_flags, old_flags - flags) == (Counter(), Counter()), f"{log}: (added, removed)"


def _built(monkeypatch, tmp_path, name):
    """Scenario ``name``'s commands with what built them: [(parser, values, argv)]."""
    built = []

    def recording_argv(parser, **values):
        out = real(parser, **values)
        built.append((parser, values, out))
        return out

    real = commands.argv
    monkeypatch.setattr(commands, "argv", recording_argv)
    record(name, str(tmp_path))
    return built


@pytest.mark.parametrize("name", list(scenarios()))
def test_every_value_parses_back_through_the_stages_own_parser(name, monkeypatch, tmp_path):
    built = _built(monkeypatch, tmp_path, name)
    progs = {parser.prog for parser, _, _ in built}
    assert progs == {commands.stage_parser(m).prog for m in commands.STAGES}  # every stage, each step
    for parser, values, argv in built:
        namespace = parser.parse_args(argv)
        for dest, value in values.items():
            assert getattr(namespace, dest) == (parser.get_default(dest) if value is None else value), \
                (parser.prog, dest)
        if hasattr(parser, "parse_args_into_dataclasses"):  # a training entry point: its dataclasses accept it
            parsed = parser.parse_args_into_dataclasses(args=argv)
            fields = {k: v for dc in parsed for k, v in vars(dc).items()}
            for dest, value in values.items():
                if value is not None and dest != "report_to":  # "none" becomes [] in TrainingArguments
                    assert fields[dest] == value, (parser.prog, dest)


def test_conditional_flags_follow_the_settings(monkeypatch, tmp_path):
    flags = {}
    for name in ("demo", "paper_2procs_no_heldout"):
        cmds = record(name, str(tmp_path / name))
        flags[name] = {log: set(t for t in cmd if t.startswith("--")) for log, cmd, _ in cmds}
    demo, paper = flags["demo"], flags["paper_2procs_no_heldout"]
    assert "--n-answers" in demo["answers"] and "--n-answers" not in paper["answers"]  # 4 vs the default 2
    assert "--max-per-question" in demo["pairs"] and "--max-per-question" not in paper["pairs"]
    assert "--eval_data_path" in demo["dpo"] and "--eval_data_path" not in paper["dpo"]  # no held-out pairs
    assert "--deepspeed" in paper["sft"] and "--deepspeed" not in demo["sft"]


def test_an_unknown_flag_name_fails_when_the_command_is_built():
    with pytest.raises(ArgvError, match="n_answer"):
        commands.cmd("stllava.selftrain.answers", model_path="m", n_answer=4)
    with pytest.raises(ArgvError, match="dpo_betta"):
        commands.cmd("stllava.train.train_dpo", model_name_or_path="m", dpo_betta=0.1)
    with pytest.raises(ArgvError, match="dpo_beta"):  # a DPO flag is no SFT flag
        commands.train_cmd("stllava.train.train_sft", 1, dpo_beta=0.1)


def test_a_flag_renamed_in_a_stage_breaks_the_step_before_it_runs(monkeypatch, tmp_path):
    import stllava.selftrain.questions as questions

    real = questions.build_parser

    def renamed():
        parser = real()
        action = next(a for a in parser._actions if a.dest == "n_questions")
        action.dest, action.option_strings = "questions_per_image", ["--questions-per-image"]
        return parser

    commands.stage_parser.cache_clear()
    monkeypatch.setattr(questions, "build_parser", renamed)
    try:
        r = RecordingRunner(str(tmp_path))
        with pytest.raises(ArgvError, match="n_questions"):
            steps.questions(r, str(tmp_path / "q"), "model", "images", steps.LoopSettings(), 0)
        assert r.commands == []
    finally:
        commands.stage_parser.cache_clear()
