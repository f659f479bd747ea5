"""Every command of eval, selftrain, serve.cli and data.verify: `python -m ...` program names and a
help text for every flag; the generating tools share one skeleton of flags."""
import argparse
import importlib
import subprocess
import sys

import pytest

CLIS = ["stllava.eval.convert", "stllava.eval.metrics", "stllava.eval.report", "stllava.eval.model_vqa",
        "stllava.selftrain.questions", "stllava.selftrain.answers", "stllava.selftrain.judge",
        "stllava.selftrain.build_pairs", "stllava.serve.cli", "stllava.data.verify"]


@pytest.mark.parametrize("module", CLIS)
def test_prog_name_and_a_help_text_for_every_flag(module):
    parser = importlib.import_module(module).build_parser()
    assert parser.prog == f"python -m {module}"
    undocumented = [a.option_strings or a.dest for a in parser._actions
                    if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
                    and not (a.help or "").strip()]
    assert undocumented == []


def test_help_runs_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "stllava.selftrain.answers", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m stllava.selftrain.answers ")


@pytest.mark.parametrize("module", CLIS)
def test_a_bad_flag_exits_2_without_a_traceback(module, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--no-such-flag"])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
