"""API-teacher throughput: ``distill generate`` against a local server with a fixed latency.

With ``--concurrency C`` requests in flight and a server that takes ``L`` seconds per reply, the
ideal is ``C / L`` requests per second (32 / 0.2 s = 160). The target is at least 0.9 of that:
the client, retry bookkeeping and the fsync'd trace writes must not be the bottleneck. The rate
is distill's own figure (run record ``summary.requests_per_second``): requests over the time from
the first request to the last reply; the one-off setup before it (importing openai, the clients,
the endpoint check) is reported beside it.

    python bench/bench_generate_api.py                 # 1600 requests, C=32, L=0.2 s
    python bench/bench_generate_api.py --requests 3200 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "servers"))
from llama_server import free_port  # noqa: E402

from distill.cli import main as distill  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "servers" / "fault_server.py"),
                             "--port", str(port), "--latency", str(latency), "--no-faults"],
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("fault server did not start")


def run(requests: int, concurrency: int, latency: float) -> dict:
    proc, url = start_server(latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"problem": f"Question {i}?"}) + "\n" for i in range(requests)))
            out = Path(tmp) / "traces.jsonl"
            load = os.getloadavg()[0]
            cpu0 = _cpu_seconds()
            rc = distill(["generate", "--teacher", "vllm-local", "--base-url", url, "--model", "fault-model",
                          "--prompts", str(prompts), "--out", str(out), "--concurrency", str(concurrency),
                          "--max-tokens", "64"])
            cpu = _cpu_seconds() - cpu0
            summary = json.loads(Path(f"{out}.run.json").read_text())["summary"]
            lines = out.read_bytes().count(b"\n")
    finally:
        proc.terminate()
        proc.wait()
    if rc or lines != requests:
        raise SystemExit(f"run failed: exit {rc}, {lines}/{requests} traces")
    ideal = concurrency / latency
    rate = summary["requests_per_second"]
    return {"requests": requests, "concurrency": concurrency, "latency_s": latency,
            "req_per_s": rate, "setup_s": summary["setup_seconds"], "ideal": ideal, "ratio": rate / ideal,
            "client_cpu_ms_per_request": 1000 * cpu / requests, "load_average": load}


def _cpu_seconds() -> float:
    """This process's CPU time: the client's cost per request, whatever else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    row = run(args.requests, args.concurrency, args.latency)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load average {row['load_average']:.1f} "
          f"at start, Python {platform.python_version()}")
    print("| requests | concurrency | latency | sustained req/s | ideal req/s | ratio | client CPU per request "
          "| setup before the first request |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {row['requests']} | {row['concurrency']} | {row['latency_s'] * 1000:.0f} ms | "
          f"{row['req_per_s']:.1f} | {row['ideal']:.0f} | {row['ratio']:.2f} | "
          f"{row['client_cpu_ms_per_request']:.2f} ms | {row['setup_s']:.2f} s |")


if __name__ == "__main__":
    main()
