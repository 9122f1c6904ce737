"""What the ``medvlm`` command prints and returns when a run cannot go on.

A user error is one line on stderr — what went wrong, where (file, line, record), what to do — and an
exit code that tells scripts which kind of failure it was (listed in README "Exit codes"). The
traceback is printed only with ``--debug``. Anything not recognised as a user error is a bug: one
line asking for the ``--debug`` traceback, exit code 1.
"""

from __future__ import annotations

import json
import traceback

OK = 0
BUG = 1               # an unexpected error: please report it with the --debug traceback
USAGE = 2             # the command line or a config file is wrong (argparse errors, unknown keys, bad values)
INTERRUPTED = 3       # stopped by a signal with its state saved: run the same command again to resume
BAD_INPUT = 4         # an input file is missing, unreadable or malformed (data set, answers, images, JSON)
FILESYSTEM = 5        # an output could not be written (permissions, read-only folder, disk full)
RUN_FAILED = 6        # the run finished but produced nothing usable, or a service refused it
CTRL_C = 130          # stopped by Ctrl+C outside a training loop (which saves a checkpoint and returns 3)

EXIT_CODES = {OK: "success", BUG: "unexpected error (rerun with --debug and report the traceback)",
              USAGE: "wrong command line or configuration", INTERRUPTED: "interrupted; rerun to resume",
              BAD_INPUT: "missing or malformed input", FILESYSTEM: "cannot write an output",
              RUN_FAILED: "the run produced nothing usable or a service refused it",
              CTRL_C: "stopped by Ctrl+C"}


def _input_errors() -> tuple[type, ...]:
    """Library error classes that mean "an input is bad" (imported lazily: the CLI starts fast)."""
    from medvlm.data import DataError
    from medvlm.imaging import ImageLoadError

    classes: list[type] = [DataError, ImageLoadError, FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError]
    for module, name in (("downstream.metrics", "ScoreInputError"), ("pmc_ingest.jats", "JatsError"),
                         ("pmc_ingest.packages", "PackageError"), ("medvlm.conversation", "ConversationError"),
                         ("medvlm.convert", "ConvertError")):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command."""
    if isinstance(exc, json.JSONDecodeError):
        where = f"line {exc.lineno} column {exc.colno}"
        return BAD_INPUT, f"not valid JSON at {where} ({exc.msg}); fix or remove that line"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return BAD_INPUT, f"{exc.filename}: no such file or folder; check the path"
    if isinstance(exc, _input_errors()):
        return BAD_INPUT, _one_line(exc)
    if isinstance(exc, OSError):
        target = exc.filename or "a file"
        reason = exc.strerror or _one_line(exc)
        return FILESYSTEM, (f"cannot access {target}: {reason}; choose an output folder you can write to "
                            "(or fix its permissions / free disk space)")
    if isinstance(exc, ValueError):
        return USAGE, _one_line(exc)
    if isinstance(exc, RuntimeError):
        return RUN_FAILED, _one_line(exc)
    return BUG, f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback and report it)"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def report(exc: BaseException, debug: bool, stream) -> int:
    """Print the message (and with ``debug`` the traceback) to ``stream``; return the exit code."""
    code, message = classify(exc)
    if debug:
        traceback.print_exception(exc, file=stream)
    print(f"medvlm: error: {message}", file=stream)
    return code


class UsageError(ValueError):
    """A command line that names too little to run (exit code ``USAGE``)."""
