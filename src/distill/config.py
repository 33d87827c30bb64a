"""Configuration: dataclasses per command, filled from defaults < presets < YAML < flags.

Every command's options are one dataclass beside its command (TRL style). The CLI turns each
field into a flag, a ``--config FILE.yaml`` supplies a section of the same keys, and flags
override the file. Field metadata: ``help`` becomes the flag's help text; ``required: True``
makes :func:`build` refuse a run without it; ``aliases`` are former names, still accepted with a
note naming the new one (one name per meaning across commands). Fixed choices are ``Literal`` types.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.paths import asset_dir


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors naming the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DistillError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a mapping of keys at the top level")
    return data


def resolve_preset(kind: str, name_or_path: str) -> Path | None:
    """Find a preset by name (``teachers/deepseek-reasoner.yaml`` by ``deepseek-reasoner``) or path.

    Returns None when it is neither, so callers can treat the string as a model id/path.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise DistillError(f"{p}: {kind} preset file not found")
        return p
    candidate = asset_dir(kind) / f"{name_or_path}.yaml"
    return candidate if candidate.is_file() else None


def list_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in asset_dir(kind).glob("*.yaml"))


def _unwrap_optional(tp):
    """Optional[X] / X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """Convert a YAML/flag value to the field's type, or fail naming the source and field."""
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
    except (TypeError, ValueError) as e:
        raise DistillError(f"{source}: field '{name}': {e}") from None
    return value


def build(cls, *layers: tuple[str, dict]):
    """Make ``cls`` from (source, mapping) layers, later layers winning; unknown keys are errors."""
    types_ = field_types(cls)
    renamed = {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}
    values: dict[str, Any] = {}
    for source, mapping in layers:
        for key, value in (mapping or {}).items():
            norm = key.replace("-", "_")
            if norm in renamed:
                print(f"{source}: '{key}' is now '{renamed[norm]}' (the old name still works)", file=sys.stderr)
                norm = renamed[norm]
            if norm not in types_:
                known = ", ".join(sorted(types_))
                raise DistillError(f"{source}: unknown key '{key}' (known: {known})")
            values[norm] = coerce(value, types_[norm], key, source)
    missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
               if f.metadata.get("required") and values.get(f.name, f.default) in (None, "", [])]
    if missing:
        raise DistillError(f"missing {', '.join(missing)} (required)")
    try:
        return cls(**values)
    except TypeError as e:
        raise DistillError(f"{cls.__name__}: {e}") from None


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
    """A config as plain data for run records."""
    return dataclasses.asdict(cfg)
