"""Errors that reach the user as one line, and the exit codes of every command."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a command's exit status means, as CI reads it (after pytest's)."""

    OK = 0  #: the command did its work; for ``check`` and ``compare``: every check passed, no regression
    CHECK_FAILED = 1  #: a threshold check failed (``check``, the pytest plugin) or a regression (``compare``)
    USAGE_ERROR = 2  #: bad input: an option, spec, suite, model or data that cannot be audited, a damaged run folder
    INTERNAL_ERROR = 3  #: a bug or an unexpected fault; the traceback is saved to ``error.log``
    INTERRUPTED = 130  #: Ctrl-C (SIGINT)
    TERMINATED = 143  #: SIGTERM (a CI job's timeout, ``kill``)


class UsageError(Exception):
    """Bad input from the user (a path, a spec, a config): what is wrong and how to fix it."""


class DamagedRunFolder(UsageError):
    """A file of a run folder is missing, truncated or not what advdetect wrote."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so the run folder says it was interrupted."""


class Unavailable(Exception):
    """A detector cannot run on this model or data; its result rows say why instead."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors that wrap another."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
