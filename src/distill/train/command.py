"""``distill train``: its options, checked before anything loads, and the run: SFT, logit
distillation (KD) or on-policy distillation.

Built on transformers' ``Trainer`` (accelerate underneath) so the same command scales from one
GPU to many with ``accelerate launch --config_file configs/accelerate/fsdp.yaml -m distill.cli
train ...`` (or DeepSpeed ZeRO-3 with ``configs/accelerate/zero3.yaml``). SFT and KD (online,
offline, served, on-policy) both run under FSDP2 and ZeRO-3: the chunked loss runs as the LM head's
forward pass with its sharded weight gathered (``distributed.as_output_layer``). The online teacher
is sharded over the same processes unless ``--teacher-device`` places it whole (FSDP2).

:func:`train` claims the output (``outputs.claim``: an earlier run there is continued with
``--resume`` or replaced with ``--overwrite``, never mixed), prepares the student
(``student.prepare``) and fits it (``fit``: the teacher, the Trainer, the saved model, the record).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distill.config import coerce, given, group, option, refuse_foreign
from distill.errors import DistillError
from distill.options import (KD, LoRA, Checkpoints, Endpoint, Grading, Output, Parallel, Precision, PromptFormat,
                             PromptSet, Render, Rollouts, Sampling, Schedule, Student, Teacher, Traces)

Method = Literal["sft", "kd", "on-policy"]


def _former_on_policy(value, options: dict, source: str) -> dict:
    """`--method on-policy --on-policy-fraction F` (0: `--method kd`)"""
    fraction = coerce(value, float, "on_policy", source)
    if fraction is None or fraction <= 0:
        return {}
    if options.get("method", "kd") != "kd":
        raise DistillError(f"{source}: --on-policy is on-policy distillation: use --method on-policy")
    return {"method": "on-policy", "on_policy_fraction": fraction}


@dataclass
class TrainConfig:
    method: Method = option("sft", help="sft: learn the traces' tokens; kd: also match the teacher's distributions "
                                        "on them; on-policy: the student writes, the teacher grades every token")
    student: Student = group(Student, required=("name",))
    traces: Traces = group(Traces)
    prompts: PromptSet = group(PromptSet, only=("path", "split", "prompt_field", "answer_field", "id_field", "limit"))
    format: PromptFormat = group(PromptFormat)
    render: Render = group(Render)
    schedule: Schedule = group(Schedule)
    teacher: Teacher = group(Teacher)
    endpoint: Endpoint = group(Endpoint, concurrency=8)
    kd: KD = group(KD)
    on_policy: Rollouts = group(Rollouts)
    sampling: Sampling = group(Sampling, temperature=1.0, top_p=1.0, top_k=0, max_tokens=1024)
    grading: Grading = group(Grading)
    lora: LoRA = group(LoRA)
    precision: Precision = group(Precision)
    parallel: Parallel = group(Parallel)
    checkpoints: Checkpoints = group(Checkpoints)
    output: Output = group(Output, required=("out",))
    resume: bool = option(False, help="continue the run in --out from its last checkpoint")

    RESHAPED = {"on_policy": _former_on_policy}

    @property
    def teaches(self) -> bool:
        return self.method != "sft"

    @property
    def same_run(self) -> dict:
        """What makes a training run the one ``--resume`` continues: the method, student, data and
        teacher (a run may continue with other steps or learning rates)."""
        return {"method": self.method, "student": self.student.name, "traces": self.traces.path,
                "prompts": self.prompts.path, "teacher": self.teacher.name, "teacher_url": self.teacher.url}

    def validate(self) -> None:
        """Everything that needs no model (``config.build`` asks when the options are read): options
        foreign to the method, and where the data comes from."""
        left_out, why = NOT_FOR[self.method]
        foreign = {key: why for key, _ in given(self).items() if key != "seed" and _section(self, key) in left_out}
        if not (self.lora.lora or self.lora.qlora):
            foreign.update({key: "they apply with --lora or --qlora" for key in given(self)
                            if key.startswith("lora_") or key == "merge"})
        refuse_foreign(self, foreign)
        if self.teaches and not (self.teacher.name or self.teacher.url):
            raise DistillError(f"--method {self.method} needs a teacher: --teacher (a preset, a local model, a "
                               "'distill logits' directory) or --teacher-url (a served one)")
        if self.method == "on-policy" and self.teacher.name and (Path(self.teacher.name) / "index.json").is_file():
            raise DistillError("--method on-policy needs a teacher that scores the student's own tokens; a logits "
                               "cache (--teacher DIR) covers only the traces' tokens")
        if self.method == "on-policy" and self.schedule.packing:
            raise DistillError("--method on-policy trains on padded rollout batches; leave out --packing")
        if self.prompts.path and (self.method != "on-policy" or self.on_policy.on_policy_fraction != 1.0):
            raise DistillError("--prompts gives no teacher-written tokens, so every batch must be on-policy: "
                               "use --method on-policy (with --on-policy-fraction 1), or train on --traces")
        if bool(self.prompts.path) == bool(self.traces.path):
            raise DistillError("train needs exactly one of --traces (teacher traces) or --prompts (on-policy only)")
        self._validate_teachers()
        self._validate_on_policy()

    def _validate_teachers(self) -> None:
        """Several teachers and the self-teacher: the options that go with them, and only with them."""
        teacher = self.teacher
        routed, itself = bool(teacher.name and "=" in teacher.name), teacher.name == "self"
        if (teacher.route_field or teacher.route_default) and not routed:
            raise DistillError("--route-field and --route-default pick one of several teachers: name them "
                               "--teacher NAME=TEACHER,NAME=TEACHER")
        if routed and not teacher.route_field:
            raise DistillError("several teachers need --route-field FIELD: the trace or prompt field whose value "
                               "names each example's teacher")
        named = dict(item.partition("=")[::2] for item in teacher.name.split(",")) if routed else {}
        names, members = [name.strip() for name in named], [member.strip() for member in named.values()]
        if teacher.route_default and teacher.route_default not in names:
            raise DistillError(f"--route-default {teacher.route_default}: not one of the teachers ({', '.join(names)})")
        if teacher.context and not (itself or "self" in members):
            raise DistillError("--teacher-context is what the self-teacher sees: use it with --teacher self")
        if (itself or "self" in members) and not teacher.context:
            raise DistillError("--teacher self needs --teacher-context FIELD: the trace or prompt field (a reference "
                               "solution, the verified answer) that only the teacher sees, which makes it a teacher")
        if (routed or itself) and self.schedule.packing:
            raise DistillError(f"--teacher {teacher.name}: each example's teacher differs, and packed rows hold "
                               "several examples; leave out --packing")

    def _validate_on_policy(self) -> None:
        rollouts = self.on_policy
        if "reward_weight" in given(self) and rollouts.reward == "none":
            raise DistillError("--reward-weight weighs --reward verify's term: add --reward verify")
        if {"timeout", "workers"} & set(given(self)) and rollouts.reward == "none":
            raise DistillError("--timeout and --workers set how --reward verify grades: add --reward verify")
        if rollouts.reward == "verify" and (self.sampling.n or 1) < 2:
            raise DistillError("--reward verify compares each rollout with the other rollouts of its prompt: "
                               "--n 2 or more")
        if rollouts.reward == "verify" and self.prompts.path and not self.prompts.answer_field:
            raise DistillError("--reward verify grades against each prompt's reference answer: name its field "
                               "with --answer-field")
        if "overlap_clip" in given(self) and not rollouts.rollout_overlap:
            raise DistillError("--overlap-clip caps --rollout-overlap's importance weights: add --rollout-overlap")
        if rollouts.rollout_overlap and self.sampling.temperature == 0:
            raise DistillError("--rollout-overlap weighs each token by its probability now over when it was sampled; "
                               "greedy rollouts (--temperature 0) have none: sample (--temperature > 0)")
        if self.prompts.answer_field and rollouts.reward == "none":
            raise DistillError("--answer-field gives --reward verify its reference answers: add --reward verify")


#: What each method leaves out, and why: set, these options fail (from flags) or are noted (from a recipe).
NOT_FOR = {
    "sft": ({"teacher", "endpoint", "kd", "on_policy", "sampling", "prompts", "format", "grading"},
            "they apply to --method kd or on-policy"),
    "kd": ({"on_policy", "sampling", "prompts", "format", "grading"}, "they apply to --method on-policy"),
    "on-policy": (set(), ""),
}


def train(cfg: TrainConfig) -> int:
    """``distill train``: SFT, KD (a local, served or cached teacher) or on-policy distillation: the
    output claimed (an earlier run there is continued with --resume or replaced with --overwrite),
    the student prepared, then fitted (``fit``)."""
    from distill.outputs import claimed, is_main_process
    from distill.records import check_traces
    from distill.train.fit import fit
    from distill.train.student import prepare

    if cfg.traces.path:
        check_traces(cfg.traces.path)  # before the student loads
    with claimed(cfg.output.out, "train", main=is_main_process(), kind="dir", settings=cfg.same_run,
                 overwrite=cfg.output.overwrite, rerun="continue" if cfg.resume else "refuse", hint="pass --resume",
                 owned=TRAINER_FILES, marks=("checkpoint-*",), inputs=[cfg.traces.path, cfg.prompts.path]):
        setup = prepare(cfg)
        return fit(cfg, setup)


#: What a training run writes into --out (a folder of only these, one a checkpoint, is an earlier run's).
TRAINER_FILES = ("checkpoint-*", "runs", "*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.bin",
                 "rollouts.jsonl", "merged", "README.md", "*.lock")


def _section(cfg, key: str) -> str | None:
    """The group an option key belongs to (``temperature`` -> ``sampling``)."""
    from distill.config import leaves

    return next((leaf.path[0] for leaf in leaves(type(cfg)) if leaf.key == key and len(leaf.path) == 2), None)
