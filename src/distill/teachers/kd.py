"""The KD teacher a training run needs, built from what ``--teacher`` names (``spec.TeacherSpec``).

One builder per kind of teacher, in :data:`BUILDERS` (a local model, a served one, a logits cache,
several routed by a field of each example, the student itself shown privileged context):
``build`` picks the builder by the spec's kind, so a new kind of teacher (several routed teachers,
the student as its own teacher) is one more entry, not another branch in the trainer. Each builder
returns a :class:`Built`: the object the KD trainer asks for scores (``sources.Teacher``), what the
run record says of it, and where it lives.
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


def build(spec: TeacherSpec, request: Request, student: Student) -> Built:
    """The teacher ``spec`` names, by its kind's builder."""
    if spec.kind not in BUILDERS:
        raise DistillError(f"--teacher {spec.name}: a {spec.kind} teacher cannot teach by KD yet")
    return BUILDERS[spec.kind](spec, request, student)


def _cached(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.sources import CachedTeacher

    if request.on_policy:
        raise DistillError("--method on-policy needs a teacher that scores the student's own tokens; a logits "
                           "cache covers only the traces' tokens")
    teacher = CachedTeacher.open(spec.model, student.tokenizer, student.examples, student=student.name,
                                 traces=student.traces, kd_temperature=request.kd.temperature,
                                 student_rows=student.rows)
    header = teacher.cache.header
    return Built(teacher, {"mode": "offline", "teacher": header["teacher"], "cache": spec.model, "cache_header": header},
                 f"none in the run: its logits cache {spec.model}")


def _served(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.served import ServedTeacher

    top_k = request.options.top_logprobs
    if not spec.scores_tokens:
        raise DistillError(f"teacher '{spec.name}' ({spec.where}) gives no log-probs (logprobs: false): train on "
                           f"its traces with --method sft")
    if request.kd.temperature != 1.0:  # a server's log-probs are its own distribution (vLLM ignores T for them)
        raise DistillError(f"--kd-temperature {request.kd.temperature}: a served teacher's log-probs are at "
                           f"temperature 1 and cannot be re-tempered; leave --kd-temperature at 1")
    if top_k == 0 and not request.on_policy:
        raise DistillError("--top-logprobs 0 (sampled tokens only) is an on-policy estimator: use --method on-policy")
    teacher = ServedTeacher(base_url=list(spec.urls), model=spec.model, top_k=top_k, tokenizer=student.tokenizer,
                            student=student.name, vocab_size=student.rows, endpoint=request.endpoint)
    where = teacher.client.base_url
    return Built(teacher, {"mode": "served", "teacher": f"{spec.model} at {where}", "top_k": top_k},
                 f"served at {where}")


def _online(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.distributed import sharded_run
    from distill.teachers.sources import OnlineTeacher

    sharded = sharded_run()  # the student's device (the Trainer moves it there), or sharded like it
    if request.device and sharded == "ZeRO-3":
        raise DistillError("--teacher-device: under ZeRO-3 transformers loads every model partitioned, so the "
                           "online teacher is sharded with the student (drop --teacher-device, or use FSDP2)")
    teacher = OnlineTeacher.load(spec.name, student.tokenizer, student.name, request.device or student.device,
                                 student.rows, shard=None if request.device else sharded, attn=student.attention)
    return Built(teacher, {"mode": "online", "teacher": spec.name}, teacher.placement)


def _routed(spec: TeacherSpec, request: Request, student: Student) -> Built:
    from distill.teachers.routed import RoutedTeacher, prompt_routes, routes

    field, default = request.options.route_field, request.options.route_default  # checked by TrainConfig.validate
    by_example = routes(student.examples, student.origins, field, list(spec.members), default)
    by_prompt = prompt_routes(student.examples, by_example, student.origins) if request.on_policy else {}
    built = {name: build(member, request, student) for name, member in spec.members.items()}
    examples = {name: sum(route == name for route in by_example.values()) for name in spec.members}
    record = {"mode": "routed", "route_field": field, "route_default": default,
              "teachers": {name: {**b.record, "examples": examples[name]} for name, b in built.items()}}
    return Built(RoutedTeacher({name: b.teacher for name, b in built.items()}, by_example, by_prompt), record,
                 "; ".join(f"{name}: {b.placement}" for name, b in built.items()))


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
