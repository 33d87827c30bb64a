"""``distill check RECIPE.yaml``: every check that needs no training, over a recipe's steps.

The CLI builds each step's config as ``distill run`` builds it (``cli.plan_recipe``: the same
options, the same ``validate``) and hands the steps here. A stage does not import another stage, so
this module reads a config by its fields (``cfg.student.name``, ``cfg.schedule.batch_size``...) and
maps a train step onto :func:`~distill.check.runner.run_checks`' parameters, an eval step onto the
protocol of the numbers the recipe cites, a logits step onto its tokenizers. What an earlier step
writes is checked as what it will be where that is known (a student trained by an earlier step as
the model it starts from), else said to be skipped, with why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from distill.check.command import CheckConfig, Step
from distill.check.memory import parse_gpus, present_gpus
from distill.check.protocol import check_protocol
from distill.check.runner import resolve, run_checks
from distill.check.tokenizers import check_tokenizers
from distill.check.verdicts import Verdict, error, exit_code, ok, skipped, summary
from distill.config import load_yaml
from distill.errors import DistillError
from distill.options import Checks
from distill.protocols import PUBLISHED, find_published


def check_recipe(recipe: str, steps: list[Step], cfg: CheckConfig, only: str | None = None) -> int:
    """Check ``steps`` (those named ``only``, else all) and print one line per finding under each step;
    1 when any check failed."""
    checks = cfg.checks
    stand_ins = parse_stand_ins(checks.stand_in)
    cards = parse_gpus(checks.gpus) if checks.gpus else present_gpus()
    shown = f" ({len(stand_ins)} stand-ins: --stand-in)" if stand_ins else ""
    print(f"distill check {recipe}{shown}", flush=True)
    published, found = reproduces(recipe)
    _print("reproduces", found)
    cites = checks.cites or published
    earlier = Earlier()
    everything = list(found)
    for step in steps:
        if not only or only in (step.label, step.command):
            found = _check_step(step, earlier, checks, cites, stand_ins, cards)
            _print(f"step {step.number}: {step.label} ({step.command})", found)
            everything += found
        earlier.add(step)
    print(summary(everything), flush=True)
    return exit_code(everything)


def _print(header: str, verdicts: list[Verdict]) -> None:
    if verdicts:
        print("\n".join([f"== {header}", *(v.line() for v in verdicts)]), flush=True)


def _check_step(step: Step, earlier: "Earlier", checks: Checks, cites: str | None, stand_ins: dict[str, str],
                cards) -> list[Verdict]:
    if step.command == "train":
        return check_train(step.config, earlier, checks, stand_ins, cards)
    if step.command == "eval":
        return check_eval(step.config, cites) if cites else []
    if step.command == "logits":
        return check_logits(step.config, stand_ins)
    return []


def parse_stand_ins(specs: list[str] | None) -> dict[str, str]:
    """``["Qwen/Qwen2.5-7B-Instruct=tests/models/qwen7b", ...]`` -> {name: directory}."""
    out = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise DistillError(f"--stand-in '{spec}': say NAME=DIR (a hub model or preset, and a local model "
                               f"directory)")
        if not Path(path.strip()).is_dir():
            raise DistillError(f"--stand-in {spec}: {path.strip()} is not a directory")
        out[name.strip()] = path.strip()
    return out


def reproduces(recipe: str) -> tuple[str | None, list[Verdict]]:
    """The model whose published numbers the recipe's ``reproduces:`` section names, and whether its numbers
    and protocol are distill's table's (``protocols.PUBLISHED``: one place they are read from their sources)."""
    section = load_yaml(recipe).get("reproduces")
    if section is None:
        return None, []
    if not isinstance(section, dict) or not section.get("model"):
        return None, [error("published", f"{recipe}: 'reproduces:' needs model, protocol and scores",
                            "see configs/openr1-distill-7b.yaml")]
    model = str(section["model"])
    row = find_published(model)
    if row is None:
        known = "; ".join(row.model for row in PUBLISHED)
        return None, [error("published", f"{recipe}: reproduces.model '{model}' has no published numbers in distill's "
                                         f"table (known: {known})",
                            "add its row to distill/protocols.py, with its source")]
    scores = section.get("scores") or {}
    wrong = [f"{bench} {scores.get(bench)} (published: {score})" for bench, score in row.scores.items()
             if scores.get(bench) != score]
    if section.get("protocol") != row.protocol:
        wrong.append(f"protocol {section.get('protocol')} (published: {row.protocol})")
    if wrong:
        return model, [error("published", f"{recipe}: reproduces: {', '.join(wrong)} for {model} ({row.source})",
                             "copy the published numbers and protocol")]
    said = ", ".join(f"{bench} {score}" for bench, score in row.scores.items())
    return model, [ok("published", f"{model}: {said} under the {row.protocol} protocol ({row.source})")]


class Earlier:
    """What the steps before this one write: their outputs by path, and for a trained student the model it
    starts from and whether it learned the teacher's traces (which teach a Base model to end its turns)."""

    def __init__(self):
        self.writers: dict[str, Step] = {}
        self.start: dict[str, str] = {}
        self.on_traces: dict[str, bool] = {}

    def add(self, step: Step) -> None:
        out = getattr(getattr(step.config, "output", None), "out", None)
        if not out:
            return
        key = _key(out)
        self.writers[key] = step
        if step.command == "train":
            cfg = step.config
            student = _key(cfg.student.name)
            self.start[key] = self.start.get(student, cfg.student.name)
            learned = cfg.method != "on-policy" or cfg.on_policy.on_policy_fraction < 1
            self.on_traces[key] = learned or self.on_traces.get(student, False)

    def writer(self, path: str | None) -> Step | None:
        return self.writers.get(_key(path)) if path else None

    def trace_teacher(self, path: str | None):
        """The teacher options of the generate step that wrote these traces (through verify steps)."""
        step = self.writer(path)
        while step is not None and step.command == "verify":
            step = self.writer(step.config.traces.path)
        return step.config.teacher if step is not None and step.command == "generate" else None


def _key(path: str) -> str:
    return os.path.normpath(str(path))


def check_train(cfg, earlier: Earlier, checks: Checks, stand_ins: dict[str, str], cards) -> list[Verdict]:
    """A train step's checks: its options mapped onto :func:`run_checks`'."""
    out: list[Verdict] = []
    student = cfg.student.name
    writer = earlier.writer(student)
    if writer is not None and writer.command == "train" and not Path(student, "config.json").is_file():
        start = earlier.start[_key(student)]
        out.append(ok("student", f"{student} is written by step {writer.number} ({writer.label}): checked as {start}, "
                                 f"the model it starts from"))
        student = start
    teacher, url, model, verdict = _teacher(cfg, earlier)
    out += [verdict] if verdict else []
    sched, gpus = cfg.schedule, cards[0] if cards else 1
    grad_accum = sched.grad_accum or max(1, math.ceil((sched.global_batch_size or 0) / (sched.batch_size * gpus)))
    on_policy = cfg.on_policy.on_policy_fraction if cfg.method == "on-policy" else 0.0
    return out + run_checks(
        student=student, teacher=teacher, teacher_url=url, teacher_model=model,
        teacher_top_k=cfg.teacher.top_logprobs, traces=cfg.traces.path, method="sft" if cfg.method == "sft" else "kd",
        on_policy=on_policy, sft_before=earlier.on_traces.get(_key(cfg.student.name), False),
        kd_temperature=cfg.kd.kd_temperature, max_length=cfg.render.max_length, overlong=cfg.render.overlong,
        think_style=cfg.render.think_style, trace_sample=checks.trace_sample, weights_dtype=cfg.precision.weights_dtype,
        lora=cfg.lora.lora, qlora=cfg.lora.qlora, lora_r=cfg.lora.lora_r, sharding=sharding(cfg, checks),
        batch_size=sched.batch_size, grad_accum=grad_accum, gradient_checkpointing=cfg.precision.gradient_checkpointing,
        liger=cfg.precision.liger, kd_chunk_size=cfg.kd.chunk_size, prompt_tokens=checks.prompt_tokens,
        rollout_max_tokens=cfg.sampling.max_tokens, rollouts_per_prompt=cfg.sampling.n or 1,
        rollout_cache=cfg.on_policy.rollout_cache, gpus=checks.gpus, stand_ins=stand_ins)


def _teacher(cfg, earlier: Earlier) -> tuple[str | None, list[str] | None, str | None, Verdict | None]:
    """(teacher, its URLs, its served name, a line about it) for run_checks. SFT's teacher is the one that
    wrote its traces (for the tokenizer line); a logits cache an earlier step writes is said so."""
    from distill.teachers.kd import BUILDERS
    from distill.teachers.spec import resolve as teacher_spec

    if not cfg.teaches:  # SFT: the traces' teacher, for the tokenizer line (never asked anything)
        options = earlier.trace_teacher(cfg.traces.path)
        return (options.name if options is not None and not options.url else None), None, None, None
    options = cfg.teacher
    writer = earlier.writer(options.name)
    if writer is not None and writer.command == "logits" and not Path(options.name, "index.json").is_file():
        return None, None, None, skipped("teacher", f"the logits cache {options.name} is written by step "
                                                    f"{writer.number} ({writer.label}): its tokenizers are checked "
                                                    f"there")
    spec = teacher_spec(options)
    if spec.kind == "cache":
        return None, None, None, ok("teacher", f"the logits cache {spec.name}: training checks its rows against "
                                               f"these traces' tokens when it opens it")
    if spec.kind == "self":
        return None, None, None, ok("teacher", f"the student itself, shown each record's '{options.context}': "
                                               "its tokenizer and memory are the student's")
    if spec.kind == "routed":
        return None, None, None, skipped("teacher", f"{len(spec.members)} teachers routed by "
                                                    f"'{options.route_field}' ({', '.join(spec.members)}): not "
                                                    "checked one by one yet")
    if spec.kind not in BUILDERS:
        return None, None, None, error("teacher", f"--teacher {spec.name}: a {spec.kind} teacher cannot teach by KD "
                                                  f"yet, so distill train refuses it",
                                       "a local, served or cached teacher")
    if spec.kind == "endpoint":  # the served check compares the server's tokenizer with the student's
        return None, list(spec.urls), spec.model, None
    return spec.name, None, None, None


def sharding(cfg, checks: Checks) -> str:
    """--sharding, else the train step's own (--fsdp, --deepspeed), else accelerate's default config's."""
    if checks.sharding:
        return checks.sharding
    if cfg.parallel.fsdp:
        return "fsdp2"
    if cfg.parallel.deepspeed:
        ds = Path(cfg.parallel.deepspeed)
        stage = (json.loads(ds.read_text()).get("zero_optimization") or {}).get("stage") if ds.is_file() else None
        return "zero3" if stage == 3 else "none"
    from accelerate.commands.config import default_config_file

    path = Path(default_config_file)
    launch = load_yaml(path) if path.is_file() else {}
    if launch.get("distributed_type") == "FSDP":
        return "fsdp2"
    stage = (launch.get("deepspeed_config") or {}).get("zero_stage")
    return "zero3" if launch.get("distributed_type") == "DEEPSPEED" and stage == 3 else "none"


def check_eval(cfg, cites: str) -> list[Verdict]:
    """An eval step's sampling, task by task as it will run (a protocol's own k and budgets included),
    against the protocol of the numbers the recipe cites."""
    tasks = {}
    for task in cfg.tasks:
        s = cfg.task_sampling(task)
        tasks[task] = s if s.n is not None else dataclasses.replace(s, n=task_samples(task))
    return check_protocol(cites, tasks)


def task_samples(task: str) -> int | None:
    """The samples per problem a shipped eval task draws by default (its ``repeats``)."""
    from distill.paths import asset_dir

    path = asset_dir("evals") / f"{task}.yaml"
    return load_yaml(path).get("repeats", 1) if path.is_file() else None


def check_logits(cfg, stand_ins: dict[str, str]) -> list[Verdict]:
    """A local teacher's cache is in the student's tokens: the two tokenizers (a served one is checked by
    ``distill logits`` itself before it writes anything)."""
    if not cfg.teacher.name or cfg.teacher.url:
        return []
    s = resolve("students", cfg.student.name, stand_ins)
    t = resolve("teachers", cfg.teacher.name, stand_ins)
    if s.tokenizer is None or t.tokenizer is None:
        return [skipped("tokenizers", f"not compared: {s.missing or t.missing}")]
    return check_tokenizers(s.tokenizer, t.tokenizer, student=s.name, teacher=t.name,
                            student_rows=s.shape and s.shape.vocab, teacher_rows=t.shape and t.shape.vocab,
                            logit_kd=True)
