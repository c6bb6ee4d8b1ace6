"""Hooks for the whole suite.

Deprecated calls of ours fail the test: every phase of a test (setup, including module- and
session-scoped fixtures set up for it, call, teardown) runs under
:func:`tests.deprecations.checking_deprecations`; a DeprecationWarning,
PendingDeprecationWarning or FutureWarning caused by a call from reinforcepp/ or tests/ fails
that phase with the warning's text and our file:line, so the next removal in a dependency is
caught here and not by users. A library's own or import-time deprecations pass on to pytest's
warning summary (tests/deprecations.py says how the two are told apart).
"""

from __future__ import annotations

from typing import Generator

import pytest

from tests.deprecations import checking_deprecations


def _checked() -> Generator[None, object, object]:
    with checking_deprecations() as checker:
        result = yield
    if checker.flagged:
        unique = list(dict.fromkeys(checker.flagged))
        pytest.fail("deprecated call(s) from our code:\n" + "\n".join(unique), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _checked())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _checked())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _checked())
