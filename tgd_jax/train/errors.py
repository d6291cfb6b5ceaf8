"""The errors a user can act on, and how a command reports them: one line, a clear exit code.

* :class:`UsageError` - the command's input is wrong (a flag, a config field, an input file,
  an output path). Fix the command and run it again. Exit code 2.
* :class:`RunError` - something failed while running (a non-finite loss, a damaged
  checkpoint, a disk error). Exit code 1.

Both derive from :class:`TGDError`. :func:`reported` turns them (and the standard
exceptions that mean the same: ValueError, KeyError, FileNotFoundError, OSError ...) into one
line on stderr naming the problem; ``TGD_VERBOSE=1`` (or a command's ``--verbose``) shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["TGDError", "UsageError", "RunError", "exit_code", "one_line", "reported",
           "VERBOSE_ENV"]

#: Environment variable that makes commands show tracebacks.
VERBOSE_ENV = "TGD_VERBOSE"


class TGDError(Exception):
    """Base of every error tgd-jax reports to a user as one line."""


class UsageError(TGDError, ValueError):
    """The input is wrong: the message names the flag, field, file, key or value."""


class RunError(TGDError):
    """Something failed while running; the message says what, and what was kept."""


def exit_code(error: BaseException) -> int | None:
    """2 for usage errors, 1 for failures, None for a bug (keep the traceback)."""
    if isinstance(error, RunError):
        return 1
    if isinstance(error, UsageError | ValueError | KeyError | FileNotFoundError
                  | NotADirectoryError | IsADirectoryError | ImportError):
        return 2
    if isinstance(error, TGDError | OSError | FloatingPointError):
        return 1
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(message):
        message = f"{error.filename}: {error.strerror or message}"
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


@contextlib.contextmanager
def reported(name: str, verbose: bool = False) -> Iterator[None]:
    """Runs the block; an expected error ends the program with ``<name>: error: <line>``."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - sorted by exit_code, bugs re-raised
        code = exit_code(error)
        if code is None or verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            raise
        print(f"{name}: error: {one_line(error)}", file=sys.stderr, flush=True)
        if getattr(error, "skip_teardown", False):
            # After a failed read, orbax/tensorstore callbacks still pending in background
            # threads print tracebacks during interpreter teardown; nothing is being written
            # then, so leave without it and keep the one line.
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)
