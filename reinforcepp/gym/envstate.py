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

Environments with state outside Python attributes (Box2D and MuJoCo physics, both
``EzPickle``) and async vector envs (the envs live in subprocesses) are not restorable:
a resumed run starts fresh episodes there (:func:`restorable`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "MT19937": np.random.MT19937, "Philox": np.random.Philox, "SFC64": np.random.SFC64}
_SKIP = {"env", "_saved_kwargs", "spec", "_cached_spec", "_metadata", "_action_space", "_observation_space", "action_space", "observation_space", "_previous_data"}


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


def set_env_state(env: gym.Env, state: list[dict[str, Any]]) -> None:
    """Write :func:`env_state`'s output back into ``env`` (a freshly made env of the same id)."""
    links = _chain(env)
    names = [type(link).__name__ for link in links]
    if names != [s["class"] for s in state]:
        raise ValueError(f"saved environment chain {[s['class'] for s in state]} does not match {names}")
    for link, saved in zip(links, state):
        for key, value in saved["data"].items():
            current = getattr(link, key, None)
            setattr(link, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
        for key, bit_state in saved["generators"].items():
            kind = bit_state.get("bit_generator") if isinstance(bit_state, dict) else None
            if kind not in _BIT_GENERATORS:
                raise ValueError(f"unknown bit generator {kind!r} in the saved environment state")
            bit = _BIT_GENERATORS[kind]()
            bit.state = bit_state
            setattr(link, key, np.random.Generator(bit))


def vector_env_state(envs: Any) -> list[list[dict[str, Any]]]:
    """:func:`env_state` of every sub-environment of a sync vector env."""
    return [env_state(e) for e in envs.envs]


def set_vector_env_state(envs: Any, state: list[list[dict[str, Any]]]) -> None:
    sub = envs.envs
    if len(sub) != len(state):
        raise ValueError(f"the checkpoint holds {len(state)} environments, the run has {len(sub)}")
    for env, saved in zip(sub, state):
        set_env_state(env, saved)
