"""Options: declared once, in groups, built from defaults < recipe < flags.

A *group* is a dataclass of options that belong together (``options.Teacher``, ``options.Sampling``,
...); a command's config is a dataclass of groups and, rarely, options of its own (TRL's config
dataclasses, torchtune's recipe + config split). Every option is declared once, with
:func:`option`, and that one declaration gives:

- its flag: the field's name (``max_tokens`` -> ``--max-tokens``); in a group with a ``PREFIX`` the
  prefix comes first (``Teacher.url`` -> ``--teacher-url``) and a field called ``name`` is the prefix
  itself (``Teacher.name`` -> ``--teacher``); ``flag=`` names it outright;
- its ``help`` and its range (``check=at_least(1)`` ...), both shown in ``--help`` and the range
  checked when the config is built, before anything loads;
- its former names (``aliases``), still accepted with a one-line note, printed once; a source that
  sets an option under both names fails with one line naming both;
- ``required``, ``positional``, ``metavar``; fixed choices are ``Literal`` types.

A command's ``PRESETS`` names options whose value stands for a set of other options' values
(``eval --protocol deepseek-r1``): those are laid under the layer that names it, so flags and the
recipe still set any of them, each with a note (:func:`build`).

A recipe section sets the same options by the same flag names (``max_tokens: 64``) or nested by
group (``sampling: {max_tokens: 64}``); a group whose flag is its prefix takes a plain value as
that option (``teacher: qwen2.5-7b``) and a mapping as the group (``teacher: {name: .., url: ..}``).
The CLI makes one ``--help`` section per group (the first line of its docstring).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError

# ---------------------------------------------------------------- declaring options


@dataclass(frozen=True)
class Range:
    """A number's valid range, shown in --help and checked when a config is built."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def error(self, value) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        if isinstance(value, float) and math.isnan(value):
            return f"must be a number {self}, got nan"
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and value > self.high
        return f"must be {self}, got {value}" if too_low or too_high else None

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"<= {self.high:g}"


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, open_low=True)


def between(low: float, high: float) -> Range:
    return Range(low=low, high=high)


def option(default: Any = dataclasses.MISSING, *, help: str, check: Range | None = None,
           aliases: tuple[str, ...] = (), flag: str | None = None, required: bool = False,
           positional: bool = False, metavar: str | None = None,
           default_factory: Any = dataclasses.MISSING):
    """One option of a group or command config (see the module doc)."""
    metadata = {"help": help, "check": check, "aliases": tuple(aliases), "flag": flag, "required": required,
                "positional": positional, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def group(cls, only: tuple[str, ...] | None = None, required: tuple[str, ...] = (), **defaults):
    """A command config's field holding one group, with this command's own defaults for it; ``only``:
    the group's options this command takes (the others keep their defaults and have no flag);
    ``required``: the options it cannot run without."""
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"group": cls, "defaults": defaults, "only": only, "required": required})


# ---------------------------------------------------------------- the options of a config


@dataclass(frozen=True)
class Leaf:
    """One option as a command sees it: where it sits (``path``), its flag's key and its declaration."""

    path: tuple[str, ...]          # ("teacher", "url")
    key: str                       # "teacher_url": flag --teacher-url, recipe key teacher_url
    field: dataclasses.Field
    type: Any
    default: Any
    section: type | None           # the group class, None for a command's own option
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def meta(self) -> dict:
        return self.field.metadata


def _unwrap_optional(tp):
    """Optional[X] / X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_group(f: dataclasses.Field) -> bool:
    return "group" in f.metadata


def leaves(cls) -> list[Leaf]:
    """Every option of a command config, its groups' included, in declaration order."""
    out: list[Leaf] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_group(f):
            sub = f.metadata["group"]
            sub_hints = typing.get_type_hints(sub)
            prefix = getattr(sub, "PREFIX", None)
            for g in dataclasses.fields(sub):
                if f.metadata["only"] is not None and g.name not in f.metadata["only"]:
                    continue
                key = g.metadata.get("flag") or (prefix if g.name == "name" and prefix else
                                                 f"{prefix}_{g.name}" if prefix else g.name)
                default = f.metadata["defaults"].get(g.name, _default(g))
                out.append(Leaf((f.name, g.name), key, g, _unwrap_optional(sub_hints[g.name]), default, sub,
                                g.metadata.get("required") or g.name in f.metadata["required"]))
        else:
            out.append(Leaf((f.name,), f.metadata.get("flag") or f.name, f, _unwrap_optional(hints[f.name]),
                            _default(f), None, f.metadata.get("required", False)))
    keys = [leaf.key for leaf in out] + [old for leaf in out for old in leaf.field.metadata["aliases"]]
    assert len(keys) == len(set(keys)), f"{cls.__name__}: two options (or former names) share a flag"
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """Convert a YAML/flag value to the option's type, or fail naming the source and option."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError(f"expected true/false, got {value!r}")
        if tp in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            out = tp(value)
            if tp is int and isinstance(value, float) and value != out:
                raise ValueError(f"expected an integer, got {value!r}")
            return out
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(f"expected a single value, got {value!r}")
            return str(value)
        if origin is list:
            (item,) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"expected a list, got {value!r}")
            return [coerce(v, item, name, source) for v in value]
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {value!r}")
            return value
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
            return value
    except (TypeError, ValueError, OverflowError) as e:
        raise DistillError(f"{source}: option '{name}': {e}") from None
    return value


_NOTED: set[str] = set()


def _shown(name: str, source: str) -> str:
    """An option as the user wrote it: a flag, or a recipe key."""
    return "--" + name.replace("_", "-") if source == "flags" else name


def _note_once(message: str) -> None:
    """A note about the options, once per process (a recipe's steps and every rank say it once)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"distill: {message}", file=sys.stderr)


def _renamed(old: str, new: str) -> None:
    _note_once(f"'{old}' is now '{new}' (the old name still works)")


def _flatten(cls, source: str, mapping: dict, by_key: dict[str, Leaf]) -> dict[str, Any]:
    """A recipe section or flags -> {leaf key: value}: group sections opened, former names renamed.

    ``cls.RESHAPED`` maps a former option that became several to ``f(value, options so far) ->
    {key: value}``; what it returns replaces those options (``--on-policy 0.5`` next to ``--method kd``
    is ``--method on-policy --on-policy-fraction 0.5``)."""
    renamed = {old: leaf.key for leaf in by_key.values() for old in leaf.meta["aliases"]}
    reshaped = getattr(cls, "RESHAPED", {})
    sections = {f.name: f.metadata["group"] for f in dataclasses.fields(cls) if _is_group(f)}
    flat: dict[str, tuple[str, Any]] = {}  # leaf key -> (name as given, value)
    later: list[tuple[str, Any]] = []

    def put(given: str, key: str, value: Any) -> None:
        if key in flat:
            raise DistillError(f"{source}: '{flat[key][0]}' and '{given}' are the same option ('{key}'): keep one")
        flat[key] = (given, value)

    for raw, value in (mapping or {}).items():
        name = str(raw).replace("-", "_")
        if name in sections and isinstance(value, dict):
            group_cls = sections[name]
            inner = {leaf.path[1]: leaf.key for leaf in by_key.values() if leaf.path[0] == name}
            for sub, sub_value in value.items():
                sub_name = str(sub).replace("-", "_")
                key = inner.get(sub_name) or (sub_name if sub_name in inner.values() else None)
                if key is None:
                    raise DistillError(f"{source}: section '{name}': unknown option '{sub}' "
                                       f"(known: {', '.join(sorted(inner))}; {group_cls.__doc__.split(':')[0]})")
                put(f"{name}.{sub}", key, sub_value)
        elif name in renamed:
            _renamed(_shown(name, source), _shown(renamed[name], source))
            put(str(raw), renamed[name], value)
        elif name in reshaped:
            later.append((name, value))
        elif name in by_key:
            put(str(raw), name, value)
        else:
            known = ", ".join(sorted(by_key))
            raise DistillError(f"{source}: unknown option '{raw}' (known: {known})")
    out = {key: value for key, (given, value) in flat.items()}
    for name, value in later:
        new = reshaped[name](value, out, source)
        _renamed(_shown(name, source), " ".join(f"{_shown(k, source)} {v}" for k, v in new.items()))
        out.update(new)
    return out


def build(cls, *layers: tuple[str, dict]):
    """Make the command config ``cls`` from (source, mapping) layers, later layers winning.

    Unknown options, values of the wrong type or outside their range, and missing required options
    fail with one line naming the source and option. The options a layer set are kept on the config
    (``given(cfg)``), for the checks that depend on what the user asked for.
    """
    by_key = {leaf.key: leaf for leaf in leaves(cls)}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    flat = [(source, _flatten(cls, source, mapping, by_key)) for source, mapping in layers]
    flat, presets = _with_presets(cls, flat, by_key)
    for source, options in flat:
        for key, value in options.items():
            leaf = by_key[key]
            value = coerce(value, leaf.type, key, source)
            problem = leaf.meta["check"] and _range_error(leaf.meta["check"], value)
            if problem:
                raise DistillError(f"{source}: {leaf.flag} {problem}")
            values[key], origin[key] = value, source
    missing = [leaf.flag for leaf in by_key.values()
               if leaf.required and values.get(leaf.key, leaf.default) in (None, "", [])]
    if missing:
        raise DistillError(f"missing {', '.join(missing)} (required)")
    cfg = _assemble(cls, by_key, values)
    object.__setattr__(cfg, "_given", dict(origin))
    object.__setattr__(cfg, "_presets", presets)
    if hasattr(cfg, "validate"):  # what a command can check of its options before anything loads
        cfg.validate()
    return cfg


def _with_presets(cls, layers: list[tuple[str, dict]], by_key: dict[str, Leaf]) -> tuple[list, set[str]]:
    """The layers with each preset laid in, and the presets' sources.

    ``cls.PRESETS`` maps an option whose value stands for other options' values (``--protocol
    deepseek-r1``: its temperature, top-p, budget and k) to ``f(value) -> {key: value}``. Those values
    go just under the layer that names it, so that layer and the ones above still set any of them,
    each with a note that it replaces the preset's."""
    out, sources = list(layers), set()
    for key, expand in getattr(cls, "PRESETS", {}).items():
        naming = [i for i, (_, options) in enumerate(out) if options.get(key) is not None]
        if not naming:
            continue
        i = naming[-1]
        source = out[i][0]
        value = coerce(out[i][1][key], by_key[key].type, key, source)
        preset, label = expand(value), f"{key} {value}"
        for above, options in out[i:]:
            for k, v in options.items():
                if k in preset and coerce(v, by_key[k].type, k, above) != preset[k]:
                    _note_once(f"{above}: {_shown(k, above)} {v} replaces {label}'s {preset[k]}")
        out.insert(i, (label, preset))
        sources.add(label)
    return out, sources


def _range_error(check: Range, value) -> str | None:
    if isinstance(value, list):
        return next(filter(None, (check.error(v) for v in value)), None)
    return check.error(value)


def _assemble(cls, by_key: dict[str, Leaf], values: dict[str, Any]):
    own: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        leaf = by_key[key]
        if len(leaf.path) == 1:
            own[leaf.path[0]] = value
        else:
            groups.setdefault(leaf.path[0], {})[leaf.path[1]] = value
    for f in dataclasses.fields(cls):
        if _is_group(f):
            own[f.name] = f.metadata["group"](**{**f.metadata["defaults"], **groups.get(f.name, {})})
    return cls(**own)


def make(cls, **options):
    """A config from Python, by the options' flag names (``make(TrainConfig, student=..., lr=1e-4)``):
    the same checks, former names and defaults as flags and recipes."""
    return build(cls, ("python", options))


def replace(cfg, **options):
    """``cfg`` with some options changed (by flag name), checked again."""
    by_key = {leaf.key: leaf for leaf in leaves(type(cfg))}
    kept = {key: _value(cfg, by_key[key]) for key in given(cfg) if outright(cfg, key)}
    return build(type(cfg), ("python", {**kept, **options}))


def _value(cfg, leaf: Leaf):
    holder = getattr(cfg, leaf.path[0]) if len(leaf.path) == 2 else cfg
    return getattr(holder, leaf.path[-1])


def given(cfg) -> dict[str, str]:
    """The options a user set for this config (flag keys), each with where it was set."""
    return getattr(cfg, "_given", {})


def outright(cfg, key: str) -> bool:
    """Whether an option was set itself (by a flag, a recipe or Python), not left at its default or set
    by a preset (``PRESETS``)."""
    origin = given(cfg).get(key)
    return origin is not None and origin not in getattr(cfg, "_presets", set())


def refuse_foreign(cfg, foreign: dict[str, str]) -> None:
    """Options that were set but do not apply to this run (``{flag key: why}``): set by flags, one line
    naming them all ends the command; set by a recipe (whose steps may share settings through YAML
    anchors), one note each, once."""
    origin = given(cfg)
    from_flags = {k: why for k, why in foreign.items() if origin.get(k) in ("flags", "python")}
    for key, why in foreign.items():
        if key not in from_flags:
            _note_once(f"{origin.get(key)}: '{key}' is ignored ({why})")
    if from_flags:
        names = ", ".join("--" + k.replace("_", "-") for k in from_flags)
        reasons = "; ".join(sorted(set(from_flags.values())))
        raise DistillError(f"{names}: {reasons}; leave {'it' if len(from_flags) == 1 else 'them'} out")


# ---------------------------------------------------------------- recipe files


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors naming the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DistillError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DistillError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a mapping of keys at the top level")
    return data


def config_section(path: str | Path, command: str) -> dict:
    """The ``command:`` section of a recipe file (``train:`` for ``distill train``)."""
    data = load_yaml(path)
    if command in data:
        section = data[command]
        if not isinstance(section, dict):
            raise DistillError(f"{path}: section '{command}' must be a mapping")
        return section
    if "pipeline" in data:
        steps = [s[command] for s in data["pipeline"] if isinstance(s, dict) and command in s]
        if len(steps) == 1:
            return steps[0]
    raise DistillError(f"{path}: no '{command}:' section (sections: {', '.join(data) or 'none'})")


def to_dict(cfg) -> dict:
    """A config as plain data for run records, by group."""
    return dataclasses.asdict(cfg)
