"""The demo's and the study's command lines, built from each stage's own flags.

Every stage the loop runs is a module with a ``build_parser()`` (the generating tools, evaluation,
the merge; the two training entry points return their HfArgumentParser over the dataclasses of
``stllava.train.arguments``). :func:`cmd` asks that parser for each value's option
(``stllava.cli_args.argv``), so a flag renamed in a stage fails here, when the command is built.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

from stllava.cli_args import argv
from stllava.demo.runner import py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The stages the demo and the study run (tests/demo/test_commands.py parses each command back).
STAGES = ("stllava.train.train_sft", "stllava.train.train_dpo", "stllava.selftrain.questions",
          "stllava.selftrain.answers", "stllava.selftrain.judge", "stllava.selftrain.build_pairs",
          "stllava.eval.model_vqa", "stllava.eval.metrics", "stllava.eval.convert", "stllava.model.merge")


@functools.cache
def stage_parser(module: str) -> argparse.ArgumentParser:
    """The parser ``python -m module`` parses its flags with: the module's ``build_parser()``."""
    return importlib.import_module(module).build_parser()


def cmd(module: str, **values) -> list[str]:
    """``[python, -m, module, *flags]`` giving ``values`` (keyword = the flag's destination in the
    stage's parser; None = left out). Raises ``stllava.cli_args.ArgvError`` for a name the stage
    has no flag for."""
    return py(module, *argv(stage_parser(module), **values))


def train_cmd(module: str, procs: int, **values) -> list[str]:
    """A training entry point's command: :func:`cmd` for one process; for ``procs`` > 1, the entry
    point's script under ``torch.distributed.run`` (one machine, ``procs`` processes) with
    ``--deepspeed scripts/zero3.json`` (DeepSpeed ZeRO-3; gloo on CPU)."""
    if procs <= 1:
        return cmd(module, **values)
    # the launcher's own flags, spelled as scripts/launch_common.sh spells them
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    script = os.path.join(REPO, *module.split(".")) + ".py"
    return [*launcher, script, *argv(stage_parser(module), deepspeed=os.path.join(REPO, "scripts", "zero3.json"),
                                     **values)]
