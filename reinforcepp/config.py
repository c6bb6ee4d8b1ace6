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
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import InputError


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


@dataclasses.dataclass(frozen=True)
class OtherName:
    """What another tool's option is called here: ``keys`` (all of them options of the config
    at hand, else the entry does not apply to it), and a ``note`` when the two are not one to one."""

    tool: str
    keys: tuple[str, ...]
    note: str = ""


def _trl(*keys: str, note: str = "") -> OtherName:
    return OtherName("TRL", keys, note)


def _sb3(*keys: str, note: str = "") -> OtherName:
    return OtherName("Stable-Baselines3", keys, note)


OTHER_NAMES: dict[str, tuple[OtherName, ...]] = {
    # TRL's GRPOConfig (and the TrainingArguments it inherits, and its ModelConfig / ScriptArguments)
    "learning_rate": (_trl("lr"),),
    "beta": (_trl("kl_coef", note="TRL's beta > 0 puts a k3 KL in the loss, as estimator=grpo does; its default beta=0 is kl_placement=none"),),
    "num_generations": (_trl("samples_per_prompt"),),
    "max_completion_length": (_trl("max_new_tokens"),),
    "num_iterations": (_trl("epochs", note="passes over each rollout (TRL's mu)"),),
    "epsilon": (_trl("eps_low", "eps_high", note="TRL's epsilon sets both clips: ratio in [1 - eps_low, 1 + eps_high]"),),
    "epsilon_high": (_trl("eps_high"),),
    "delta": (_trl("dual_clip", note="TRL's two-sided clip caps the ratio of negative-advantage tokens at delta, which is the dual clip with c = delta"),),
    "loss_type": (_trl("loss_agg", "estimator", note="dapo and bnpo: loss_agg=token-mean (the default); grpo: loss_agg=seq-mean-token-mean; dr_grpo: estimator=dr_grpo"),),
    "sync_ref_model": (_trl("ref_update_every", note="set ref_update_every to TRL's ref_model_sync_steps"),),
    "ref_model_sync_steps": (_trl("ref_update_every"),),
    "ref_model_mixup_alpha": (_trl("ref_update_alpha"),),
    "use_vllm": (_trl("engine", note="engine=vllm (vLLM in this process, like TRL's colocate mode)"),),
    "vllm_mode": (_trl("engine", note="engine=vllm runs vLLM in this process (TRL's colocate mode); there is no server mode"),),
    "vllm_enable_sleep_mode": (_trl("vllm_sleep"),),
    "vllm_importance_sampling_correction": (_trl("rollout_correction", note="rollout_correction=truncate (or mask) turns it on"),),
    "vllm_importance_sampling_cap": (_trl("rollout_correction_high"),),
    "max_staleness": (_trl("async_rollouts", note="the largest staleness, in policy versions, of an asynchronous rollout"),),
    "per_device_train_batch_size": (_trl("micro_batch_size", note="responses per forward/backward"), _trl("batch_size")),
    "gradient_accumulation_steps": (_trl("mini_batch_size", note="responses per optimizer step = micro_batch_size x the micro-batches accumulated"),),
    "generation_batch_size": (_trl("prompts_per_step", "samples_per_prompt", note="a rollout is prompts_per_step x samples_per_prompt responses"),),
    "steps_per_generation": (_trl("mini_batch_size", note="optimizer steps per rollout = rollout / mini_batch_size"),),
    "num_generations_eval": (_trl("eval_samples"),),
    "max_steps": (_trl("total_steps"), _trl("steps")),
    "num_train_epochs": (_trl("total_steps", note="a run here is counted in steps (one rollout each), not in passes over the dataset"),
                         _trl("steps", note="counted in optimizer steps, not in passes over the dataset")),
    "logging_steps": (_trl("log_samples_every", note="every step's metrics are logged (metrics.jsonl, TensorBoard); sample completions every log_samples_every steps"),),
    "log_completions": (_trl("log_samples_every"),),
    "num_completions_to_print": (_trl("num_logged_samples"),),
    "save_steps": (_trl("save_every"),),
    "save_strategy": (_trl("save_every", note="checkpoints are counted in steps"),),
    "save_total_limit": (_trl("keep_last"),),
    "eval_steps": (_trl("eval_every"),),
    "eval_strategy": (_trl("eval_every", note="evaluation is counted in steps; 0 = never"),),
    "resume_from_checkpoint": (_trl("resume", note="--resume output_dir=RUN continues from the run's latest complete checkpoint"),),
    "report_to": (_trl("tensorboard", "wandb_project", note="TensorBoard is on by default; wandb_project=NAME adds W&B"),),
    "bf16": (_trl("dtype", note="dtype=bfloat16"),),
    "fp16": (_trl("dtype", note="dtype=float16"),),
    "torch_dtype": (_trl("dtype"),),
    "lr_scheduler_type": (_trl("lr_schedule"),),
    "warmup_ratio": (_trl("warmup_steps", note="counted in optimizer steps"),),
    "model_name_or_path": (_trl("model"),),
    "dataset_name": (_trl("train_data"), _trl("data")),
    "dataset_test_split": (_trl("eval_data"),),
    "use_peft": (_trl("lora_rank", note="LoRA is on when lora_rank > 0"),),
    "lora_r": (_trl("lora_rank"),),
    "assistant_only_loss": (_trl("messages_column", note="the loss is always on the assistant turns (or the completion) only"),),
    "completion_only_loss": (_trl("completion_column", note="the loss is always on the completion only"),),
    "output": (_trl("output_dir"),),
    "ppo_epochs": (_trl("epochs"),),
    # Stable-Baselines3's PPO (and gymnasium)
    "n_envs": (_sb3("num_envs"),),
    "n_steps": (_sb3("steps_per_env"),),
    "n_epochs": (_sb3("epochs"),),
    "total_timesteps": (_sb3("total_env_steps"),),
    "ent_coef": (_sb3("entropy_coef"),),
    "vf_coef": (_sb3("value_coef"),),
    "clip_range": (_sb3("eps_low", "eps_high", note="SB3's clip_range sets both clips"),),
    "gae_lambda": (_sb3("lam"),),
    "env": (_sb3("env_id"),),
    # this project's own earlier names
    "tis_cap": (OtherName("reinforcepp", ("rollout_correction", "rollout_correction_high"),
                          note="tis_cap=C is now rollout_correction=truncate rollout_correction_high=C"),),
    "run_dir": (OtherName("reinforcepp", ("output_dir",), note="the Gymnasium run folder is output_dir, as the language-model one"),),
}
"""Other tools' names for options, and ours. An entry applies to a config only when all its keys
are options of that config (``max_steps`` is ``total_steps`` for training, ``steps`` for sft)."""


def other_name(key: str, valid: typing.Collection[str]) -> OtherName | None:
    """The first entry of :data:`OTHER_NAMES` for ``key`` whose keys are all in ``valid``."""
    return next((o for o in OTHER_NAMES.get(key.lower(), ()) if all(k in valid for k in o.keys)), None)


def other_names_table(cls: type[Config], tool: str) -> str:
    """The names ``tool`` (``"TRL"``) uses for ``cls``'s options, as a Markdown table (docs/lm.md)."""
    valid = cls.field_types()
    rows = [f"| {tool} | here |", "|---|---|"]
    for name in OTHER_NAMES:
        found = other_name(name, valid)
        if found is not None and found.tool == tool:
            rows.append(f"| `{name}` | {_hint_text(found)} |")
    return "\n".join(rows)


def _hint_text(o: OtherName) -> str:
    keys = " and ".join(f"`{k}`" for k in o.keys)
    return f"{keys}: {o.note}" if o.note else keys


def _initials(key: str) -> str:
    return "".join(word[0] for word in key.split("_") if word)


def _suggest(key: str, valid: list[str]) -> str:
    """What a user most likely meant by the unknown ``key``: another tool's name for one of our
    options (``num_iterations`` -> ``epochs``), the initials of the words (``learning_rate`` ->
    ``lr``), then the closest spelling."""
    other = other_name(key, valid)
    if other is not None and len(other.keys) == 1 and not other.note:
        return f"; did you mean {other.keys[0]!r}?"
    if other is not None:
        keys = " and ".join(other.keys)
        return f" ({other.tool}'s name): here {keys}" + (f"; {other.note}" if other.note else "")
    by_initials = [v for v in valid if "_" in key and v == _initials(key.lower())]
    if by_initials:
        return f"; did you mean {by_initials[0]!r}?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_keys_error(keys: typing.Sequence[str], valid: list[str], what: str = "config key") -> ConfigError:
    """One error naming every unknown key at once, each with its likely meaning."""
    keys = list(dict.fromkeys(keys))
    parts = [f"{k!r}{_suggest(k, valid)}" for k in keys]
    tail = "; --list-options prints the valid keys" if not any(_suggest(k, valid) for k in keys) else ""
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
            default = f.default if f.default is not dataclasses.MISSING else typing.cast(typing.Callable[[], Any], f.default_factory)()
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
        order = ["Most used", *(title for _, title in cls.SECTIONS), "Other"]  # topics as declared, whatever the fields' order
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
