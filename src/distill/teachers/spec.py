"""What the teacher options name: a local model, a model behind an endpoint, a logits cache, or the
student itself (Teacher = Local | Endpoint | Cache | Self), read once, the same way in every command.

- ``--teacher self``: the student teaches itself (train's self-distillation);
- ``--teacher NAME=TEACHER,NAME=TEACHER``: several teachers, each resolved as one ``--teacher`` is (a
  served one by ``--teacher-url NAME=URL,...``), one per example by ``--route-field`` (train's routing);
- ``--teacher DIR`` where DIR holds a ``distill logits`` cache (``index.json``): the cache;
- ``--teacher-url URL``: the model served there, under ``--teacher-model``, else the preset's model,
  else ``--teacher`` taken as the served name;
- a preset with a ``base_url`` (``teachers/*.yaml``, ``kind: api``): that endpoint;
- else a local model: a preset's ``model``, a directory, a ``.gguf`` file or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from distill.errors import DistillError
from distill.options import Teacher

Kind = Literal["local", "endpoint", "cache", "self", "routed"]


@dataclass(frozen=True)
class TeacherSpec:
    kind: Kind
    name: str                     # as the user named it, for logs and run records
    model: str | None             # local: what transformers loads; endpoint: the model's name on the server
    urls: tuple[str, ...] = ()    # endpoint: its base URLs
    preset: dict = field(default_factory=dict)
    members: dict[str, "TeacherSpec"] = field(default_factory=dict)  # routed: each name's teacher

    @property
    def scores_tokens(self) -> bool:
        """Whether it can give log-probs of given tokens (DeepSeek's API cannot: ``logprobs: false``)."""
        return self.preset.get("logprobs") is not False

    @property
    def where(self) -> str:
        return self.preset.get("preset_file") or self.name


def resolve(teacher: Teacher) -> TeacherSpec | None:
    """The teacher the options name (None when they name none)."""
    from distill.models import load_preset, resolve_preset

    name, urls = teacher.name, tuple(teacher.url or ())
    if name and "=" in name:
        return _routed(teacher)
    if name == "self":
        if urls or teacher.model:
            raise DistillError("--teacher self is the student itself: leave out --teacher-url and --teacher-model")
        return TeacherSpec("self", "self", None)
    if name and (Path(name) / "index.json").is_file():
        return TeacherSpec("cache", name, name)
    if urls:
        preset = load_preset("teachers", name) if name and resolve_preset("teachers", name) else {}
        served = teacher.model or preset.get("model") or name
        if not served:
            raise DistillError("--teacher-url needs the served model's name: --teacher NAME (or --teacher-model)")
        return TeacherSpec("endpoint", name or served, served, urls, preset)
    if not name:
        if teacher.model:
            raise DistillError("--teacher-model names the model on a server: add --teacher-url")
        return None
    preset = load_preset("teachers", name)
    if preset.get("base_url") or preset.get("kind") == "api":
        if not preset.get("base_url"):
            raise DistillError(f"{preset.get('preset_file', name)}: field 'base_url' missing (or pass --teacher-url)")
        base = preset["base_url"]
        return TeacherSpec("endpoint", name, teacher.model or preset.get("model"),
                           tuple(base if isinstance(base, list) else [base]), preset)
    if not preset.get("model"):
        raise DistillError(f"{preset.get('preset_file', name)}: teacher preset has no 'model'")
    return TeacherSpec("local", name, str(preset["model"]), (), preset)


def _named(items: list[str], option: str) -> dict[str, list[str]]:
    """``NAME=VALUE`` items -> {name: [values]} (a name may repeat: a served teacher's replicas)."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (sep and key.strip() and value.strip()):
            raise DistillError(f"{option}: with several teachers each item is NAME=VALUE, got {item!r}")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _routed(teacher: Teacher) -> TeacherSpec:
    """Several named teachers: each resolved as a ``--teacher`` of its own (with its ``--teacher-url``)."""
    if teacher.model:
        raise DistillError("--teacher-model names one served model; with several teachers name each in --teacher "
                           "(NAME=MODEL) beside its --teacher-url NAME=URL")
    names = _named(teacher.name.split(","), "--teacher")
    repeated = [key for key, values in names.items() if len(values) > 1]
    if repeated:
        raise DistillError(f"--teacher: teacher '{repeated[0]}' is named twice")
    urls = _named(list(teacher.url or ()), "--teacher-url")
    unknown = sorted(set(urls) - set(names))
    if unknown:
        raise DistillError(f"--teacher-url: '{unknown[0]}' is not one of the teachers ({', '.join(names)})")
    members = {}
    for key, (value,) in names.items():
        if value == "self" and key in urls:
            raise DistillError(f"--teacher {key}=self is the student itself: it has no --teacher-url")
        member = resolve(replace(teacher, name=value, url=urls.get(key)))
        if member.kind == "routed":
            raise DistillError(f"--teacher {key}={value}: a teacher of several teachers cannot be one of them")
        members[key] = member
    return TeacherSpec("routed", teacher.name, None, members=members)
