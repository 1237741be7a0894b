"""The plugin's refusals reach a ``mergekit-*`` command's user as one line, not a traceback.

``mergekit-yaml`` (and every other mergekit script) lets exceptions escape to the interpreter,
which prints the whole traceback: for a misspelt recipe parameter, thirteen frames of mergekit
and plugin internals above the one line that matters. :func:`install` (called by
:func:`.plugin.install`) chains a ``sys.excepthook`` that prints an uncaught
:class:`.errors.SymAlignError` as ``Error: <message>`` when the process is a mergekit command;
the interpreter still exits with status 1. Every other exception, the plugin's errors in any
other program (a script, a notebook, pytest), and any process run with
``MERGEKIT_SYMALIGN_DEBUG=1`` or mergekit's ``-v`` keep the full traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import SymAlignError

DEBUG_ENV = "MERGEKIT_SYMALIGN_DEBUG"
_VERBOSE = re.compile(r"^(-v+|--verbose)$")  # mergekit-yaml: -v, -vv


def debugging(argv: Optional[Sequence[str]] = None, environ=None) -> bool:
    """Show tracebacks: ``MERGEKIT_SYMALIGN_DEBUG`` set (not ``0``/empty), or ``-v`` given."""
    environ = os.environ if environ is None else environ
    if environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    argv = sys.argv if argv is None else argv
    return any(_VERBOSE.match(str(arg)) for arg in argv[1:])


def is_mergekit_command(argv: Optional[Sequence[str]] = None) -> bool:
    """The process is a mergekit console script (``mergekit-yaml``, ``mergekit-multi``, ...) or
    ``python -m mergekit.scripts...``; not a user's own program that happens to merge."""
    argv = getattr(sys, "argv", None) if argv is None else argv
    if not argv:
        return False
    program = Path(str(argv[0]))
    return program.name.startswith("mergekit") or "mergekit" in program.parent.parts


def one_line(err: BaseException) -> str:
    """``Error: <message>`` on one line, with how to get the traceback."""
    message = " ".join(str(err).split())
    return f"Error: {message} ({DEBUG_ENV}=1 or -v shows the traceback)"


def _excepthook(previous):
    def excepthook(exc_type, exc, tb):
        if isinstance(exc, SymAlignError) and is_mergekit_command() and not debugging():
            print(one_line(exc), file=sys.stderr, flush=True)
            return
        previous(exc_type, exc, tb)

    excepthook._symalign = True
    return excepthook


def install() -> None:
    """Idempotent: chain the hook in front of the current ``sys.excepthook``."""
    if not getattr(sys.excepthook, "_symalign", False):
        sys.excepthook = _excepthook(sys.excepthook)
