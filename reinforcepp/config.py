"""Typed, flat, validated configuration shared by the trainers.

A config is a dataclass whose fields are declared with :func:`option` (default + help text).
The same object is built from a YAML file, ``key=value`` command-line overrides, or keyword
arguments in Python, and validated once: unknown keys name the nearest valid key, closed
choices (``Literal``) are checked, and each trainer's ``validate()`` refuses impossible
combinations before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration that cannot run, with a message saying why and how to fix it."""


def option(default: Any, help: str) -> Any:
    """A config field with its default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


C = TypeVar("C", bound="Config")


HINTS = {
    "learning_rate": "lr", "beta": "kl_coef", "num_generations": "samples_per_prompt", "max_steps": "total_steps",
    "max_completion_length": "max_new_tokens", "num_train_epochs": "epochs", "ppo_epochs": "epochs", "output": "output_dir",
    "model_name_or_path": "model", "n_envs": "num_envs", "n_steps": "steps_per_env", "total_timesteps": "total_env_steps",
    "ent_coef": "entropy_coef", "vf_coef": "value_coef", "clip_range": "eps_low", "gae_lambda": "lam", "env": "env_id",
    "tis_cap": "rollout_correction_high", "max_staleness": "async_rollouts",
}
"""Names other tools use for a key, and ours (checked against the config's keys)."""


def _initials(key: str) -> str:
    return "".join(word[0] for word in key.split("_") if word)


def _suggest(key: str, valid: list[str]) -> str:
    """The key a user most likely meant: a known name from another tool (``total_timesteps`` ->
    ``total_env_steps``), the initials of the words (``learning_rate`` -> ``lr``), then the
    closest spelling."""
    meant = HINTS.get(key.lower())
    if meant in valid:
        return f"; did you mean {meant!r}?"
    by_initials = [v for v in valid if "_" in key and v == _initials(key.lower())]
    if by_initials:
        return f"; did you mean {by_initials[0]!r}?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; --list-options prints the valid keys"


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        literal_choices = [c for a in args if get_origin(a) is Literal for c in get_args(a)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "") and value not in literal_choices):
            if type(None) in get_args(tp):
                return None
        errors = []
        for a in args:
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, inner) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str) and value.startswith("{"):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass
class Config:
    """Base class: construction from mappings, YAML and overrides, and type checking."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        types_ = cls.field_types()
        for key in values:
            if key not in types_:
                raise ConfigError(f"unknown config key {key!r}" + _suggest(key, list(types_)))
        cfg = cls(**{k: _coerce(k, v, types_[k]) for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
        """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the config file must be a mapping of key: value")
            values.update(loaded)
        values.update(parse_overrides(overrides or []))
        return cls.from_dict(values)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with ``changes`` applied (same checks as ``from_dict``)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:
        """Check and convert every field to its declared type (so ``LMConfig(lr="1e-5")`` holds a
        float), check closed choices; subclasses add cross-field rules (and call super)."""
        for name, tp in self.field_types().items():
            setattr(self, name, _coerce(name, getattr(self, name), tp))

    @classmethod
    def describe(cls) -> str:
        """Every field with its type, default and help, as a Markdown table."""
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f, (name, tp) in zip(dataclasses.fields(cls), cls.field_types().items()):
            default = f.default if f.default is not dataclasses.MISSING else typing.cast(typing.Callable[[], Any], f.default_factory)()
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            rows.append(f"| `{name}` | {tname.replace('|', 'or')} | `{default!r}` | {f.metadata.get('help', '')} |")
        return "\n".join(rows)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-5", "estimator=grpo"]`` -> ``{"lr": "1e-5", "estimator": "grpo"}`` (strings;
    typed by the config). A bare word without ``=`` is an error."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip().lstrip("-").replace("-", "_")] = value
    return out


_TRUE_FALSE = ("true", "false", "1", "0", "yes", "no", "on", "off")


def cli_items(argv: list[str], cls: type[Config], flags: tuple[str, ...] = ("-h", "--help")) -> list[str]:
    """Command-line words in either spelling -> ``key=value`` items for ``cls``.

    Every command takes ``key=value`` (the canonical form, as in ``reinforcepp train``) and the
    argparse/TRL spellings of the same keys: ``--key value``, ``--key=value``, with ``-`` or
    ``_`` in the name (``--output-dir out`` = ``output_dir=out``); a bare ``--flag`` of a bool
    field means true. Words in ``flags`` and positional words without ``=`` (a CONFIG.yaml)
    pass through unchanged. An unknown ``--key`` is a :class:`ConfigError` naming the nearest key.
    """
    types_ = cls.field_types()
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word in flags or not word.startswith("--"):
            out.append(word)
            continue
        key, eq, value = word[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_:
            raise ConfigError(f"unknown option {word.split('=')[0]!r}" + _suggest(key, list(types_)))
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if types_[key] is bool and (nxt is None or nxt.lower() not in _TRUE_FALSE):
                value = "true"
            elif nxt is None or (nxt.startswith("--") and nxt not in ("--",)):
                raise ConfigError(f"option {word!r} needs a value: {word} VALUE or {key}=VALUE")
            else:
                value = nxt
                i += 1
        out.append(f"{key}={value}")
    return out


@dataclasses.dataclass
class TrustRegionOptions(Config):
    """How far one update may move the policy (docs/algorithms.md, "Trust regions: clipping and the
    natural gradient"): the options both trainers share. Each trainer refuses, with
    ``trust_region=natural``, the options of its own it cannot honour."""

    trust_region: Literal["clip", "natural"] = option(
        "clip", "clip: PPO's clipped ratio, epochs x mini-batches of Adam steps on the policy; natural: one TRPO "
        "natural-gradient step of the policy per rollout on mean(ratio * A) (conjugate gradient, KL line search); "
        "the optimizer's settings then apply to the critic (gae) only")
    max_kl: float = option(
        0.01, "natural: trust-region radius, the mean KL from the old to the new policy over the rollout's states "
        "that one step may reach (TRPO, modular_rl, SB3-contrib: 0.01)")
    cg_iters: int = option(
        10, "natural: conjugate-gradient iterations solving (F + cg_damping I) s = g "
        "(Spinning Up: 10; SB3-contrib: 15)")
    cg_damping: float = option(
        0.1, "natural: damping added to the Fisher matrix (Spinning Up, SB3-contrib: 0.1; modular_rl: 1e-3)")
    line_search_steps: int = option(
        10, "natural: step fractions 1, shrink, shrink^2, ... tried by the backtracking line search")
    line_search_shrink: float = option(
        0.5, "natural: factor between two line-search tries (modular_rl: 0.5; SB3-contrib: 0.8)")

    def validate(self) -> None:
        super().validate()
        if self.max_kl <= 0:
            raise ConfigError(f"max_kl must be > 0, got {self.max_kl}")
        if self.cg_iters < 1:
            raise ConfigError(f"cg_iters must be >= 1, got {self.cg_iters}")
        if self.cg_damping < 0:
            raise ConfigError(f"cg_damping must be >= 0, got {self.cg_damping}")
        if self.line_search_steps < 1:
            raise ConfigError(f"line_search_steps must be >= 1, got {self.line_search_steps}")
        if not 0 < self.line_search_shrink < 1:
            raise ConfigError(f"line_search_shrink must lie in (0, 1), got {self.line_search_shrink}")
