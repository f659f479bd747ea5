"""One logging setup (stllava.logs): one format, rank-aware levels, --log-level refusing a bad
value with a usage error, and no other logging.basicConfig in the package or the scripts."""
import argparse
import ast
import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from stllava import logs

REPO = pathlib.Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: .*$")


def _log(code: str, **env) -> list[str]:
    """stderr lines of a fresh interpreter that runs ``code`` (a root logger with no handler yet,
    which pytest's own capture would otherwise be)."""
    clean = {k: v for k, v in os.environ.items() if k not in logs.RANK_VARIABLES}
    proc = subprocess.run([sys.executable, "-c", "import logging\nfrom stllava import logs\n" + code],
                          capture_output=True, text=True, env={**clean, "PYTHONPATH": str(REPO), **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


EMIT = ("log = logging.getLogger('stllava.x')\n"
        "log.debug('d'); log.info('i'); log.warning('w'); log.error('e')\n")


def test_one_format_at_the_level_asked():
    lines = _log("logs.setup('INFO')\n" + EMIT)
    assert [ln.split(" ", 2)[2] for ln in lines] == ["INFO stllava.x: i", "WARNING stllava.x: w", "ERROR stllava.x: e"]
    assert all(LINE.match(ln) for ln in lines)
    assert len(_log("logs.setup('debug')\n" + EMIT)) == 4  # any case
    assert len(_log("logs.setup('ERROR')\n" + EMIT)) == 1


def test_ranks_other_than_0_log_warnings_only_unless_asked():
    assert len(_log("logs.setup('INFO')\n" + EMIT, RANK="0")) == 3
    assert len(_log("logs.setup('INFO')\n" + EMIT, RANK="1")) == 2  # warning and error
    assert len(_log("logs.setup('INFO')\n" + EMIT, LOCAL_RANK="3")) == 2
    assert len(_log("logs.setup('DEBUG', all_ranks=True)\n" + EMIT, RANK="1")) == 4
    assert len(_log("logs.setup('INFO', rank=0)\n" + EMIT, RANK="1")) == 3  # the argument wins
    assert len(_log("logs.setup('INFO', rank=2)\n" + EMIT)) == 2


def test_process_rank(monkeypatch):
    for name in logs.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert logs.process_rank() is None and logs.process_rank(4) == 4
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert logs.process_rank() == 2
    monkeypatch.setenv("RANK", "5")
    assert logs.process_rank() == 5  # the global rank first


def test_an_unknown_level_name_is_refused():
    with pytest.raises(ValueError, match="TRACE"):
        logs.setup("TRACE")


def test_log_level_flag_refuses_trace_with_a_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    logs.add_log_level_arg(parser, default="WARNING")
    assert parser.parse_args([]).log_level == "WARNING"
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--log-level", "TRACE"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'TRACE'" in err and "Traceback" not in err


def test_a_command_refuses_trace_in_one_usage_line():
    proc = subprocess.run([sys.executable, "-m", "stllava.eval.metrics", "--gt", "g", "--pred", "p",
                           "--log-level", "TRACE"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "invalid choice: 'TRACE'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["stllava.eval.convert", "stllava.eval.metrics", "stllava.eval.report",
                                    "stllava.eval.model_vqa", "stllava.selftrain.questions",
                                    "stllava.selftrain.answers", "stllava.selftrain.judge",
                                    "stllava.selftrain.build_pairs", "stllava.serve.cli", "stllava.serve.api",
                                    "stllava.data.verify", "stllava.model.merge"])
def test_every_command_takes_log_level(module):
    parser = importlib.import_module(module).build_parser()
    assert any("--log-level" in a.option_strings for a in parser._actions)


def _basic_config_calls(path: pathlib.Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "basicConfig"
            or isinstance(node, ast.alias) and node.name == "basicConfig"]


def test_only_stllava_logs_calls_basic_config():
    found = {str(p.relative_to(REPO)): lines for folder in ("stllava", "scripts")
             for p in sorted((REPO / folder).rglob("*.py")) if (lines := _basic_config_calls(p))}
    assert list(found) == ["stllava/logs.py"], found
