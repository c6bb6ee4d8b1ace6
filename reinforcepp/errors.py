"""The one exception family for bad input.

Every error a user can fix by changing what they gave (a config key, a file, a run folder, a
checkpoint) is an :class:`InputError` with a one-line message naming the culprit. The command
line prints that line and exits with code 2 (the full traceback only with ``--debug``); the
Python API raises it like any exception.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class InputError(Exception):
    """Bad input: a one-line message that names the key, file (and line), value or sample."""


class RunStopped(RuntimeError):
    """A run that stopped itself on purpose with a clear reason (too many non-finite steps):
    the command line prints the one line and exits with code 1."""


class NonFiniteError(RunStopped):
    """Too many consecutive optimizer steps with a non-finite loss or gradient (both trainers;
    :class:`reinforcepp.run.NonFiniteGuard`)."""


class DivergenceError(RunStopped):
    """Weights that grew past ``max_weight_growth`` times their initial norm while every loss and
    gradient stayed finite (both trainers; :class:`reinforcepp.run.guard.DivergenceGuard`)."""


SETUP_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, ImportError, StopIteration)
"""What the libraries a run sets up (datasets, transformers, gymnasium, a reward module) raise
for a bad path, name, file or value: during setup these are the user's input."""


@contextlib.contextmanager
def setup_phase(what: str) -> Iterator[None]:
    """Setting a run up (reading config, data files, models, reward sources, environments):
    an error raised here is turned into an :class:`InputError` naming ``what`` was being set
    up, with the original error as its cause (shown with ``--debug``)."""
    try:
        yield
    except InputError:
        raise
    except SETUP_ERRORS as e:
        raise InputError(f"{what}: {type(e).__name__}: {one_line(e)}") from e
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("gymnasium", "datasets", "huggingface_hub", "safetensors"):
            raise InputError(f"{what}: {type(e).__name__}: {one_line(e)}") from e
        raise


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined)."""
    return " ".join(str(error).split()) or type(error).__name__
