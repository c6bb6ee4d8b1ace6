"""The one exception family for bad input.

Every error a user can fix by changing what they gave (a config key, a file, a run folder, a
checkpoint) is an :class:`InputError` with a one-line message naming the culprit. The command
line prints that line and exits with code 2 (the full traceback only with ``--debug``); the
Python API raises it like any exception.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: a one-line message that names the key, file (and line), value or sample."""


class RunStopped(RuntimeError):
    """A run that stopped itself on purpose with a clear reason (too many non-finite steps):
    the command line prints the one line and exits with code 1."""
