"""``distill generate``: prompts x n samples -> teacher -> traces.jsonl, resumable and crash-safe.

A local teacher also runs data-parallel under ``accelerate launch --num_processes N``
(``distill.parallel``): each rank samples every N-th pending prompt into its own part file
(``OUT.part-RANK``), and rank 0 appends the parts to ``OUT`` at the end, or at the start of the
rerun after a killed launch (``_merge_parts``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from distill import parallel
from distill.config import at_least, group, option, to_dict
from distill.costs import estimated_cost
from distill.errors import DistillError
from distill.outputs import exclusive, record_path
from distill.options import Endpoint, Output, PromptFormat, PromptSet, Sampling, Teacher
from distill.prompts import DEFAULT_TEMPLATE, Prompt, load_prompts
from distill.records import JsonlAppender, iter_jsonl, read_jsonl, trace_id, write_json, write_jsonl
from distill.runinfo import run_record
from distill.teachers.base import MAX_TOP_LOGPROBS, Completion
from distill.teachers.endpoints import RequestFailed, endpoint_urls

@dataclass
class GenerateConfig:
    prompts: PromptSet = group(PromptSet, required=("path",))
    format: PromptFormat = group(PromptFormat)
    teacher: Teacher = group(Teacher, only=("name", "url", "model", "top_logprobs"), required=("name",))
    endpoint: Endpoint = group(Endpoint)
    sampling: Sampling = group(Sampling)
    output: Output = group(Output, required=("out",))
    batch_size: int = option(16, help="local teacher: sequences per generate() batch", check=at_least(1))
    verify: bool = option(False, help="grade traces inline (sets 'correct')")
    max_cost: float | None = option(None, help="API teachers with prices: send no request that could take the "
                                               "estimated spend past this amount (preset currency); the run then "
                                               "exits 3 and a rerun with a higher limit resumes", check=at_least(0))
    max_output_tokens: int | None = option(None, help="API teachers: likewise for generated tokens", check=at_least(1))


@dataclass
class Job:
    """One (prompt, sample) to generate."""

    prompt: Prompt
    sample: int
    seed: int | None


#: Exit status of a run that stopped at --max-cost / --max-output-tokens (1: some requests failed).
LIMIT_REACHED = 3


@dataclass
class SpendingLimit:
    """``--max-cost`` / ``--max-output-tokens``: a request goes out only while what was spent plus the
    worst case of everything in flight stays within both limits. A request's worst case is its
    prompt's UTF-8 bytes (a token is at least one byte) plus a template allowance as input and the
    whole ``--max-tokens`` as output."""

    price: dict | None
    max_cost: float | None
    max_output_tokens: int | None
    max_tokens: int
    in_flight: list = field(default_factory=lambda: [0, 0])  # input, output tokens reserved
    reached: bool = False

    @staticmethod
    def worst_input(job: "Job") -> int:
        return sum(len(str(m["content"]).encode()) + 16 for m in job.prompt.messages)

    def admit(self, stats: "Stats", job: "Job") -> bool:
        tokens_in = stats.tokens_in + self.in_flight[0] + self.worst_input(job)
        tokens_out = stats.tokens_out + self.in_flight[1] + self.max_tokens
        cost = estimated_cost(self.price, tokens_in, tokens_out)
        ok = ((self.max_output_tokens is None or tokens_out <= self.max_output_tokens)
              and (self.max_cost is None or cost[0] <= self.max_cost))
        if ok:
            self.in_flight[0] += self.worst_input(job)
            self.in_flight[1] += self.max_tokens
        self.reached |= not ok
        return ok

    def release(self, job: "Job") -> None:
        """After the request's reply was counted in the stats (or it failed)."""
        self.in_flight[0] -= self.worst_input(job)
        self.in_flight[1] -= self.max_tokens


@dataclass
class Stats:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0        # from the first request (or batch) to the last reply: what rates divide by
    setup_seconds: float = 0.0  # before that: imports, clients and the endpoint check, or loading the model
    endpoints: list[dict] = field(default_factory=list)  # API teachers: each endpoint's counts (EndpointPool)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _combined(ranks: list[Stats]) -> Stats:
    """A launch's stats from its ranks': counts and lists add up, durations are the slowest rank's."""
    def merged(key: str, values: list):
        return max(values) if "seconds" in key else [v for vs in values for v in vs] \
            if isinstance(values[0], list) else sum(values)

    return Stats(**{f.name: merged(f.name, [getattr(r, f.name) for r in ranks]) for f in dataclasses.fields(Stats)})


def generate(cfg: GenerateConfig) -> int:
    """Generate every missing (prompt, sample) of ``cfg.prompts`` into ``cfg.out``; 1 if any failed."""
    _check(cfg)
    teacher = _teacher_settings(cfg)
    if cfg.max_cost is not None and estimated_cost(teacher.get("price"), 0, 0) is None:
        raise DistillError(f"--max-cost needs the teacher's prices: teacher '{teacher['name']}' has no 'price' "
                           f"(input_per_million, output_per_million) in its preset")
    if (cfg.max_cost is not None or cfg.max_output_tokens is not None) and teacher["kind"] != "api":
        raise DistillError("--max-cost and --max-output-tokens limit what an API teacher is paid for; "
                           "a local teacher costs none")
    prompts = load_prompts(cfg.prompts, cfg.format)
    out = Path(cfg.output.out)
    launch = parallel.launch()
    if launch.parallel and teacher["kind"] != "local":
        raise DistillError("a data-parallel launch (accelerate launch) runs a local teacher on every process; "
                           "an API teacher needs one process: raise --concurrency instead")
    settings = _settings(cfg, teacher)
    claim = lambda: _claim(cfg, out, settings)  # noqa: E731  (under the output's lock)
    with parallel.exclusive_launch(launch, out, _part(out, launch.rank), claim=claim):
        return _generate(cfg, teacher, prompts, out, launch, settings)


def _settings(cfg: GenerateConfig, teacher: dict) -> dict:
    """What makes two runs one run: the same teacher writing from the same prompt format with the
    same sampling. A rerun with these resumes; one with others is refused (``outputs.claim``)."""
    s = cfg.sampling
    return {"teacher": teacher["model"], "template": cfg.format.template, "system": cfg.format.system,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_tokens": s.max_tokens,
            "seed": s.seed, "top_logprobs": teacher["top_logprobs"]}


def _claim(cfg: GenerateConfig, out: Path, settings: dict) -> str:
    """May this run write ``out``: resume the traces there (same settings), start it, or refuse."""
    from distill.outputs import claim, read_record

    answer = claim(out, "generate", kind="file", settings=settings, inputs=[cfg.prompts.path],
                   overwrite=cfg.output.overwrite, rerun="continue")
    if answer == "continue":
        before = ((read_record(out, "file") or {}).get("config") or {}).get("sampling", {}).get("n")
        if before not in (None, cfg.sampling.n):
            print(f"generate: {out} was written with --n {before}; now --n {cfg.sampling.n}: "
                  f"{'adding samples to' if cfg.sampling.n > before else 'keeping the samples already in'} "
                  f"each prompt", file=sys.stderr, flush=True)
    return answer


#: How a data-parallel launch spreads the work over its ranks (in the run record).
SPLIT = "round-robin over the prompts with samples still missing, in prompt order: rank r of N takes the r-th, (r+N)-th, ..."


def _generate(cfg: GenerateConfig, teacher: dict, prompts: list[Prompt], out: Path, launch: parallel.Launch,
              settings: dict) -> int:
    if launch.main:
        _merge_parts(out)  # what the ranks of a killed data-parallel launch wrote
    launch.barrier()
    present = _present(out)
    n = cfg.sampling.n
    missing = {p.id: [s for s in range(n) if (p.id, s) not in present] for p in prompts}
    jobs = [Job(p, s, cfg.sampling.seed + s)
            for p in launch.share([p for p in prompts if missing[p.id]]) for s in missing[p.id]]
    written = _part(out, launch.rank) if launch.parallel else out
    errors_path = Path(f"{written}.errors.jsonl")
    skipped = len(prompts) * n - sum(map(len, missing.values()))
    stats = Stats(skipped=skipped if launch.main else 0)  # counted once in a launch's summed stats
    console = _console()
    share = f", {len(jobs)} of them on rank {launch.rank} of {launch.world_size}" if launch.parallel else ""
    console.print(f"generate: {len(prompts)} prompts x {n} samples; {skipped} already in {out}, "
                  f"{len(prompts) * n - skipped} to do{share} with {teacher['kind']} teacher {teacher['model']}")
    errors_path.unlink(missing_ok=True)  # its requests are pending again and get retried now
    limit = SpendingLimit(teacher.get("price"), cfg.max_cost, cfg.max_output_tokens, cfg.sampling.max_tokens)
    status = "interrupted"
    try:
        if jobs:
            with JsonlAppender(written) as traces, JsonlAppender(errors_path) as errors, \
                    _progress(console, len(jobs), shown=launch.main) as tick:
                sink = _Sink(traces, errors, stats, tick, teacher,
                             on_start=lambda: launch.main and _report(cfg, teacher, stats, out, errors_path, "running",
                                                                      None, launch.record(SPLIT), settings))
                start = sink.started
                try:
                    if teacher["kind"] == "api":
                        import asyncio

                        asyncio.run(_run_api(cfg, teacher, jobs, sink, limit))
                    else:
                        _run_local(cfg, teacher, jobs, sink, launch)
                finally:
                    stats.setup_seconds = sink.started - start
                    stats.seconds = time.monotonic() - sink.started
            if not stats.failed:
                errors_path.unlink(missing_ok=True)
        status = "failed" if stats.failed else "limit reached" if limit.reached else "complete"
    except DistillError:
        status = "error"
        raise
    finally:
        if not launch.parallel and (status != "error" or stats.done or stats.failed):  # a failed start leaves nothing
            _report(cfg, teacher, stats, out, errors_path, status, console, launch.record(SPLIT), settings)
    if launch.parallel:
        ranks = launch.gather(stats)  # also waits for every rank's part to be closed
        if not launch.main:
            return 0
        _merge_parts(out)
        stats = _combined(ranks)
        _report(cfg, teacher, stats, out, Path(f"{out}.errors.jsonl"), status, console,
                {**launch.record(SPLIT), "ranks": [r.as_dict() for r in ranks]}, settings)
    if cfg.verify and status == "complete":
        _verify(out, console)
    if status == "limit reached":
        console.print(f"generate stopped at the spending limit (--max-cost {cfg.max_cost}, --max-output-tokens "
                      f"{cfg.max_output_tokens}): requests in flight were finished and kept; rerun with a higher "
                      f"limit to continue")
        return LIMIT_REACHED
    return 1 if stats.failed else 0


def _check(cfg: GenerateConfig) -> None:
    top_logprobs = cfg.teacher.top_logprobs
    if top_logprobs is not None and top_logprobs > MAX_TOP_LOGPROBS:
        raise DistillError(f"--top-logprobs: an API gives at most {MAX_TOP_LOGPROBS} per token, got {top_logprobs}")
    if cfg.max_output_tokens is not None and cfg.max_output_tokens < cfg.sampling.max_tokens:
        raise DistillError(f"--max-output-tokens {cfg.max_output_tokens} is below one request's --max-tokens "
                           f"{cfg.sampling.max_tokens}: no request could go out")


def _teacher_settings(cfg: GenerateConfig) -> dict:
    """What ``--teacher`` names (``teachers.spec``: a local model or one behind an endpoint), with the
    API key read from its variable."""
    from distill.teachers.spec import resolve

    spec = resolve(cfg.teacher)
    if spec is None or spec.kind in ("cache", "self"):
        raise DistillError("generate needs a teacher that writes: --teacher (a preset or a local model) or "
                           "--teacher-url with the served model's name")
    preset, kind = spec.preset, "api" if spec.kind == "endpoint" else "local"
    if not spec.model:
        raise DistillError(f"{spec.where}: field 'model' missing")
    base_url = endpoint_urls(list(spec.urls), "--teacher-url" if cfg.teacher.url else spec.where) if spec.urls else None
    top_logprobs = cfg.teacher.top_logprobs or None
    if top_logprobs and not spec.scores_tokens:
        _console().print(f"[yellow]warning:[/] teacher {preset.get('name', spec.model)} gives no log-probs; "
                         f"top_logprobs will be null")
        top_logprobs = None
    key_env = cfg.endpoint.api_key_env or preset.get("api_key_env")
    api_key = "EMPTY"  # local servers (vLLM, llama.cpp) accept any key
    if kind == "api" and key_env:
        api_key = os.environ.get(key_env, "")
        if not api_key:
            raise DistillError(f"environment variable {key_env} is not set (the API key for {spec.where})")
    return {"kind": kind, "name": preset.get("name", spec.name), "model": spec.model, "base_url": base_url,
            "api_key_env": key_env, "api_key": api_key, "top_logprobs": top_logprobs, "price": preset.get("price")}


def _part(out: Path, rank: int) -> Path:
    """The file rank ``rank`` of a data-parallel launch writes."""
    return out.with_name(f"{out.name}.part-{rank}")


def _merge_parts(out: Path) -> None:
    """Append to ``out`` the lines of every rank's part file (of this launch or a killed one) that
    ``out`` lacks, then remove the parts. A crash mid-way leaves the parts; the next merge skips
    what ``out`` already holds, so nothing is lost or written twice."""
    parts = [p for p in out.parent.glob(f"{out.name}.part-*") if re.fullmatch(rf"{re.escape(out.name)}\.part-\d+", p.name)]
    if not parts:
        return
    present = _present(out)
    with JsonlAppender(out) as traces:  # fsynced on close, before the parts go
        for part in sorted(parts):
            for record in iter_jsonl(part, required=("prompt_id", "sample")):
                if (record["prompt_id"], record["sample"]) not in present:
                    present.add((record["prompt_id"], record["sample"]))
                    traces.write(record)
    for part in parts:
        part.unlink()


def _present(out: Path) -> set[tuple[str, int]]:
    if not out.exists():
        return set()
    return {(r["prompt_id"], r["sample"]) for r in iter_jsonl(out, required=("prompt_id", "sample"))}


class _Sink:
    """Turns finished jobs into trace or error lines and keeps the counts."""

    def __init__(self, traces: JsonlAppender, errors: JsonlAppender, stats: Stats, tick, teacher: dict, on_start):
        self.traces, self.errors, self.stats, self.tick = traces, errors, stats, tick
        self.teacher = {k: teacher[k] for k in ("name", "kind", "model")}
        self.teacher["path"] = teacher.get("path")
        self.started = time.monotonic()
        self.on_first_line = on_start

    def start_clock(self) -> None:
        """Called when the teacher is ready and the first request goes out."""
        self.started = time.monotonic()

    def _first_line(self) -> None:
        """Before the first line is written, the run record says what is being written (a killed run's
        rerun reads the settings there); a run that writes nothing leaves nothing."""
        if self.on_first_line is not None:
            self.on_first_line()
            self.on_first_line = None

    def trace(self, job: Job, completion: Completion, sampling: dict, endpoint: str | None = None) -> dict:
        p = job.prompt
        return {
            "id": trace_id(p.id, job.sample), "prompt_id": p.id, "sample": job.sample,
            "prompt": p.text, "messages": p.messages,
            "reasoning": completion.reasoning, "answer": completion.answer, "reference": p.reference,
            "finish_reason": completion.finish_reason, "usage": completion.usage,
            "teacher": {**self.teacher, "endpoint": endpoint, "sampling": {**sampling, "seed": job.seed}},
            "created_at": _now(), "top_logprobs": completion.top_logprobs,
        }

    def ok(self, record: dict) -> None:
        self._first_line()
        self.traces.write(record)
        self.stats.done += 1
        self.stats.tokens_in += record["usage"]["prompt_tokens"]
        self.stats.tokens_out += record["usage"]["completion_tokens"]
        self.tick(self.stats)

    def fail(self, job: Job, failed: RequestFailed) -> None:
        self._first_line()
        self.errors.write({"id": trace_id(job.prompt.id, job.sample), "prompt_id": job.prompt.id,
                           "sample": job.sample, "error": failed.reason, "attempts": failed.attempts,
                           "endpoint": failed.url, "created_at": _now()})
        self.stats.failed += 1
        self.tick(self.stats)


async def _run_api(cfg: GenerateConfig, teacher: dict, jobs: list[Job], sink: _Sink, limit: SpendingLimit) -> None:
    """``--concurrency`` workers share the job queue; files are written by one thread, off the loop."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distill.teachers.api import ApiTeacher

    api = ApiTeacher(base_url=teacher["base_url"], model=teacher["model"], api_key=teacher["api_key"],
                     api_key_env=teacher["api_key_env"], sampling=cfg.sampling, endpoint=cfg.endpoint,
                     top_logprobs=teacher["top_logprobs"])
    queue = deque(jobs)
    loop = asyncio.get_running_loop()

    async def worker(slot: int, writer) -> None:
        while queue and limit.admit(sink.stats, queue[0]):
            job = queue.popleft()
            try:
                completion, endpoint = await api.complete(job.prompt.messages, job.seed, slot)
            except RequestFailed as e:
                await loop.run_in_executor(writer, sink.fail, job, e)
            else:
                record = sink.trace(job, completion, api.sampling, endpoint)
                await loop.run_in_executor(writer, sink.ok, record)
            finally:
                limit.release(job)

    with ThreadPoolExecutor(1, thread_name_prefix="traces-writer") as writer:
        async with api:
            await api.check()
            sink.start_clock()
            tasks = [asyncio.create_task(worker(i, writer)) for i in range(min(cfg.endpoint.concurrency, len(jobs)))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a fatal error (bad key, unknown model) stops the run
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                sink.stats.endpoints = api.pool.summary()


def _run_local(cfg: GenerateConfig, teacher: dict, jobs: list[Job], sink: _Sink, launch: parallel.Launch) -> None:
    """Batches of similar length; batch i of rank r is seeded ``seed + i * world_size + r``."""
    from distill.teachers.local import LocalTeacher

    local = LocalTeacher.load(teacher["model"], device=launch.device, sampling=cfg.sampling, batch_size=cfg.batch_size,
                         top_logprobs=teacher["top_logprobs"])
    sink.teacher["path"] = local.path
    teacher.update(path=local.path, device=str(local.model.device), dtype=str(local.model.dtype))  # run record
    sampling = local.sampling
    sink.start_clock()
    for i, batch in enumerate(local.batches(jobs, lambda job: job.prompt.messages)):
        seed = cfg.sampling.seed + i * launch.world_size + launch.rank
        for job, completion in zip(batch, local.complete_batch([j.prompt.messages for j in batch], seed)):
            sink.ok(sink.trace(job, completion, sampling))


def _report(cfg, teacher: dict, stats: Stats, out: Path, errors_path: Path, status: str, console,
            distributed: dict, settings: dict) -> None:
    """The summary line(s) (none without a console) and the run record beside the traces."""
    if console is not None:
        _summary(cfg, teacher, stats, errors_path, status, console)
    public = {k: v for k, v in teacher.items() if k != "api_key"}
    data = {"prompts": cfg.prompts.path} if Path(cfg.prompts.path).is_file() else {}
    rate = (stats.done + stats.failed) / stats.seconds if stats.seconds else 0.0
    cost = estimated_cost(teacher.get("price"), stats.tokens_in, stats.tokens_out)
    record = run_record("generate", to_dict(cfg), data_files=data, status=status, settings=settings, teacher=public,
                        distributed=distributed, summary={**stats.as_dict(), "requests_per_second": rate,
                                 "estimated_cost": cost and {"amount": cost[0], "currency": cost[1]}},
                        outputs={"traces": str(out), "errors": str(errors_path) if stats.failed else None})
    write_json(record_path(out, "file"), record)


def _summary(cfg, teacher: dict, stats: Stats, errors_path: Path, status: str, console) -> None:
    """The closing line: counts, tokens, rate, cost; each endpoint's share; where the failures are."""
    rate = (stats.done + stats.failed) / stats.seconds if stats.seconds else 0.0
    line = (f"generate {status}: {stats.done} done, {stats.skipped} skipped, {stats.failed} failed | "
            f"tokens in {stats.tokens_in:,} out {stats.tokens_out:,} | {rate:.1f} req/s")
    cost = estimated_cost(teacher.get("price"), stats.tokens_in, stats.tokens_out)
    if cost:
        line += f" | est. cost {cost[0]:.4f} {cost[1]}"
    console.print(line)
    if len(stats.endpoints) > 1:
        for endpoint in stats.endpoints:
            console.print(_endpoint_line(endpoint), highlight=False)
    if stats.failed:
        console.print(f"{stats.failed} requests failed after retries: see {errors_path}; "
                      f"rerun the same command to retry them")


def _endpoint_line(e: dict) -> str:
    """One endpoint's requests, failures, tokens and mean latency, for the summary."""
    latency = "-" if e["mean_latency_s"] is None else f"{e['mean_latency_s']:.2f} s"
    return (f"  {e['url']}: {e['requests']} requests, {e['failures']} failed | tokens in {e['tokens_in']:,} "
            f"out {e['tokens_out']:,} | mean latency {latency}")


def _verify(out: Path, console) -> None:
    """Grade every trace that has no verdict yet and rewrite the file with ``correct`` set."""
    from distill.grading import Grader, apply_grades

    records = read_jsonl(out)
    todo = [r for r in records if "correct" not in r]
    with Grader() as grader:
        apply_grades(todo, grader)
    write_jsonl(out, records)
    graded = [r["correct"] for r in records if r["correct"] is not None]
    console.print(f"verify: {sum(graded)}/{len(graded)} traces correct" if graded
                  else "verify: no trace has a reference answer (pass --answer-field)")


@contextmanager
def _progress(console, total: int, shown: bool = True):
    """A rich bar with done/failed counts, requests per second and ETA; yields ``tick(stats)``.
    In a data-parallel launch only rank 0 shows its bar (its share's rate and ETA stand for all)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.monotonic()
    with Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, disable=not shown) as bar:
        task = bar.add_task("generate", total=total, info="")

        def tick(stats: Stats) -> None:
            finished = stats.done + stats.failed
            rate = finished / max(time.monotonic() - start, 1e-9)
            bar.update(task, completed=finished, info=f"{rate:.1f} req/s, {stats.failed} failed")

        yield tick


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
