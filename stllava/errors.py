"""One error class for every documented bad input, and one exit-code convention for every CLI.

Every error a user can cause with a bad file, record or flag derives from :class:`StllavaError`;
its message names the file, the record and the fix. Each entry point runs through
:func:`run_cli`, which prints such an error as one line (``error: ...``) instead of a traceback.

Exit codes (the same for every ``python -m stllava....`` command and the shell scripts):

====  =======================================================================================
0     success
1     the run failed: an unexpected error (a traceback is printed; a bug or an environment
      problem), or a run that finished but could not do its job (e.g. every judge call failed)
2     bad usage or bad input: a wrong flag (argparse), or a :class:`StllavaError` (one line)
130   interrupted (Ctrl-C)
====  =======================================================================================
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

logger = logging.getLogger(__name__)


def format_message(message: str, file: str | None = None, record: str | int | None = None,
                   fix: str | None = None) -> str:
    """``"<file>, <record>: <message>; fix: <fix>"``, leaving out the parts that are None."""
    where = ", ".join(str(p) for p in (file, record) if p not in (None, ""))
    text = f"{where}: {message}" if where else message
    return f"{text}; fix: {fix}" if fix else text


class StllavaError(Exception):
    """A bad input or a refused operation. ``file``, ``record`` and ``fix`` (each optional) say where
    and what to do; subclasses may instead pass one message that already names them."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str = "", *, file: str | None = None, record: str | int | None = None,
                 fix: str | None = None):
        self.file, self.record, self.fix = file, record, fix
        super().__init__(format_message(message, file, record, fix))


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` under the exit-code convention above and return the exit code.

    A :class:`StllavaError` prints ``error: <message>`` on stderr (no traceback) and returns its
    ``exit_code`` (2); Ctrl-C returns 130; ``main`` returning None counts as 0. Anything else is a
    bug or an environment failure and propagates with its traceback (Python exits 1)."""
    try:
        rc = main(argv)
    except StllavaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if rc is None else int(rc)
