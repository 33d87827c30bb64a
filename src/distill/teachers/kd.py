"""The KD teacher a training run needs, built from what ``--teacher`` names (``spec.TeacherSpec``).

One builder per kind of teacher, in :data:`BUILDERS` (a local model, a served one, a logits cache,
several routed by a field of each example, the student itself shown privileged context):
``build`` picks the builder by the spec's kind, so a new kind of teacher (several routed teachers,
the student as its own teacher) is one more entry, not another branch in the trainer. Each builder
returns a :class:`Built`: the object the KD trainer asks for scores (``sources.Teacher``), what the
run record says of it, and where it lives.

A teacher of another tokenizer than the student's (:func:`other_tokenizers`: by vocabulary, not by
name) is built aligned (``sources.AlignedOnlineTeacher``, ``served.AlignedServedTeacher``,
``sources.AlignedCachedTeacher``; ``teachers.align``); with the student's tokenizer, as before, bit
for bit. The run record's ``kd.tokenizers`` says which (``same`` or ``cross``), and
:func:`alignment` how the text aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from distill.errors import DistillError
from distill.kd_losses import KDSettings
from distill.options import Endpoint, Teacher
from distill.teachers.spec import TeacherSpec


@dataclass
class Student:
    """What a teacher is built against: the student's tokenizer, its examples and output rows, where
    and how its forward pass runs, the model itself (the self-teacher's start) and where each example
    came from (``origins.Origin`` by ``example_index``: what routing and the self-teacher's context read)."""

    name: str
    tokenizer: Any
    examples: list
    rows: int
    device: str
    attention: str | None = None
    traces: str | None = None
    teacher_tokenizer: Any = None  # the teacher's, where it is another (the examples carry its tokens too)
    cross_teachers: frozenset = frozenset()  # the teachers that have it (``other_tokenizers``' names)
    model: Any = None
    origins: dict | None = None
    _frozen: Any = field(default=None, repr=False)

    def frozen(self):
        """The starting student, frozen (``frozen.FrozenStudent``), made once: the self-teacher and the
        anchor share it."""
        from distill.distributed import sharded_run
        from distill.teachers.frozen import FrozenStudent

        if self._frozen is None:
            if sharded_run():
                raise DistillError(f"--teacher self and --anchor-weight read the starting student whole; under "
                                   f"{sharded_run()} it is sharded: train on one GPU per process (DDP) or with --lora")
            self._frozen = FrozenStudent(self.model)
        return self._frozen


@dataclass
class Built:
    teacher: Any
    record: dict = field(default_factory=dict)  # the run record's ``kd`` entry for it
    placement: str = ""                         # where it lives (``distributed.describe``)


@dataclass
class Request:
    """What a run asks of its teacher: the options it was named by, how its endpoint is asked, the loss,
    whether it scores the student's own samples, and a device of its own (``--teacher-device``)."""

    options: Teacher
    endpoint: Endpoint
    kd: KDSettings
    on_policy: bool = False
    device: str | None = None


#: --top-logprobs where it is not given: a server's usual limit (vLLM's default --max-logprobs is 20);
#: a local teacher of another tokenizer, whose rows are mapped a top-k at a time (the bench's default)
SERVED_TOP_K, ALIGNED_TOP_K = 20, 128


def build(spec: TeacherSpec, request: Request, student: Student) -> Built:
    """The teacher ``spec`` names, by its kind's builder."""
    from distill.teachers.align import describe

    if spec.kind not in BUILDERS:
        raise DistillError(f"--teacher {spec.name}: a {spec.kind} teacher cannot teach by KD yet")
    built = BUILDERS[spec.kind](spec, request, student)
    counts = alignment(built.teacher)
    if counts is not None:
        print(f"kd: teacher '{spec.name}' has another tokenizer than student '{student.name}': its text is aligned "
              f"to the student's (teachers/align.py); {describe(counts)}", flush=True)
    return built


def other_tokenizers(spec: TeacherSpec | None, options: Teacher, student_tokenizer) -> dict[str, Any]:
    """The teachers of another tokenizer than the student's (``sources.same_tokenizer``), by name (a routed
    teacher's members by route), with that tokenizer, loaded once here. Then each example is rendered for
    both (``rendering.load_examples(..., teacher_tokenizer=)``) and those teachers are built aligned. A
    local teacher's is its model's; a served one's is ``--teacher-tokenizer`` or one found without the
    server (``sources.served_tokenizer``), else the student's is taken; a logits cache holds its own
    vocabulary (aligned when it is opened). Several teachers may share one other tokenizer (each example
    carries its tokens for one), not two: that fails in one line."""
    from distill.teachers.sources import same_tokenizer

    members = dict(spec.members) if spec is not None and spec.kind == "routed" else {spec.name: spec} if spec else {}
    if options.tokenizer and not any(m.kind == "endpoint" for m in members.values()):
        raise DistillError(f"--teacher-tokenizer {options.tokenizer}: it names a served teacher's tokenizer "
                           f"(--teacher-url); a local teacher or a logits cache has its own")
    others = {name: tok for name, member in members.items()
              if (tok := _tokenizer(member, options)) is not None and not same_tokenizer(student_tokenizer, tok)}
    names = list(others)
    for name in names[1:]:
        if not same_tokenizer(others[names[0]], others[name]):
            raise DistillError(f"--teacher: teachers '{names[0]}' and '{name}' have two tokenizers, both other than "
                               f"the student's; several teachers may share one other tokenizer, not two (each "
                               f"example carries its tokens for one)")
    return others


def _tokenizer(spec: TeacherSpec, options: Teacher):
    """A local or served teacher's tokenizer (None: another kind, or a served one's cannot be found)."""
    from distill.teachers.sources import served_tokenizer, teacher_tokenizer as local_tokenizer

    if spec.kind == "local":
        return local_tokenizer(spec.name)
    return served_tokenizer(spec, options.tokenizer) if spec.kind == "endpoint" else None


def alignment(teacher) -> dict | None:
    """How the text aligned so far, for a teacher of another tokenizer (``align.Alignment.counts``: the
    student tokens by kind, the bytes found in the teacher's text); None for one of the student's."""
    from distill.teachers.align import KINDS

    counts = getattr(teacher, "counts", None)
    if counts is None:
        return None
    return {name: int(counts.get(name, 0)) for name in (*KINDS.values(), "matched_bytes", "bytes")}


def _side(spec: TeacherSpec, student: Student):
    """The teacher's side of the student's examples (its tokens, aligned once each)."""
    from distill.teachers.align import TeacherSide

    return TeacherSide(student.examples, student.tokenizer, student.teacher_tokenizer, student.name, spec.name)


def _cross(tokenizer) -> dict:
    """The run record of a teacher of another tokenizer: which one."""
    return {"tokenizers": "cross",
            "teacher_tokenizer": f"{tokenizer.name_or_path} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"}


def _cached(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.sources import CachedTeacher

    if request.on_policy:
        raise DistillError("--method on-policy needs a teacher that scores the student's own tokens; a logits "
                           "cache covers only the traces' tokens")
    teacher = CachedTeacher.open(spec.model, student.tokenizer, student.examples, student=student.name,
                                 traces=student.traces, kd_temperature=request.kd.temperature,
                                 student_rows=student.rows)
    header = teacher.cache.header
    tokenizers = "same" if alignment(teacher) is None else "cross"
    return Built(teacher, {"mode": "offline", "teacher": header["teacher"], "cache": spec.model, "cache_header": header,
                           "tokenizers": tokenizers}, f"none in the run: its logits cache {spec.model}")


def _served(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.served import AlignedServedTeacher, ServedTeacher

    top_k = request.options.top_logprobs if request.options.top_logprobs is not None else SERVED_TOP_K
    if not spec.scores_tokens:
        raise DistillError(f"teacher '{spec.name}' ({spec.where}) gives no log-probs (logprobs: false): train on "
                           f"its traces with --method sft")
    if request.kd.temperature != 1.0:  # a server's log-probs are its own distribution (vLLM ignores T for them)
        raise DistillError(f"--kd-temperature {request.kd.temperature}: a served teacher's log-probs are at "
                           f"temperature 1 and cannot be re-tempered; leave --kd-temperature at 1")
    if top_k == 0 and not request.on_policy:
        raise DistillError("--top-logprobs 0 (sampled tokens only) is an on-policy estimator: use --method on-policy")
    if student.teacher_tokenizer is None:
        teacher = ServedTeacher(base_url=list(spec.urls), model=spec.model, top_k=top_k, tokenizer=student.tokenizer,
                                student=student.name, vocab_size=student.rows, endpoint=request.endpoint)
        where, tokenizers = teacher.client.base_url, {"tokenizers": "same"}
    else:
        teacher = AlignedServedTeacher.connect(side=_side(spec, student), student_rows=student.rows,
                                               base_url=list(spec.urls), model=spec.model, top_k=top_k,
                                               endpoint=request.endpoint)
        where, tokenizers = teacher.served.client.base_url, _cross(student.teacher_tokenizer)
    return Built(teacher, {"mode": "served", "teacher": f"{spec.model} at {where}", "top_k": top_k, **tokenizers},
                 f"served at {where}")


def _online(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.distributed import sharded_run
    from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher, local_teacher_path

    sharded = sharded_run()  # the student's device (the Trainer moves it there), or sharded like it
    if request.device and sharded == "ZeRO-3":
        raise DistillError("--teacher-device: under ZeRO-3 transformers loads every model partitioned, so the "
                           "online teacher is sharded with the student (drop --teacher-device, or use FSDP2)")
    device, shard = request.device or student.device, None if request.device else sharded
    if student.teacher_tokenizer is None:
        teacher = OnlineTeacher.load(spec.name, student.tokenizer, student.name, device, student.rows, shard=shard,
                                     attn=student.attention)
        return Built(teacher, {"mode": "online", "teacher": spec.name, "tokenizers": "same"}, teacher.placement)
    top_k = request.options.top_logprobs if request.options.top_logprobs is not None else ALIGNED_TOP_K
    if top_k < 1:
        raise DistillError("--top-logprobs 0: a teacher of another tokenizer is mapped onto the student's vocabulary "
                           f"a top-k at a time; give 1 or more (default {ALIGNED_TOP_K})")
    side = _side(spec, student)  # its forward pass runs on padded batches of its own tokens: its own attention
    online = OnlineTeacher.from_path(local_teacher_path(spec.name), device, student.rows, shard)
    teacher = AlignedOnlineTeacher(online, side, student.rows, top_k, request.kd.temperature, request.kd.chunk_size)
    return Built(teacher, {"mode": "online", "teacher": spec.name, "top_k": top_k,
                           **_cross(student.teacher_tokenizer)}, teacher.placement)


def _routed(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.routed import RoutedTeacher, prompt_routes, routes

    field, default = request.options.route_field, request.options.route_default  # checked by TrainConfig.validate
    by_example = routes(student.examples, student.origins, field, list(spec.members), default)
    by_prompt = prompt_routes(student.examples, by_example, student.origins) if request.on_policy else {}
    built = {name: build(member, request, _for(name, member, student)) for name, member in spec.members.items()}
    examples = {name: sum(route == name for route in by_example.values()) for name in spec.members}
    record = {"mode": "routed", "route_field": field, "route_default": default,
              "teachers": {name: {**b.record, "examples": examples[name]} for name, b in built.items()}}
    return Built(RoutedTeacher({name: b.teacher for name, b in built.items()}, by_example, by_prompt), record,
                 "; ".join(f"{name}: {b.placement}" for name, b in built.items()))


def _for(name: str, member: TeacherSpec, student: Student) -> Student:
    """The student as the routed teacher ``name`` sees it: with the teachers' other tokenizer only where that
    teacher has it (one of the student's tokenizer takes the same-tokenizer path)."""
    from dataclasses import replace

    if student.teacher_tokenizer is None or name in student.cross_teachers:
        return student
    if member.kind == "self":
        student.frozen()  # made once, shared with the anchor
    return replace(student, teacher_tokenizer=None)


def _self(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.frozen import SelfTeacher

    options = request.options  # TrainConfig.validate saw to --teacher-context
    frozen = student.frozen()
    teacher = SelfTeacher.build(frozen, student.tokenizer, student.examples, student.origins, options.context,
                                options.context_template)
    return Built(teacher, {"mode": "self", "teacher": "self", "context": options.context,
                           "context_template": options.context_template, "frozen": frozen.placement},
                 frozen.placement)


#: kind of teacher (``TeacherSpec.kind``) -> its builder
BUILDERS: dict[str, Callable[[TeacherSpec, Request, Student], Built]] = {
    "local": _online, "endpoint": _served, "cache": _cached, "routed": _routed, "self": _self,
}
