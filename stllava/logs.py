"""One logging setup for every entry point (``python -m stllava....`` and ``scripts/*.py``).

Each entry point parses its flags, then calls :func:`setup` once: one format
(:data:`FORMAT`, on stderr), one level. Commands take ``--log-level`` (:func:`add_log_level_arg`;
DEBUG, INFO, WARNING or ERROR, any case). The training entry points (``stllava.train.train_sft``,
``stllava.train.train_dpo``) take transformers' own ``--log_level`` / ``--log-level`` and
``--log_level_replica`` instead (``TrainingArguments`` already defines them; see
``stllava.train.launch``).

On a distributed run (a rank given, or ``$RANK`` / ``$LOCAL_RANK`` set), ranks other than 0 log
warnings and errors only, so N processes do not print every line N times; ``all_ranks=True``
asks for the same level on every rank.
"""
from __future__ import annotations

import argparse
import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RANK_VARIABLES = ("RANK", "LOCAL_RANK")  # what torchrun, deepspeed and accelerate set, in that order


def process_rank(rank: int | None = None) -> int | None:
    """``rank`` when given, else ``$RANK``, else ``$LOCAL_RANK`` (as an int); None when none is set
    (not a distributed run) or the variable is not an integer."""
    if rank is not None:
        return int(rank)
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def level_number(level: str | int) -> int:
    """``level`` as a :mod:`logging` number: a name of :data:`LEVELS` (any case) or a number.
    Refuses (ValueError) any other name."""
    if isinstance(level, int):
        return level
    name = str(level).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    return getattr(logging, name)


def setup(level: str | int = "INFO", rank: int | None = None, *, all_ranks: bool = False) -> int:
    """Log :data:`FORMAT` lines at ``level`` on stderr (the root logger); returns the level used.

    On ranks other than 0 (see :func:`process_rank`) the level is raised to WARNING unless
    ``all_ranks``. Like ``logging.basicConfig``, it leaves a root logger that already has a handler
    alone (a test runner's, or an in-process caller's own setup). Refuses (ValueError) an unknown
    level name."""
    number = level_number(level)
    if process_rank(rank) not in (None, 0) and not all_ranks:
        number = max(number, logging.WARNING)
    logging.basicConfig(level=number, format=FORMAT)
    return number


def add_log_level_arg(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """Add ``--log-level`` (one of :data:`LEVELS`, any case; default ``default``) to ``parser``.
    A value outside :data:`LEVELS` is an argparse error (usage line, exit code 2), not a traceback."""
    parser.add_argument("--log-level", dest="log_level", type=str.upper, choices=LEVELS, default=default,
                        help=f"how much to log: {', '.join(LEVELS)} (default {default}; ranks other than 0 of a "
                        "distributed run log warnings only)")
