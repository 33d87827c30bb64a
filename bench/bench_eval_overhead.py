"""Wall-clock overhead of `distill eval` over calling lm-eval directly with the same settings.

Both sides run in fresh processes (imports included) against the scripted OpenAI-compatible test
server (tests/servers/eval_server.py) with a fixed latency per request, on the same task config
(the shipped YAML with the same k, limit, sampling settings and local data file), with the same
concurrency. lm-eval direct: ``simple_evaluate(model="local-chat-completions", ...)``, which also
runs the tasks' grading (process_results). distill eval adds: its checks, per-sample seeds, the
results/generations/run-record files and the summary table. Prints a Markdown table.

    python bench/bench_eval_overhead.py --latency 0.5 --task distill_math500 --limit 40 --k 4 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "servers"))

from eval_server import EvalServer  # noqa: E402

LM_EVAL_DIRECT = """
import sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from distill.eval.data import evals_dir, task_spec
task, k, limit, data_dir, url, conc, seed = sys.argv[1:8]
spec = task_spec(task, k=int(k), temperature=0.6, top_p=0.95, max_gen_tokens=32768, data_dir=data_dir)
out = simple_evaluate(
    model="local-chat-completions",
    model_args={"base_url": url + "/chat/completions", "model": "scripted", "num_concurrent": int(conc),
                "tokenizer_backend": None, "tokenized_requests": False, "seed": int(seed)},
    tasks=[spec.config], task_manager=TaskManager(include_path=str(evals_dir()), include_defaults=False),
    limit=int(limit), apply_chat_template=True, log_samples=True, bootstrap_iters=0,
    random_seed=int(seed), numpy_random_seed=int(seed), torch_random_seed=int(seed), fewshot_random_seed=int(seed))
print(out["results"][task]["pass@1,all_samples"])
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="distill_math500")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--latency", type=float, default=0.5, help="server seconds per request")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()

    server = EvalServer({"base_seed": 1234, "model": "scripted", "problems": {}, "default": "42"},
                        latency=args.latency).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    direct = [sys.executable, "-c", LM_EVAL_DIRECT, args.task, str(args.k), str(args.limit), args.data_dir,
              server.base_url, str(args.concurrency), "1234"]
    times: dict[str, list[float]] = {"lm-eval direct": [], "distill eval": []}
    with tempfile.TemporaryDirectory() as out:
        ours = [sys.executable, "-m", "distill.cli", "eval", "--tasks", args.task, "--base-url", server.base_url,
                "--k", str(args.k), "--limit", str(args.limit), "--data-dir", args.data_dir,
                "--batch-size", str(args.concurrency), "--out", out, "--run-name", "bench"]
        for _ in range(args.runs):  # alternate, so load from other users of the machine hits both
            times["lm-eval direct"].append(timed(direct, env))
            times["distill eval"].append(timed(ours, env))
        metrics = json.loads((Path(out) / "bench" / "results.json").read_text())["tasks"][args.task]["metrics"]
    server.stop()

    base = statistics.median(times["lm-eval direct"])
    print(f"\n{args.task}, {args.limit} problems x k={args.k} = {args.limit * args.k} requests, server latency "
          f"{args.latency}s, concurrency {args.concurrency}, {args.runs} runs each (alternating); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pass@1 {metrics['pass@1']:.3f}\n")
    print("| runner | median wall s | runs (s) | overhead |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {100 * (med / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
