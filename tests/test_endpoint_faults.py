"""One endpoint, one behaviour in every command: the same fault schedule (429 with Retry-After, 500s,
dropped connections, replies slower than --request-timeout) gives the same results through
``generate``, ``logits`` and ``train`` as a server without faults, with the same endpoint options
(``options.Endpoint``: --concurrency, --max-retries, --request-timeout, --retry-backoff)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.records import read_jsonl
from distill.store import LogitsCache

from test_generate import FaultServer, prompts_file  # noqa: F401  (a fixture)
from test_served import K, serve, tok, traces  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).parent / "servers"))

SCHEDULE = ([], ["429"], ["500", "500"], ["drop"], ["slow"], ["429", "drop"], [])
ENDPOINT = ["--concurrency", "2", "--max-retries", "4", "--request-timeout", "1", "--retry-backoff", "0.05"]


def faulty_and_clean(make):
    """Two servers from ``make(schedules=...)``: one with the schedule, one without faults."""
    return make(schedules=SCHEDULE), make(schedules=[[]])


def test_generate_gives_the_same_traces_through_faults(tmp_path, prompts_file):  # noqa: F811
    servers = faulty_and_clean(lambda schedules: FaultServer(schedules=schedules, retry_after="0.1",
                                                             slow_seconds=3.0).start())
    traces = []
    try:
        for name, server in zip(("faulty", "clean"), servers):
            out = tmp_path / f"{name}.jsonl"
            assert main(["generate", "--teacher-url", server.base_url, "--teacher", "fault-model", "--prompts",
                         str(prompts_file), "--prompt-field", "question", "--limit", "6", "--n", "2",
                         "--seed", "100", "--out", str(out), *ENDPOINT]) == 0
            traces.append({r["id"]: (r["reasoning"], r["answer"], r["usage"]) for r in read_jsonl(out)})
    finally:
        for server in servers:
            server.stop()
    assert {"429", "500", "drop", "slow"} <= set(servers[0].faults) and not servers[1].faults
    assert traces[0] == traces[1] and len(traces[0]) == 12


def test_logits_gives_the_same_cache_through_faults(tmp_path, traces, tok, smollm2_dir):  # noqa: F811
    servers = faulty_and_clean(lambda schedules: serve(tok, schedules=schedules, slow_seconds=3.0))
    caches = []
    try:
        for name, server in zip(("faulty", "clean"), servers):
            out = tmp_path / name
            assert main(["logits", "--teacher-url", server.base_url, "--teacher", "teacher-7b", "--traces", traces,
                         "--student", str(smollm2_dir), "--top-logprobs", str(K), "--out", str(out),
                         *ENDPOINT]) == 0
            caches.append(LogitsCache(out))
    finally:
        for server in servers:
            server.stop()
    assert {"429", "500", "drop", "slow"} <= set(servers[0].faults) and not servers[1].faults
    assert caches[0].trace_ids() == caches[1].trace_ids()
    for trace_id in caches[0].trace_ids():
        for got, want in zip(caches[0].get(trace_id), caches[1].get(trace_id)):
            assert torch.equal(got, want)


def test_train_gives_the_same_loss_curve_through_faults(tmp_path, traces, tok, tiny_llama):  # noqa: F811
    servers = faulty_and_clean(lambda schedules: serve(tok, schedules=schedules, slow_seconds=3.0))
    curves = []
    try:
        for name, server in zip(("faulty", "clean"), servers):
            out = tmp_path / name
            assert main(["train", "--method", "kd", "--student", str(tiny_llama), "--teacher-url", server.base_url,
                         "--teacher", "teacher-7b", "--top-logprobs", str(K), "--traces", traces, "--out", str(out),
                         "--max-steps", "3", "--batch-size", "2", "--eval-fraction", "0", "--logging-steps", "1",
                         "--save-steps", "1000", "--report-to", "none", "--no-gradient-checkpointing",
                         *ENDPOINT]) == 0
            curves.append([p["loss"] for p in json.loads((out / "run.json").read_text())["loss_curve"]])
    finally:
        for server in servers:
            server.stop()
    assert {"429", "500", "drop", "slow"} <= set(servers[0].faults) and not servers[1].faults
    assert len(curves[0]) == 3 and curves[0] == pytest.approx(curves[1], rel=1e-6)
