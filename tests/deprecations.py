"""Deprecation warnings raised by calls of ours fail the test that made them.

A library's ``FutureWarning`` or ``DeprecationWarning`` names its own module as the place of the
warning (transformers warns with the default ``stacklevel=1``), so a ``filterwarnings`` entry
cannot tell a deprecated call of ours from a library's own business. :class:`OwnDeprecations`
looks at the live Python stack instead: from the frame that raised the warning it walks outward,
skips library frames (site-packages, the standard library, frozen and generated code) and looks
at the first frame that is not a library's:

* in ``reinforcepp/`` or ``tests/``: we called something deprecated (directly, or through a
  library that forwarded our call): the warning is *flagged*;
* an import-system frame (``<frozen importlib._bootstrap>``) comes first: the library warned
  while being imported, not because of a call of ours: passed on;
* anything else (a script, pytest's own entry point): passed on.

A few deprecated calls that a library makes on its own account whatever we pass (listed in
:data:`THIRD_PARTY_CALLS`, each with its reason) pass on too.

Flagged warnings fail the test phase (setup, call or teardown) they happened in
(``tests/conftest.py``), with the warning's text and our frame's ``file:line``; the others go on
to pytest's own warning recorder, as before.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, Optional, TextIO

DEPRECATIONS: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _our_roots() -> tuple[str, ...]:
    """The folders of our code: the ``reinforcepp`` package that is imported (the worktree's when
    PYTHONPATH points there, found without importing it) and this ``tests/`` folder."""
    roots = [Path(__file__).resolve().parent]
    spec = importlib.util.find_spec("reinforcepp")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p).resolve() for p in spec.submodule_search_locations]
    return tuple(str(r) + os.sep for r in roots)


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {str(Path(paths[key]).resolve()) for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(sorted(r + os.sep for r in roots))


OUR_ROOTS = _our_roots()
LIBRARY_ROOTS = _library_roots()


def _is_import_system(filename: str) -> bool:
    return filename.startswith("<frozen importlib._bootstrap")


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):  # frozen modules, exec'd and generated code (dataclass __init__, ...)
        return True
    parts = Path(filename).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return os.path.realpath(filename).startswith(LIBRARY_ROOTS)


# Deprecated calls that a library makes on its own account, which no call of ours can avoid: the
# warning passes on (to pytest's summary) when its message contains the text and a frame of that
# package lies between the warning and our code. Remove an entry when the package stops it.
THIRD_PARTY_CALLS: tuple[tuple[str, str], ...] = (
    # PEFT (0.21.2, the newest) reads `model.is_gradient_checkpointing` itself in PeftModel.__init__
    # and mixed_model.py, whatever we pass; transformers 5.25 deprecates the property (removed in
    # v6, when PEFT's getattr default applies).
    ("peft", "`is_gradient_checkpointing` is deprecated"),
)


def our_caller(frame: Optional[FrameType], ours: tuple[str, ...] = OUR_ROOTS) -> Optional[tuple[str, int]]:
    """``(file, line)`` of the first non-library frame from ``frame`` outward when that frame is in
    our code (``ours``: folder prefixes); ``None`` when it is not, or when an import-system frame
    comes first (an import-time warning of a library)."""
    found, _ = _walk(frame, ours)
    return found


def _walk(frame: Optional[FrameType], ours: tuple[str, ...]) -> tuple[Optional[tuple[str, int]], list[str]]:
    """:func:`our_caller`, and the files of the library frames passed on the way."""
    passed: list[str] = []
    while frame is not None:
        filename = frame.f_code.co_filename
        if _is_import_system(filename):
            return None, passed
        if filename != __file__:  # this checker's own frames (one hands a warning on to another)
            if os.path.realpath(filename).startswith(ours):  # before the library test: ours may be installed
                return (filename, frame.f_lineno), passed
            if not _is_library(filename):
                return None, passed
        passed.append(filename)
        frame = frame.f_back
    return None, passed


def _third_party_call(message: str, library_files: list[str]) -> bool:
    for package, text in THIRD_PARTY_CALLS:
        if text in message and any(package in Path(f).parts for f in library_files):
            return True
    return False


class OwnDeprecations:
    """A ``warnings.showwarning`` replacement: deprecation warnings whose first non-library caller
    is our code are collected in :attr:`flagged` (``"file:line: Category: message"``), every other
    warning is handed to ``pass_on`` (the ``showwarning`` that was installed before)."""

    def __init__(self, pass_on: Callable[..., Any], ours: tuple[str, ...] = OUR_ROOTS) -> None:
        self.pass_on = pass_on
        self.ours = ours
        self.flagged: list[str] = []

    def showwarning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Optional[TextIO] = None,
        line: Optional[str] = None,
    ) -> None:
        caller = None
        if issubclass(category, DEPRECATIONS):
            # frame 0 is this method, frame 1 warnings._showwarnmsg; the warning's raiser is further out
            caller, library_files = _walk(sys._getframe(1), self.ours)
            if caller is not None and _third_party_call(str(message), library_files):
                caller = None
        if caller is None:
            self.pass_on(message, category, filename, lineno, file, line)
            return
        path, at = caller
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        self.flagged.append(f"{shown}:{at}: {category.__name__}: {message} (raised at {filename}:{lineno})")


@contextlib.contextmanager
def checking_deprecations(ours: tuple[str, ...] = OUR_ROOTS) -> Iterator[OwnDeprecations]:
    """Within the block every deprecation warning is shown ("always": none is deduplicated or
    filtered away before the check) and goes through an :class:`OwnDeprecations`; the warning
    filters and ``warnings.showwarning`` are restored afterwards."""
    with warnings.catch_warnings():
        for category in DEPRECATIONS:
            warnings.simplefilter("always", category)
        checker = OwnDeprecations(warnings.showwarning, ours)
        warnings.showwarning = checker.showwarning
        yield checker
