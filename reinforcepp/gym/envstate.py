"""The state of Gymnasium environments as plain data, so that a checkpoint resumes mid-episode
without pickle.

An environment built by ``gym.make`` is a chain of wrappers around the unwrapped env
(``TimeLimit -> OrderEnforcing -> PassiveEnvChecker -> CartPoleEnv``). For environments whose
whole state lives in plain attributes -- the classic-control ones (CartPole, Pendulum,
MountainCar, Acrobot) and most pure-Python envs -- the data attributes of each link (numbers,
strings, numpy arrays, tuples and lists of them, and the state of ``np.random.Generator``
objects) are that state: :func:`env_state` reads them, :func:`set_env_state` writes them back
into freshly made environments of the same chain. Nothing is executed on restore; attributes
that are not data (spaces, specs, renderers, the wrapped env) are left to the constructor.

A restore writes only an episode's state, never the environment's settings: a probe
(:func:`episode_attributes`) makes one more environment of the same id and arguments, resets
and steps it with random actions, and notes which attributes that changes. A saved attribute the
probe never saw is refused; one that resets and steps never change (``TimeLimit``'s
``_max_episode_steps``, CartPole's ``gravity``) must equal the fresh environment's value, or the
checkpoint is refused (:class:`~reinforcepp.run.state.CheckpointFormatError`): a checkpoint
received from someone else cannot set arbitrary attributes of the environment.

Environments with state outside Python attributes (Box2D and MuJoCo physics, both
``EzPickle``) and async vector envs (the envs live in subprocesses) are not restorable:
a resumed run starts fresh episodes there (:func:`restorable`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np

from ..run.state import CheckpointFormatError

_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "MT19937": np.random.MT19937,
                   "Philox": np.random.Philox, "SFC64": np.random.SFC64}
_SKIP = {"env", "_saved_kwargs", "spec", "_cached_spec", "_metadata", "_action_space", "_observation_space",
         "action_space", "observation_space", "_previous_data"}


def restorable(envs: gym.vector.VectorEnv) -> bool:
    """Whether :func:`vector_env_state` captures the environments' full state: a sync vector
    env whose unwrapped envs are not ``EzPickle`` (Box2D, MuJoCo)."""
    sub = getattr(envs, "envs", None)
    return sub is not None and not any(isinstance(e.unwrapped, gym.utils.EzPickle) for e in sub)


def _chain(env: Any) -> list[Any]:
    links = [env]
    while hasattr(links[-1], "env") and isinstance(links[-1], gym.Wrapper):
        links.append(links[-1].env)
    return links


def _is_data(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    if isinstance(value, (tuple, list)):
        return all(_is_data(v) for v in value)
    return False


def env_state(env: gym.Env) -> list[dict[str, Any]]:
    """One entry per link of the wrapper chain: its class name, data attributes and generators."""
    out = []
    for link in _chain(env):
        data: dict[str, Any] = {}
        generators: dict[str, Any] = {}
        for key, value in vars(link).items():
            if key in _SKIP:
                continue
            if isinstance(value, np.random.Generator):
                generators[key] = value.bit_generator.state
            elif _is_data(value):
                data[key] = value.copy() if isinstance(value, np.ndarray) else value
        out.append({"class": type(link).__name__, "data": data, "generators": generators})
    return out


PROBE_STEPS = 300
"""Random steps of :func:`episode_attributes`' probe (with a reset at each episode's end)."""

_MISSING = object()


def _snapshot(link: Any) -> dict[str, Any]:
    """The data attributes and generator states of one link (what :func:`env_state` saves)."""
    out: dict[str, Any] = {}
    for key, value in vars(link).items():
        if key in _SKIP:
            continue
        if isinstance(value, np.random.Generator):
            out[key] = ("generator", value.bit_generator.state)
        elif _is_data(value):
            out[key] = value.copy() if isinstance(value, np.ndarray) else value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f"))
        except (TypeError, ValueError):
            return False
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def episode_attributes(make_env: Callable[[], gym.Env], steps: int = PROBE_STEPS) -> list[tuple[set[str], set[str]]]:
    """Per link of a fresh environment's wrapper chain: ``(seen, changed)``, the data attributes
    it has at any point of a probe (made, reset, ``steps`` random steps with a reset at each
    episode's end) and those whose value the probe changed: the state of an episode. The rest
    are settings, fixed by the constructor."""
    env = make_env()
    try:
        links = _chain(env)
        first = [_snapshot(link) for link in links]
        seen = [set(f) for f in first]
        changed: list[set[str]] = [set() for _ in links]

        def note() -> None:
            for i, link in enumerate(links):
                now = _snapshot(link)
                seen[i] |= set(now)
                keys = set(now) | set(first[i])
                changed[i] |= {k for k in keys if not _same(now.get(k, _MISSING), first[i].get(k, _MISSING))}

        env.action_space.seed(0)
        env.reset(seed=0)
        note()
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            note()
            if terminated or truncated:
                env.reset()
                note()
        return list(zip(seen, changed))
    finally:
        env.close()


def check_env_state(env: gym.Env, state: list[dict[str, Any]], probe: list[tuple[set[str], set[str]]],
                    where: str) -> None:
    """Refuse (:class:`CheckpointFormatError`, naming ``where``, the link and the attribute) a
    saved state that sets an attribute the probe never saw, or changes a setting: an attribute
    episodes never change whose saved value differs from the fresh ``env``'s."""
    for link, saved, (seen, changed) in zip(_chain(env), state, probe):
        cls = type(link).__name__
        entries = [*saved["data"].items(), *((k, ("generator", v)) for k, v in saved["generators"].items())]
        for key, value in entries:
            if key not in seen:
                raise CheckpointFormatError(f"{where}: the saved environment state sets {cls}.{key}, which a "
                                            "fresh environment does not have; a checkpoint restores only what "
                                            "episodes change")
            if key in changed:
                continue
            fresh = _snapshot(link).get(key, _MISSING)
            if not _same(value, fresh):
                raise CheckpointFormatError(
                    f"{where}: the saved environment state sets {cls}.{key}={_short(value)}, but a fresh environment "
                    f"has {_short(fresh)} and episodes never change it: a checkpoint restores only an episode's state, "
                    "never the environment's settings")


def _short(value: Any) -> str:
    return "(none)" if value is _MISSING else f"{value!r:.60}"


def set_env_state(env: gym.Env, state: list[dict[str, Any]], probe: Optional[list[tuple[set[str], set[str]]]] = None,
                  where: str = "checkpoint") -> None:
    """Write :func:`env_state`'s output back into ``env`` (a freshly made env of the same id),
    checked first against ``probe`` (:func:`episode_attributes`) when given."""
    links = _chain(env)
    names = [type(link).__name__ for link in links]
    if names != [s["class"] for s in state]:
        chain = [s["class"] for s in state]
        raise CheckpointFormatError(f"{where}: saved environment chain {chain} does not match {names}")
    if probe is not None:
        check_env_state(env, state, probe, where)
    for link, saved in zip(links, state):
        for key, value in saved["data"].items():
            current = getattr(link, key, None)
            setattr(link, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
        for key, bit_state in saved["generators"].items():
            kind = bit_state.get("bit_generator") if isinstance(bit_state, dict) else None
            if kind not in _BIT_GENERATORS:
                raise CheckpointFormatError(f"{where}: unknown bit generator {kind!r} in the saved environment state")
            bit = _BIT_GENERATORS[kind]()
            bit.state = bit_state
            setattr(link, key, np.random.Generator(bit))


def vector_env_state(envs: Any) -> list[list[dict[str, Any]]]:
    """:func:`env_state` of every sub-environment of a sync vector env."""
    return [env_state(e) for e in envs.envs]


def set_vector_env_state(envs: Any, state: list[list[dict[str, Any]]], where: str = "checkpoint") -> None:
    """:func:`set_env_state` for every sub-environment of a sync vector env, each checked
    against one probe of a fresh environment made as the vector env makes them."""
    sub = envs.envs
    if len(sub) != len(state):
        raise CheckpointFormatError(f"{where}: the checkpoint holds {len(state)} environments, the run has {len(sub)}")
    probe = episode_attributes(envs.env_fns[0])
    for i, (env, saved) in enumerate(zip(sub, state)):
        set_env_state(env, saved, probe, where=f"{where}, environment {i}")
