"""Running a command: the one table of exit codes, the one error printer, and ``run_async``.

Only the entry points exit the process (``cli.main``, and ``serve.worker`` in a worker
process); every command returns one of these codes. A fatal
start-up error is a ``Fatal`` raised anywhere below a command: ``cli.main`` prints it with
``print_errors`` (plain text, for the person who typed the command) and exits with its code.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine, Iterable
from enum import IntEnum
from typing import Any


class Exit(IntEnum):
    """Exit codes, shared by every command (``rollout`` and ``demo`` map outcomes onto them)."""

    OK = 0  # done: served until stopped, printed, promoted
    FAILED = 1  # the command ran and the answer is no: rolled back, aborted, nothing to act on
    USAGE = 2  # bad arguments, an invalid config, a port in use: cannot start
    UNAVAILABLE = 3  # the Kubernetes API, a ConfigMap or a state file is missing or unreachable
    INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C (128 + N for any signal N: see ``signalled``)


def signalled(number: int) -> int:
    """The shell's convention for a command stopped by signal ``number``: 128 + N."""
    return 128 + number


class Fatal(Exception):
    """A command cannot go on: print ``errors`` as ``error:`` lines and exit with ``code``."""

    def __init__(self, code: Exit, *errors: str) -> None:
        super().__init__("; ".join(errors))
        self.code = code
        self.errors = list(errors)


def print_errors(errors: Iterable[str], *, label: str = "error") -> None:
    """The one printer of plain ``error:`` (or ``warning:``) lines on stderr."""
    for line in errors:
        print(f"{label}: {line}", file=sys.stderr)


def fail(code: Exit, errors: Iterable[str]) -> int:
    """Print ``errors`` and return ``code``: for handlers that return their exit code."""
    print_errors(errors)
    return code


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed, else on the standard asyncio loop.

    Once the coroutine returns, a late SIGTERM must not turn a clean exit into -15: the
    loop's handlers are gone by then, so ignore it (``serve.lifecycle`` blocks it meanwhile).
    """
    try:
        import uvloop
    except ImportError:
        code = asyncio.run(coro)
    else:
        code = uvloop.run(coro)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
