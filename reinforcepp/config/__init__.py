"""Typed, flat, validated configuration shared by the trainers.

A config is a dataclass whose fields are declared with :func:`option` (default + help text).
The same object is built from a YAML file, ``key=value`` command-line overrides, or keyword
arguments in Python, and validated once: unknown keys name the nearest valid key, closed
choices (``Literal``) are checked, and each trainer's ``validate()`` refuses impossible
combinations before anything heavy is loaded. Other tools' names for the options (TRL,
Stable-Baselines3), which the unknown-key errors and docs/lm.md's table use, are in :mod:`.names`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ..errors import InputError
from .names import OTHER_NAMES, OtherName, hint_text, other_name, suggest


class ConfigError(InputError, ValueError):
    """A configuration that cannot run, with a message saying why and how to fix it."""


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: every float option ends up in float32 tensors or arithmetic."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping of key: value (an empty file is ``{}``). A file that
    cannot be read, is not UTF-8 text, is not valid YAML or holds something other than a mapping
    (a list, a number) is a :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); "
                          "a config file is a YAML mapping of key: value") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of key: value, got a {type(loaded).__name__}")
    return dict(loaded)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in a few words: the problem and where (line and column, counted from 1)."""
    problem = getattr(error, "problem", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _yaml_value(name: str, value: str, what: str) -> Any:
    """``value`` (a command-line string) parsed as YAML, or a ConfigError naming the key."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}={value!r} is not a valid {what} ({_yaml_problem(e)})") from None


def option(default: Any, help: str) -> Any:
    """A config field with its default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


C = TypeVar("C", bound="Config")

def other_names_table(cls: type[Config], tool: str) -> str:
    """The names ``tool`` (``"TRL"``) uses for ``cls``'s options, as a Markdown table (docs/lm.md)."""
    valid = cls.field_types()
    rows = [f"| {tool} | here |", "|---|---|"]
    for name in OTHER_NAMES:
        found = other_name(name, valid)
        if found is not None and found.tool == tool:
            rows.append(f"| `{name}` | {hint_text(found)} |")
    return "\n".join(rows)


def unknown_keys_error(keys: typing.Sequence[str], valid: list[str], what: str = "config key") -> ConfigError:
    """One error naming every unknown key at once, each with its likely meaning (another tool's
    name for it, :mod:`.names`)."""
    keys = list(dict.fromkeys(keys))
    parts = [f"{k!r}{suggest(k, valid)}" for k in keys]
    tail = "; --list-options prints the valid keys" if not any(suggest(k, valid) for k in keys) else ""
    if len(keys) == 1:
        return ConfigError(f"unknown {what} {parts[0]}{tail}")
    return ConfigError(f"{len(keys)} unknown {what}s: " + " | ".join(parts) + tail)


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
        if value is None or (
            isinstance(value, str) and value.lower() in ("none", "null", "") and value not in literal_choices
        ):
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
            if value.startswith("["):
                value = _yaml_value(name, value, "list ([a, b] or a,b)")
            else:
                value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, inner) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str) and value.startswith("{"):
            value = _yaml_value(name, value, "mapping ({key: value})")
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


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML or the command line) as the option type ``tp``; a
    :class:`ConfigError` naming ``name`` when it is not one."""
    return _coerce(name, value, tp)


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
        unknown = [key for key in values if key not in types_]
        if unknown:
            raise unknown_keys_error(unknown, list(types_))
        cfg = cls(**{k: _coerce(k, v, types_[k]) for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
        """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
        values: dict[str, Any] = read_config_file(path) if path is not None else {}
        values.update(parse_overrides(overrides or []))
        return cls.from_dict(values)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key's default value."""
        def default(f: Any) -> Any:
            if f.default is not dataclasses.MISSING:
                return f.default
            return typing.cast(typing.Callable[[], Any], f.default_factory)()

        return {f.name: default(f) for f in dataclasses.fields(cls)}

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
            _check_floats(name, getattr(self, name))

    SECTIONS: ClassVar[tuple[tuple[str, str], ...]] = ()
    """``(first key of a section, its title)`` in declaration order: ``--list-options`` and the
    docs group the keys by topic (a key joins the section declared last before it)."""
    COMMON: ClassVar[tuple[str, ...]] = ()
    """The keys most runs set: listed first, under "Most used"."""

    @classmethod
    def describe(cls) -> str:
        """Every field with its type, default and help, as Markdown: one table, or with
        :attr:`SECTIONS` / :attr:`COMMON` one table per topic (``### Title``), the common keys first."""
        header = ["| key | type | default | meaning |", "|---|---|---|---|"]
        rows: dict[str, str] = {}
        for f, (name, tp) in zip(dataclasses.fields(cls), cls.field_types().items()):
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = typing.cast(typing.Callable[[], Any], f.default_factory)()
            rows[name] = f"| `{name}` | {type_name(tp)} | `{default!r}` | {f.metadata.get('help', '')} |"
        if not cls.SECTIONS and not cls.COMMON:
            return "\n".join(header + list(rows.values()))
        starts = dict(cls.SECTIONS)
        groups: dict[str, list[str]] = {"Most used": [k for k in cls.COMMON if k in rows]} if cls.COMMON else {}
        title = "Other"
        for name in rows:
            title = starts.get(name, title)
            if name not in cls.COMMON:
                groups.setdefault(title, []).append(name)
        # topics as declared, whatever the fields' order
        order = ["Most used", *(title for _, title in cls.SECTIONS), "Other"]
        ordered = sorted(groups.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        return "\n\n".join(f"### {t}\n\n" + "\n".join(header + [rows[k] for k in keys]) for t, keys in ordered if keys)


def type_name(tp: Any) -> str:
    """A field type as ``--list-options`` shows it: ``int``, ``str or None``, ``list of str``,
    ``k1/k2/k3`` for a closed choice."""
    origin = get_origin(tp)
    if origin is Literal:
        return "/".join(str(c) for c in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        name = " or ".join(type_name(a) for a in args)
        return f"{name} or None" if type(None) in get_args(tp) else name
    if origin in (list, tuple):
        inner = get_args(tp)
        return f"list of {type_name(inner[0])}" if inner else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check_floats(name: str, value: Any) -> None:
    """Every float option is finite and within float32's range (a list of floats: each); a
    learning rate (``lr``, ``*_lr``) ten times below it, since Adam's first step is
    ``lr / (1 - beta1) = 10 lr``."""
    values = value if isinstance(value, list) else [value]
    for x in values:
        if not isinstance(x, float):
            continue
        if not math.isfinite(x):
            raise ConfigError(f"{name} must be a finite number, got {x}")
        if abs(x) > FLOAT32_MAX:
            raise ConfigError(f"{name}={x:g} is beyond float32's range ({FLOAT32_MAX:.3g}), where it is used")
        if (name == "lr" or name.endswith("_lr")) and x > FLOAT32_MAX / 10:
            raise ConfigError(f"{name}={x:g} is too large: Adam's first step is 10 x {name}, beyond float32's range "
                              f"({FLOAT32_MAX:.3g})")


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
    pass through unchanged. An unknown ``--key`` becomes an item too (with the next word as its
    value unless that is another option or a YAML file), so that the config reports every
    unknown key at once, each with its nearest valid key.
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
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            takes_no_value = nxt is None or nxt.startswith("--") or "=" in nxt or nxt.endswith((".yaml", ".yml"))
            if key not in types_:
                value = "true" if takes_no_value else str(nxt)
                i += 0 if takes_no_value else 1
            elif types_[key] is bool and (nxt is None or nxt.lower() not in _TRUE_FALSE):
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
