"""The deprecation checker of tests/conftest.py: a deprecated call from our code is flagged with
our file:line, a library's import-time deprecation and a call from outside our code are not."""

from __future__ import annotations

import importlib
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest

from tests.deprecations import checking_deprecations

LIBRARY = '''
import warnings

warnings.warn("fakelib: importing this module is deprecated", DeprecationWarning)


def old_api():
    """A library function that warns with the default stacklevel, as transformers does."""
    warnings.warn("old_api is deprecated, use new_api", FutureWarning)
    return 1


def forwards():
    """A library function that uses its own deprecated function on the caller's behalf."""
    return old_api() + 1


def is_gradient_checkpointing():
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning)
    return False
'''


@pytest.fixture
def fakelib(tmp_path: Path) -> Iterator[Any]:
    """A module under a ``site-packages`` folder: a library, for the checker. Yields a loader, so
    the test imports it inside its own checking block."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "fakelib_deprecations.py").write_text(LIBRARY)
    sys.path.insert(0, str(site))

    def load() -> ModuleType:
        return importlib.import_module("fakelib_deprecations")

    yield load
    sys.path.remove(str(site))
    sys.modules.pop("fakelib_deprecations", None)


def test_a_deprecated_call_from_our_code_is_flagged_with_our_line(fakelib):
    recorded: list[str] = []
    with checking_deprecations() as import_check:
        import_check.pass_on = lambda message, *args: recorded.append(str(message))
        lib = fakelib()
    assert import_check.flagged == []  # import-time: the library's own business
    assert recorded == ["fakelib: importing this module is deprecated"]
    recorded.clear()
    with checking_deprecations() as checker:
        checker.pass_on = lambda message, *args: recorded.append(str(message))
        line = sys._getframe().f_lineno + 1
        lib.old_api()
        lib.forwards()
        warnings.warn("ours is deprecated", PendingDeprecationWarning, stacklevel=1)
    here = Path(__file__).name
    assert [f.split(" (raised at ")[0].rsplit("/", 1)[-1] for f in checker.flagged] == [
        f"{here}:{line}: FutureWarning: old_api is deprecated, use new_api",
        f"{here}:{line + 1}: FutureWarning: old_api is deprecated, use new_api",  # forwarded by the library
        f"{here}:{line + 2}: PendingDeprecationWarning: ours is deprecated",
    ]
    assert "fakelib_deprecations.py" in checker.flagged[0]  # where the library raised it
    assert recorded == []


def test_library_warnings_not_caused_by_our_calls_pass_on(fakelib, tmp_path):
    recorded: list[str] = []
    with checking_deprecations() as checker:
        checker.pass_on = lambda message, *args: recorded.append(str(message))
        lib = fakelib()  # a library warns while it is being imported
        # code outside reinforcepp/ and tests/ (a user's script) calls the deprecated function
        script = tmp_path / "script.py"
        script.write_text(textwrap.dedent("""
            def main(lib):
                return lib.old_api()
        """))
        namespace: dict[str, Any] = {}
        exec(compile(script.read_text(), str(script), "exec"), namespace)
        namespace["main"](lib)
        warnings.warn("not a deprecation", UserWarning, stacklevel=1)  # other categories are never checked
    assert checker.flagged == []
    assert recorded == ["fakelib: importing this module is deprecated", "old_api is deprecated, use new_api",
                        "not a deprecation"]


def test_a_listed_third_party_call_passes_only_when_that_package_makes_it(fakelib, tmp_path):
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` on its own account
    (tests/deprecations.py THIRD_PARTY_CALLS); the same call from our code is still flagged."""
    recorded: list[str] = []
    with checking_deprecations() as checker:
        checker.pass_on = lambda message, *args: recorded.append(str(message))
        lib = fakelib()
        peft_file = tmp_path / "site-packages" / "peft" / "peft_model.py"  # a frame of the peft package
        namespace: dict[str, Any] = {}
        exec(compile("def wrap(lib):\n    return lib.is_gradient_checkpointing()\n", str(peft_file), "exec"), namespace)
        namespace["wrap"](lib)
        assert checker.flagged == []
        lib.is_gradient_checkpointing()
    assert len(checker.flagged) == 1 and "`is_gradient_checkpointing` is deprecated" in checker.flagged[0]
    assert recorded == ["fakelib: importing this module is deprecated",
                        "`is_gradient_checkpointing` is deprecated and will be removed in v6"]

