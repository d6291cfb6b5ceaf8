"""The errors a user can act on, and how a command reports them: one line, a clear exit code.

* :class:`UsageError` - the command's input is wrong (a flag, a config field, an input file,
  an output path). Fix the command and run it again. Exit code 2.
* :class:`RunError` - something failed while running (a non-finite loss, a damaged
  checkpoint, a disk error). Exit code 1.
* :class:`Interrupted` - SIGINT (Ctrl-C) or SIGTERM arrived. Exit code 128 + the signal
  (130, 143), the shell's convention.

The first two derive from :class:`TGDError` (all defined in :mod:`tgd_jax.errors`, which
the core, the simulator and the runtime raise). :func:`reported` turns them, a missing or
mistyped path (``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``: exit 2)
and other OS errors (a full disk: exit 1) into one line on stderr naming the problem;
``TGD_VERBOSE=1`` (or a command's ``--verbose``) shows the traceback instead. Anything else
(a ``ValueError`` or ``KeyError`` raised inside JAX, Flax or our own code) is a bug: its
traceback is printed, then one line asking to report it, and the exit code is 1.

In a multi-process run (:func:`leave_at_once_on_error`) a process that stops on an error
leaves at once after its report, without the interpreter's teardown: that teardown shuts
``jax.distributed`` down, which waits for every other process, and those may be gone or
stuck in a collective with this one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

# The error classes live in the core (tgd_jax.errors); importable from here too.
from tgd_jax.errors import ConfigError, DataError, RunError, TGDError, UsageError  # noqa: F401

__all__ = ["Interrupted", "exit_code", "one_line", "reported", "interrupts_deferred",
           "parse_flags", "run_command", "VERBOSE_ENV", "leave_at_once_on_error"]

#: Environment variable that makes commands show tracebacks.
VERBOSE_ENV = "TGD_VERBOSE"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread by :func:`reported`'s handlers.

    A :class:`KeyboardInterrupt` (not an ``Exception``), so no ``except Exception`` on the
    way up (a checkpoint reader's, say) mistakes it for a failure of its own.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {name}")


#: Signals :func:`reported` turns into :class:`Interrupted`.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferred: dict[str, int | None] = {"depth": 0, "pending": None}


def _on_signal(signum: int, frame: object) -> None:
    del frame
    if _deferred["depth"]:  # inside interrupts_deferred(): act when it ends
        _deferred["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds back :class:`Interrupted` until the block ends (a checkpoint being handed to
    the writer): a signal during the block is raised right after it, not inside it."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        pending = _deferred["pending"]
        if not _deferred["depth"] and pending is not None:
            _deferred["pending"] = None
            raise Interrupted(pending)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block (main thread only: Python
    delivers signals there), so ``finally`` clauses run and files are closed. A signal the
    process was started ignoring (``nohup``, a shell's background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_code(error: BaseException) -> int | None:
    """2 for usage errors, 1 for failures, 128 + signal for an interruption, None for a bug
    (keep the traceback)."""
    if isinstance(error, Interrupted):
        return 128 + error.signum
    if isinstance(error, RunError):
        return 1
    if isinstance(error, UsageError | FileNotFoundError | NotADirectoryError
                  | IsADirectoryError):
        return 2
    if isinstance(error, TGDError | OSError):
        return 1
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(message):
        message = f"{error.filename}: {error.strerror or message}"
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


#: Set by :func:`leave_at_once_on_error`: the cleanups to run before leaving.
_LEAVE_AT_ONCE: list[Callable[[], None]] = []


def leave_at_once_on_error(cleanup: Callable[[], None]) -> None:
    """From now on :func:`reported` ends the process at once after reporting an error (a
    multi-process run), running ``cleanup`` first (releasing this process's folder locks).

    A bug's traceback is still printed, and ``--verbose`` prints every traceback."""
    _LEAVE_AT_ONCE.append(cleanup)


def _leave(code: int) -> None:
    """Exits with ``code`` without the interpreter's teardown."""
    for cleanup in _LEAVE_AT_ONCE:
        with contextlib.suppress(Exception):
            cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def reported(name: str, verbose: bool = False) -> Iterator[None]:
    """Runs the block; an expected error ends the program with ``<name>: error: <line>``.

    SIGINT and SIGTERM during the block end it the same way (:class:`Interrupted`, exit code
    130 / 143), after the ``finally`` clauses and atomic writers on the way have run.
    """
    try:
        with _signals_raise():
            yield
    except (Exception, Interrupted) as error:  # noqa: BLE001 - sorted by exit_code
        code = exit_code(error)
        if code is None:  # a bug: the traceback, then what to do with it
            traceback.print_exc()
            print(f"{name}: internal error ({type(error).__name__}): this is a bug in "
                  "tgd-jax or a library it uses, not a problem with your input; please "
                  "report it with the traceback above", file=sys.stderr, flush=True)
            if _LEAVE_AT_ONCE:
                _leave(1)
            sys.exit(1)
        if verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            if not _LEAVE_AT_ONCE:
                raise
            traceback.print_exc()
            _leave(code)
        print(f"{name}: error: {one_line(error)}", file=sys.stderr, flush=True)
        if _LEAVE_AT_ONCE or getattr(error, "skip_teardown", False):
            # After a failed read, orbax/tensorstore callbacks still pending in background
            # threads print tracebacks during interpreter teardown; nothing is being written
            # then, so leave without it and keep the one line.
            _leave(code)
        sys.exit(code)


def run_command(module_name: str, main: Callable[[list[str]], None],
                flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
    """``app.run(main)`` for the command defined in ``module_name``, however it was started
    (``python -m``, a console script, a checkout's wrapper script): ``--help`` and
    ``--helpshort`` show the command's text and its own flags."""
    from absl import app, flags

    module = sys.modules[module_name]
    main_module = sys.modules["__main__"]
    if not getattr(main_module, "__doc__", None):
        main_module.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module):  # absl lists the key flags
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # of sys.argv[0]
    app.run(main, flags_parser=flags_parser or parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run(main, flags_parser=errors.parse_flags)``: a bad flag, including an unknown
    or mistyped ``--config.<field>``, is one line on stderr and exit code 2 (absl's own
    parser prints two lines and exits with 1)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - absl and ml_collections raise many kinds
        name = _program(argv)
        message = one_line(error)
        if isinstance(error, AttributeError | KeyError):
            message = f"unknown config field or flag {message.strip(chr(34) + chr(39))}"
        print(f"{name}: error: {message} (--helpfull lists the flags)", file=sys.stderr,
              flush=True)
        sys.exit(2)


def _program(argv: list[str]) -> str:
    """How the user called the program: ``train.py``, or ``python -m tgd_jax.sim``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if argv and Path(argv[0]).name == "__main__.py" and spec is not None:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return Path(argv[0]).name if argv else "command"
