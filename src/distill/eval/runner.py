"""``distill eval``: generate k samples per problem through lm-eval, grade, write the run folder.

lm-eval does the prompting (chat template, no system prompt), batching/concurrency, the ``repeats``
and the calls to ``process_results`` (evals/distill_tasks.py, which grades with distill's grader);
this module picks the backend, lays the run's settings over the shipped tasks, and turns lm-eval's
logged samples into ``generations.jsonl`` + ``results.json`` (schema in ``distill.results``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distill.config import at_least, group, option, outright, to_dict
from distill.errors import DistillError
from distill.eval.metrics import task_metrics
from distill.results import GENERATIONS_FILE, OWN_SAMPLES_FILE, RESULTS_FILE, SCHEMA_VERSION, load_results
from distill.outputs import exclusive, read_record
from distill.options import Endpoint, Grading, Model, Output, OwnSamples, PromptSet, Render, Sampling, Teacher
from distill.protocols import PROTOCOLS, departures
from distill.records import read_jsonl, write_json, write_jsonl
from distill.runinfo import RUN_RECORD, run_record, versions


@dataclass
class EvalConfig:
    tasks: list[str] = option(default_factory=lambda: ["distill_math500"],
                              help="comma-separated tasks (distill_aime24, distill_aime25, distill_amc23, "
                                   "distill_math500, distill_gsm8k)")
    model: Model = group(Model)
    endpoint: Endpoint = group(Endpoint)
    backend: Literal["hf", "server", "vllm"] | None = option(
        None, help="in-process transformers, an OpenAI-compatible server, or vLLM in-process (default: server with "
                   "--model-url, else hf)")
    sampling: Sampling = group(Sampling, n=None)
    protocol: Literal[tuple(PROTOCOLS)] | None = option(
        None, help="sample as a paper did: its temperature, top-p, top-k, token budget and samples per problem, "
                   "each benchmark's own (distill.protocols says where each was read); a flag still sets any of them, "
                   "with a note")
    problems: PromptSet = group(PromptSet, only=("limit",))
    data_dir: str | None = option(None, help="directory with local benchmark JSONL files (e.g. ../shared/data)")
    batch_size: int = option(8, help="hf, vllm: sequences per generation batch (a server's: --concurrency)",
                             check=at_least(1))
    grading: Grading = group(Grading, only=("timeout",))
    output: Output = group(Output, out="runs/eval")
    run_name: str | None = option(None, help="name of this run's folder under --out (default: from the model)")
    label: str | None = option(None, help="row label in compare tables")
    rescore: str | None = option(None, help="re-score the saved generations of RUN_DIR without generating")
    # fidelity to the teacher, on held-out teacher traces
    fidelity: bool = option(False, help="also score the model on teacher traces it never trained on: NLL per target "
                                        "token, and with --teacher KL(teacher || model) and top-1 agreement (on by "
                                        "itself with --fidelity-traces or --teacher)")
    fidelity_traces: str | None = option(None, help="fidelity: a training run's OUT dir (its held-out prompts) or a "
                                                    "traces JSONL (all of it); default: the prompts the model's own "
                                                    "training held out")
    own: OwnSamples = group(OwnSamples)
    teacher: Teacher = group(Teacher, only=("name",))
    render: Render = group(Render, only=("think_style",))

    PRESETS = {"protocol": lambda name: PROTOCOLS[name].options()}

    def task_sampling(self, task: str) -> Sampling:
        """One task's sampling: under ``--protocol``, its k and token budget for this benchmark where no
        flag or recipe set them outright."""
        if not self.protocol:
            return self.sampling
        own = {key: value for key, value in PROTOCOLS[self.protocol].for_task(task).items() if not outright(self, key)}
        return dataclasses.replace(self.sampling, **own)


def run_eval(cfg: EvalConfig) -> int:
    if cfg.rescore:
        return rescore(cfg.rescore, cfg.grading.timeout)
    from distill.eval import data
    from distill.outputs import claim

    tasks = data.check_tasks(cfg.tasks)
    specs = [data.task_spec(t, cfg.task_sampling(t), data_dir=cfg.data_dir) for t in tasks]
    run_dir = Path(cfg.output.out) / (cfg.run_name or _default_run_name(cfg))
    with exclusive(run_dir):
        claim(run_dir, "eval", kind="dir", settings=_settings(cfg), overwrite=cfg.output.overwrite,
              owned=(RESULTS_FILE, GENERATIONS_FILE, OWN_SAMPLES_FILE, RUN_RECORD), marks=(GENERATIONS_FILE,),
              inputs=[cfg.model.name, cfg.fidelity_traces, cfg.data_dir])
        return _run(cfg, specs, run_dir)


def _settings(cfg: EvalConfig) -> dict:
    """What makes two evaluations one: the same model, tasks, sampling, data and fidelity traces."""
    from dataclasses import asdict

    return {"model": cfg.model.name, "model_url": cfg.model.url, "tasks": cfg.tasks, **asdict(cfg.sampling),
            "protocol": cfg.protocol, "data_dir": cfg.data_dir, "limit": cfg.problems.limit,
            "fidelity_traces": cfg.fidelity_traces, "teacher": cfg.teacher.name, "fidelity_samples": cfg.own.samples,
            "fidelity_max_tokens": cfg.own.max_tokens, "fidelity_teacher_samples": cfg.own.teacher_samples}


def _run(cfg: EvalConfig, specs, run_dir: Path) -> int:
    """Fidelity, then the benchmark tasks, written to ``run_dir`` (whose lock the caller holds)."""
    fidelity = _fidelity(cfg, run_dir)  # first: quick, and it checks the traces and the teacher before the long part
    backend = _build_backend(cfg)
    started = time.time()
    out = _evaluate(backend.lm, specs, cfg)
    rows = _generation_rows(out["samples"], backend, cfg)
    budgets = getattr(backend.lm, "budgets", {})
    s = cfg.sampling
    result = {
        "schema_version": SCHEMA_VERSION,
        "run_name": run_dir.name,
        "label": cfg.label or run_dir.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_info(cfg.model.name, backend.name),
        "backend": backend.kind,
        "generation": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                       "max_gen_tokens": s.max_tokens, "seed": s.seed, "chat_template": True, "system_prompt": None},
        "versions": versions(),
        "tasks": {spec.name: {"k": spec.config["repeats"], "data": spec.data,
                              "max_gen_tokens": budgets.get(spec.name, cfg.task_sampling(spec.name).max_tokens)}
                  for spec in specs},
        "wall_s": round(time.time() - started, 3),
    }
    if cfg.protocol:
        result["protocol"] = protocol_record(cfg, specs)
    if fidelity:
        result["fidelity"] = fidelity
    _write_run(run_dir, result, rows)
    data_files = {spec.name: spec.data["path"] for spec in specs if spec.data["sha256"]}
    if fidelity:
        data_files["fidelity_traces"] = fidelity["traces"]["path"]
    write_json(run_dir / RUN_RECORD, run_record("eval", to_dict(cfg), data_files=data_files, status="complete",
                                                settings=_settings(cfg)))
    return 0


def protocol_record(cfg: EvalConfig, specs) -> dict:
    """``results.json``'s ``protocol``: its name and source, and each task's settings that depart from it."""
    protocol = PROTOCOLS[cfg.protocol]
    changed = {}
    for spec in specs:
        s = cfg.task_sampling(spec.name)
        found = departures(protocol, spec.name, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                           n=spec.config["repeats"], max_tokens=s.max_tokens)
        if found:
            changed[spec.name] = {setting: ours for setting, ours, _ in found}
    return {"name": cfg.protocol, "source": protocol.source, "changed": changed}


def _fidelity(cfg: EvalConfig, run_dir: Path) -> dict | None:
    """``results.json``'s ``fidelity`` entry (``eval.fidelity``), when any fidelity flag asks for it; the
    model's and the teacher's own samples go to ``run_dir``."""
    if not (cfg.fidelity or cfg.fidelity_traces or cfg.teacher.name):
        return None
    from distill.eval.fidelity import describe, measure

    started = time.time()
    out = measure(cfg.model.name, cfg.fidelity_traces, cfg.teacher, cfg.render.think_style, cfg.batch_size,
                  cfg.own, cfg.sampling.seed, run_dir / OWN_SAMPLES_FILE)
    out["wall_s"] = round(time.time() - started, 3)
    print(describe(out), flush=True)
    return out


def _build_backend(cfg: EvalConfig):
    from distill.eval import backends

    model = cfg.model
    kind = cfg.backend or ("server" if model.url else "hf")
    if kind == "server":
        if not model.url:
            raise DistillError("backend 'server' needs --model-url (e.g. http://localhost:8000/v1)")
        return backends.build_server(model.url, model.name, cfg.endpoint, cfg.sampling.seed)
    if not model.name:
        raise DistillError(f"backend '{kind}' needs --model PATH_OR_ID (or --model-url for a server)")
    if kind == "vllm":
        return backends.build_vllm(model.name, cfg.batch_size, cfg.sampling.seed)
    return backends.build_hf(model.name, cfg.batch_size)


def _evaluate(lm, specs, cfg: EvalConfig) -> dict:
    """lm-eval's simple_evaluate on the task configs, with this run's grader installed."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from distill.console import stderr_without
    from distill.eval.data import evals_dir
    from distill.eval.scoring import use_grader

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=str(evals_dir()), include_defaults=False)
    seed = cfg.sampling.seed
    with use_grader(cfg.grading.timeout), stderr_without("fatal: not a git repository"):
        try:
            return simple_evaluate(
                model=lm, tasks=[s.config for s in specs], task_manager=manager, limit=cfg.problems.limit,
                apply_chat_template=True, log_samples=True, bootstrap_iters=0,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except ConnectionError as e:  # datasets' offline/hub errors derive from it
            hub = ", ".join(s.data["path"] for s in specs)
            raise DistillError(f"cannot load {hub} ({str(e).splitlines()[0]}); "
                               f"pass --data-dir DIR with local JSONL files") from None


def _generation_rows(samples: dict, backend, cfg: EvalConfig) -> list[dict]:
    """One row per sample from lm-eval's logged samples (each holds a problem's k responses)."""
    budgets = getattr(backend.lm, "budgets", {})
    rows = []
    for task, examples in samples.items():
        budget = budgets.get(task, cfg.task_sampling(task).max_tokens)
        for ex in sorted(examples, key=lambda e: e["doc_id"]):
            prompt = _prompt(ex["arguments"][0][0])
            for repeat, (response, graded) in enumerate(zip(ex["resps"][0], ex["graded"])):
                tokens, finish = _tokens_and_finish(backend, response, budget)
                rows.append({
                    "task": task, "doc_id": ex["doc_id"], "problem_id": ex["doc"]["id"], "repeat": repeat,
                    "seed": cfg.sampling.seed + repeat if backend.kind == "server" else None,
                    "prompt": prompt, "gold": ex["doc"]["answer"], "response": response,
                    **graded, "cons_correct": ex["cons@k"], "gen_tokens": tokens, "finish": finish,
                })
    return rows


def _prompt(context):
    """The templated prompt string (local models) or the chat messages (server: lm-eval carries
    them as a JSON string in a one-field tuple)."""
    if isinstance(context, (list, tuple)):
        return json.loads(context[0])
    return context


def _tokens_and_finish(backend, response: str, budget: int) -> tuple[int | None, str | None]:
    """As the backend reported them (finishes: text -> queue of (finish, tokens)); else counted
    with the tokenizer, cut off when the budget was used up; else unknown."""
    queue = getattr(backend.lm, "finishes", {}).get(response or "")
    if queue:
        finish, tokens = queue.popleft()
        return tokens, finish
    if backend.tokenizer is None:
        return None, None
    tokens = len(backend.tokenizer(response, add_special_tokens=False)["input_ids"])
    return tokens, "length" if tokens >= budget else "stop"


def summarize(result: dict, rows: list[dict]) -> dict:
    """Fill ``result['tasks'][*]`` metrics and per-problem counts from the sample rows."""
    by_task: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_task[row["task"]][row["doc_id"]].append(row)
    for task, problems in by_task.items():
        per_problem = [{"doc_id": doc_id, "n": len(s), "correct": sum(r["correct"] for r in s),
                        "cons_correct": s[0]["cons_correct"]} for doc_id, s in sorted(problems.items())]
        samples = [{"finished": r["finish"] != "length", "boxed": r["boxed"],
                    "gen_tokens": r["gen_tokens"], "timeout": r["timeout"]} for s in problems.values() for r in s]
        entry = result["tasks"].setdefault(task, {})
        entry.update(n_problems=len(per_problem), metrics=task_metrics(per_problem, samples),
                     per_problem=per_problem)
    return result


def _write_run(run_dir: Path, result: dict, rows: list[dict]) -> None:
    summarize(result, rows)
    write_jsonl(run_dir / GENERATIONS_FILE, rows)
    write_json(run_dir / RESULTS_FILE, result)
    _print_summary(run_dir, result)


def rescore(run_dir: str, timeout: float) -> int:
    """Grade saved generations again (new grader, same responses) and rewrite the run's results."""
    from distill.eval.scoring import score_problem, use_grader

    run = Path(run_dir)
    result = load_results(run)
    rows = read_jsonl(run / GENERATIONS_FILE, required=("task", "doc_id", "repeat", "gold", "response"))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["doc_id"])].append(row)
    with use_grader(timeout) as grader:
        for group in groups.values():
            group.sort(key=lambda r: r["repeat"])
            scored = score_problem([r["response"] for r in group], group[0]["gold"], grader)
            for row, graded in zip(group, scored["samples"]):
                row.update(graded, cons_correct=scored["cons_correct"])
    result["rescored_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["versions"] = versions()
    _write_run(run, result, rows)
    return 0


def model_info(model: str | None, served_name: str | None = None) -> dict:
    """Path/name, base and teacher of the evaluated model, from its adapter and run record,
    and the data it learned from with what generating it cost (``costs.generation_cost``).

    ``model`` may name the local directory of a served model, to record where it came from.
    """
    from distill.costs import generation_cost

    info = {"name_or_path": model or served_name, "path": None, "base": None, "teacher": None, "training": None,
            "data": None}
    if not model or not Path(model).exists():
        return info
    info["path"] = str(Path(model).resolve())
    record = read_record(model, "dir") if Path(model).is_dir() else None
    if record is not None:
        summary = record.get("summary")
        if isinstance(summary, dict):
            info.update(training=summary, base=summary.get("base_model"), teacher=summary.get("teacher"))
        traces = (record.get("data") or {}).get("traces")
        if isinstance(traces, dict) and traces.get("path"):
            info["data"] = {"traces": traces, "generation": generation_cost(traces["path"])}
    adapter = Path(model) / "adapter_config.json"
    if adapter.is_file() and not info["base"]:
        info["base"] = json.loads(adapter.read_text()).get("base_model_name_or_path")
    return info


def _default_run_name(cfg: EvalConfig) -> str:
    name = Path(cfg.model.name.rstrip("/")).name if cfg.model.name else "server"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


#: The eval summary's columns, most important first: a narrow terminal drops them from the end.
SUMMARY = ("task", "pass@1", "problems", "k", "cons@k", "finished", "pass@k", "boxed", "tokens")


def _summary_rows(result: dict) -> list[dict[str, str]]:
    rows = []
    for task, entry in result["tasks"].items():
        m = entry["metrics"]
        rows.append({"task": task, "k": str(entry["k"]), "problems": str(entry["n_problems"]),
                     "pass@1": f"{m['pass@1']:.3f} ± {m['pass@1_stderr']:.3f}", "pass@k": f"{m['pass@k']:.3f}",
                     "cons@k": f"{m['cons@k']:.3f}", "finished": f"{m['finished_rate']:.2f}",
                     "boxed": f"{m['boxed_rate']:.2f}",
                     "tokens": "-" if m["mean_gen_tokens"] is None else f"{m['mean_gen_tokens']:.0f}"})
    return rows


def _fidelity_table(fidelity: dict):
    """Fidelity on three texts, per token: the teacher's held-out traces, the model's own samples of those
    prompts and the teacher's; a row for each figure some text has."""
    from rich.table import Table

    from distill.degeneracy import N

    m, own = fidelity["metrics"], fidelity.get("own_samples") or {}
    mine, theirs = own.get("model") or {}, own.get("teacher") or {}

    def nats(x):
        return "—" if x is None else f"{x:.3f}"

    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    def count(x):
        return "—" if x is None else f"{x:,.0f}"

    rows = [("tokens", count(fidelity["target_tokens"]), count(mine.get("tokens")), count(theirs.get("tokens"))),
            ("model's NLL", nats(m["nll"]), nats(mine.get("nll")), "—"),
            ("teacher's NLL", "—", nats(mine.get("teacher_nll")), nats(theirs.get("teacher_nll"))),
            ("KL(teacher‖model)", nats(m["kl"]), "—", "—"),
            ("KL(model‖teacher)", "—", nats(mine.get("reverse_kl")), "—"),
            ("top-1 agreement", pct(m["top1_agreement"]), "—", "—"),
            (f"repeated {N}-grams", "—", pct(mine.get("repeated_ngram_share")), pct(theirs.get("repeated_ngram_share"))),
            ("tokens a sample", "—", count(mine.get("mean_length")), count(theirs.get("mean_length"))),
            ("ended", "—", pct(mine.get("ended")), pct(theirs.get("ended")))]
    teacher = (fidelity.get("teacher") or {}).get("name")
    table = Table(title=f"fidelity{f' to {teacher}' if teacher else ''} on {fidelity['prompts']} held-out prompts, "
                        "per token", caption="KL(model‖teacher): sampled, log q - log p of its own tokens"
                        if mine else None)
    table.add_column("", no_wrap=True)
    texts = ["teacher traces"] + (["own samples"] if own else []) + (["teacher samples"] if theirs else [])
    for text in texts:
        table.add_column(text, justify="right", no_wrap=True)
    for label, *cells in rows:
        if any(c != "—" for c in cells[:len(texts)]):
            table.add_row(label, *cells[:len(texts)])
    return table


def _print_summary(run_dir: Path, result: dict) -> None:
    """The scores as a table that fits the terminal: every name whole, the least important columns
    left out first (the whole table is results.json)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    rows = _summary_rows(result)
    columns = list(SUMMARY)

    def width(cols) -> int:  # rich's box: a border and 3 characters a column
        return 1 + sum(3 + max(len(c), *(len(r[c]) for r in rows)) for c in cols)

    while len(columns) > 2 and width(columns) > console.width:
        columns.pop()
    table = Table(title=f"distill eval: {result['label']}")
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)
    dropped = [c for c in SUMMARY if c not in columns]
    if result.get("fidelity"):
        console.print(_fidelity_table(result["fidelity"]))
    console.print(f"results: {run_dir / RESULTS_FILE}" + (f" (also {', '.join(dropped)})" if dropped else ""))
