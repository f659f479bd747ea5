"""Command lines built from a command's own parser: ``argv(parser, **values)``.

A pipeline that runs the project's commands (the demo and the study, ``stllava.demo.commands``)
names each value by its *destination* in the command's parser (``model_path``, ``n_answers``,
``lora_enable``), never by a flag string. The option string, and how a value is written, come from
the parser the command itself parses with, so a flag renamed in a command fails where the command
line is built (:class:`ArgvError`), not when the command runs.

Works for argparse parsers and for ``transformers.HfArgumentParser`` (itself an argparse parser,
whose destinations are the dataclass field names).
"""
from __future__ import annotations

import argparse
import difflib
from typing import Any

from stllava.errors import StllavaError


class ArgvError(StllavaError, ValueError):
    """A value the command's parser has no destination for, or cannot take (the message names both)."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Destination -> its first action (``--skip-bad`` before its old alias ``--skip-missing-images``,
    an HfArgumentParser ``--flag`` before the ``--no_flag`` that negates it)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        found.setdefault(action.dest, action)
    return found


def _check_choice(action: argparse.Action, text: str, prog: str) -> None:
    if action.choices is None:
        return
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        value = text
    if value not in action.choices:
        raise ArgvError(f"{prog}: {text!r} is not a choice of {action.option_strings or action.dest} "
                        f"({', '.join(map(str, action.choices))})")


def _render(action: argparse.Action, dest: str, value: Any, prog: str) -> list[str]:
    """The tokens of one value (without the option string); refuses what the action cannot take."""
    if action.nargs == 0:  # store_true / store_false / store_const: the flag alone, or nothing
        if value == action.const:
            return []
        raise ArgvError(f"{prog}: {action.option_strings[0]} takes no value; pass {dest}={action.const!r} "
                        f"to give it, or leave {dest} out")
    many = action.nargs in ("+", "*", argparse.REMAINDER) or isinstance(action.nargs, int) and action.nargs > 1
    if isinstance(value, (list, tuple)):
        if not many:
            raise ArgvError(f"{prog}: {action.option_strings or dest} takes one value, got {list(value)!r}")
        tokens = [str(v) for v in value]
    else:
        tokens = [str(value)]  # str(): bools as True/False (HfArgumentParser's string_to_bool reads them)
    for text in tokens:
        _check_choice(action, text, prog)
    return tokens


def argv(parser: argparse.ArgumentParser, **values: Any) -> list[str]:
    """The argument list that gives ``values`` (keyword = destination in ``parser``) to the command
    ``parser`` parses for: positional values first, in the order ``parser`` declares them, then
    ``option value...`` in the order given, each option spelled as the parser's first option string.
    A value of None is left out (the command's default applies); a store_true flag appears when its
    value is True, and False leaves it out; lists give one token per item (``nargs``).

    Raises :class:`ArgvError` for a name that is no destination of ``parser`` (a misspelt or renamed
    flag), a value outside the option's choices, a list for a single-valued option, a value for a
    store_true flag other than True/False, and a missing required positional."""
    actions = _actions(parser)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        near = {n: difflib.get_close_matches(n, actions, n=1) for n in unknown}
        raise ArgvError(f"{parser.prog}: no flag for " + ", ".join(
            n + (f" (did you mean {near[n][0]}?)" if near[n] else "") for n in unknown))
    head: list[str] = []
    for dest, action in actions.items():
        if action.option_strings:
            continue
        if values.get(dest) is None:
            if action.nargs not in ("?", "*"):
                raise ArgvError(f"{parser.prog}: the positional argument {dest} is required")
            continue
        head += _render(action, dest, values[dest], parser.prog)
    tail: list[str] = []
    for dest, value in values.items():
        action = actions[dest]
        if value is None or not action.option_strings:
            continue
        if action.nargs == 0 and value == action.default and value != action.const:
            continue  # store_true given False: the flag is left out
        tail += [action.option_strings[0], *_render(action, dest, value, parser.prog)]
    return head + tail
