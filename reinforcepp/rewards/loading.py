"""Building reward sources from spec strings (``module:function``, ``file.py:function``,
``verl:...``, ``openrlhf:...``, ``rm:...``, ``http(s)://...``)."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .adapters import from_openrlhf, from_verl
from .base import RewardError, RewardFn, RewardSource
from .remote import RemoteReward
from .reward_model import RewardModel


def _load_module_from_file(path_text: str, spec: str) -> ModuleType:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise RewardError(f"reward spec {spec!r}: file {str(path)!r} not found (cwd {Path.cwd()})")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_reinforcepp_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward spec {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        raise RewardError(f"reward spec {spec!r}: executing {str(path)!r} failed: {exc!r}") from exc
    return module


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise RewardError(
                f"reward spec {spec!r}: module {name!r} is not importable ({exc}); "
                "is it installed or on PYTHONPATH? (a file needs a path ending in .py)"
            ) from exc
        raise RewardError(f"reward spec {spec!r}: importing module {name!r} failed: {exc!r}") from exc
    except Exception as exc:
        raise RewardError(f"reward spec {spec!r}: importing module {name!r} failed: {exc!r}") from exc


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_callable(target: str, attr: str, spec: str) -> Callable[..., Any]:
    module = _load_module_from_file(target, spec) if _is_file_target(target) else _import_module(target, spec)
    if not hasattr(module, attr):
        candidates = [n for n in dir(module) if not n.startswith("_")]
        near = difflib.get_close_matches(attr, candidates, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RewardError(f"reward spec {spec!r}: {target!r} has no attribute {attr!r}{hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"reward spec {spec!r}: {target}:{attr} is a {type(fn).__name__}, not callable")
    return fn


def _split_target(rest: str, default_attr: str, spec: str) -> tuple[str, str]:
    target, sep, attr = rest.rpartition(":")
    if not sep:
        target, attr = rest, default_attr
    if not target or not attr:
        raise RewardError(f"reward spec {spec!r}: expected '<module-or-file>:<function>'")
    return target, attr


def load_reward_source(
    spec: str, weight: float = 1.0, *, reward_model_kwargs: dict[str, Any] | None = None
) -> RewardSource:
    """Build a :class:`RewardSource` from a spec string.

    Spec forms:

    - ``module.sub:function``: a function of an importable module;
    - ``path/to/file.py:function``: a function of a Python file (loaded by path; a target with
      ``/`` or ending in ``.py`` is a file);
    - ``verl:<module-or-file>[:compute_score]``: a verl ``compute_score``, via :func:`from_verl`;
    - ``openrlhf:<module-or-file>[:reward_func]``: an OpenRLHF ``reward_func``, via
      :func:`from_openrlhf`;
    - ``rm:<path-or-hub-name>``: a sequence-classification reward model (:class:`RewardModel`,
      default arguments);
    - ``http://...`` / ``https://...``: a reward server (:class:`RemoteReward`).

    The name is the function's name (``compute_score`` for verl), or the spec for ``rm:`` and
    URLs. ``reward_model_kwargs`` (``device``, ``dtype``, ``batch_size``, ``max_length``,
    ``trust_remote_code``) go to :class:`RewardModel` for an ``rm:`` spec; they are an error with
    any other spec.

    Raises:
        RewardError: file not found, module not importable, attribute missing (the nearest name
            is suggested), not callable, malformed spec.
    """
    spec = spec.strip()
    if reward_model_kwargs and not spec.startswith("rm:"):
        raise RewardError(f"reward spec {spec!r}: reward_model_kwargs apply only to 'rm:' specs")
    if spec.startswith(("http://", "https://")):
        return RewardSource(spec, RemoteReward(spec), weight)
    if spec.startswith("rm:"):
        path = spec[len("rm:") :]
        if not path:
            raise RewardError(f"reward spec {spec!r}: expected 'rm:<path-or-hub-name>'")
        if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise RewardError(f"reward spec {spec!r}: {path} does not exist "
                              "(a local reward model directory, or a hub name 'org/model')")
        return RewardSource(spec, RewardModel(path, **(reward_model_kwargs or {})), weight)
    for prefix, default_attr, wrap in (
        ("verl:", "compute_score", from_verl),
        ("openrlhf:", "reward_func", from_openrlhf),
    ):
        if spec.startswith(prefix):
            target, attr = _split_target(spec[len(prefix) :], default_attr, spec)
            return RewardSource(attr, wrap(_load_callable(target, attr, spec)), weight)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(
            f"reward spec {spec!r}: expected 'module:function', 'file.py:function', 'verl:...', "
            "'openrlhf:...', 'rm:...' or an http(s) URL"
        )
    return RewardSource(attr, _load_callable(target, attr, spec), weight)


def load_reward_function(spec: str) -> RewardFn:
    """The reward function of :func:`load_reward_source` (same spec forms and errors)."""
    return load_reward_source(spec).fn
