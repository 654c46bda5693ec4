"""Errors that reach the user as one line and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (a path, a spec, a config): what is wrong and how to fix it."""


class Unavailable(Exception):
    """A detector cannot run on this model or data; its result rows say why instead."""
