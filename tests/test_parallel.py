"""Data-parallel ``distill logits`` and local ``distill generate`` under a real ``accelerate launch``
with two CPU processes (gloo).

``accelerate launch --cpu`` starts one process (several CPU processes need MPI there), so these
runs use ``accelerate launch --multi_gpu --num_processes 2`` with no GPU visible: accelerate
starts the processes through torchrun and distill's ``parallel.launch`` picks gloo.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.cli import main
from distill.records import read_jsonl
from test_generate import assert_complete
from test_generate_local import local_args, write_prompts
from test_kd import write_traces


def accelerate(args: list[str], processes: int = 2) -> list[str]:
    """The command line of ``distill ARGS`` under ``accelerate launch`` with ``processes`` CPU ranks."""
    with socket.socket() as s:  # a free port: tests may run side by side
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = str(Path(sys.executable).with_name("accelerate"))
    return [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "-m", "distill.cli", *args]


def env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    done = subprocess.run(accelerate(args, processes), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# --- logits ---------------------------------------------------------------------------------


def cache_entries(directory: Path) -> dict:
    from distill.store import LogitsCache

    cache = LogitsCache(directory)
    return {tid: (cache.token_sha(tid), *cache.get(tid)) for tid in cache.trace_ids()}


def test_data_parallel_logits_equal_one_process_and_resume_with_other_counts(tmp_path, shared_data, tiny_llama):
    traces = write_traces(tmp_path / "traces.jsonl", shared_data, 0, 7)
    args = ["--teacher", str(tiny_llama), "--traces", str(traces), "--top-k", "8", "--shard-size", "2",
            "--batch-size", "2", "--max-length", "160", "--overlong", "truncate"]
    assert main(["logits", *args, "--out", str(tmp_path / "one")]) == 0
    expected = cache_entries(tmp_path / "one")

    parallel = tmp_path / "two"
    launch(["logits", *args, "--out", str(parallel)])
    got = cache_entries(parallel)
    assert sorted(got) == sorted(expected)
    for tid, (sha, ids, logprobs, tail) in expected.items():
        assert got[tid][0] == sha
        assert got[tid][1].equal(ids)  # the same top-k tokens
        assert got[tid][2].float().allclose(logprobs.float(), atol=2e-3) and got[tid][3].allclose(tail, atol=1e-4)
    index = json.loads((parallel / "index.json").read_text())
    assert not list(parallel.glob("index.part-*")) and not list(tmp_path.glob("*.lock"))
    assert {s["file"].split("-rank")[1][0] for s in index["shards"]} == {"0", "1"}  # both ranks wrote shards
    record = json.loads((parallel / "run.json").read_text())
    assert record["distributed"]["world_size"] == 2 and "round-robin" in record["distributed"]["split"]
    assert record["stats"]["traces"] == 7

    # more traces, then a rerun in one process: only the new ones run, each once
    before = {s["file"] for s in index["shards"]}
    write_traces(traces, shared_data, 0, 12)
    assert main(["logits", *args, "--out", str(parallel)]) == 0
    index = json.loads((parallel / "index.json").read_text())
    assert before <= {s["file"] for s in index["shards"]}
    assert sum(s["traces"] for s in index["shards"]) == 12 == len(cache_entries(parallel))


def test_logits_of_a_killed_launch_are_merged_by_a_one_process_rerun(tmp_path, shared_data, tiny_llama):
    """A rank's part index left behind (the launch died before merging) is kept, not redone."""
    from distill.store import CacheWriter

    traces = write_traces(tmp_path / "traces.jsonl", shared_data, 0, 5)
    out = tmp_path / "cache"
    args = ["logits", "--teacher", str(tiny_llama), "--traces", str(traces), "--top-k", "8", "--out", str(out),
            "--max-length", "160", "--overlong", "truncate"]
    assert main([*args, "--shard-size", "2"]) == 0
    index = json.loads((out / "index.json").read_text())
    # what rank 1 of a killed launch left: the last shard listed in its part index only
    last = index["shards"].pop()
    part = CacheWriter(out, index["header"], part=1)
    (out / last["file"]).rename(out / part.shard_name.format(0))
    part.index["shards"].append({**last, "file": part.shard_name.format(0)})
    (out / "index.part-1.json").write_text(json.dumps(part.index))
    (out / "index.json").write_text(json.dumps(index))
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    assert main(args) == 0
    assert not list(out.glob("index.part-*"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == times  # nothing rerun
    assert len(cache_entries(out)) == 5


# --- generate -------------------------------------------------------------------------------


@pytest.mark.parametrize("restart_processes", [2, 1])
def test_data_parallel_generate_every_sample_once_after_a_rank_is_killed(tmp_path, tiny_qwen2, restart_processes):
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    out = tmp_path / "traces.jsonl"
    args = local_args(tiny_qwen2, prompts, out, "--n", "2", "--max-tokens", "16", "--batch-size", "1")
    proc = subprocess.Popen(accelerate(args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = Path(f"{out}.part-1")
    deadline = time.monotonic() + 120
    while not (part.exists() and part.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(int(Path(f"{part}.lock").read_text()), signal.SIGKILL)  # rank 1, by the PID in its part's lock
    assert proc.wait(timeout=120) != 0
    proc.communicate()
    written = sum(len(read_jsonl(p)) for p in tmp_path.glob("traces.jsonl*") if not p.name.endswith((".lock", ".json")))
    assert 2 <= written < 16 and not out.exists()  # mid-run: the parts hold some, nothing merged yet

    if restart_processes == 1:
        assert main(args) == 0
    else:
        launch(args)
    assert_complete(out, prompts, n=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock")  # a killed rank leaves its (free) lock
    assert left == ["p.jsonl", "traces.jsonl", "traces.jsonl.run.json"]  # parts merged and gone
    record = json.loads(Path(f"{out}.run.json").read_text())
    assert record["distributed"]["world_size"] == restart_processes
    assert record["summary"]["done"] + record["summary"]["skipped"] == 16 and record["summary"]["skipped"] >= 2
    if restart_processes == 2:
        assert [r["done"] > 0 for r in record["distributed"]["ranks"]] == [True, True]


# --- leaving a launch -----------------------------------------------------------------------


def test_a_rank_leaves_with_its_code_its_output_flushed_and_exit_handlers_run(tmp_path):
    script = ("import atexit, sys; from pathlib import Path; from distill.parallel import leave; "
              f"atexit.register(Path({str(tmp_path / 'handler')!r}).touch); "
              "print('traces written', end=''); print('a warning', end='', file=sys.stderr); leave(3)")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a pipe is, unflushed
    done = subprocess.run([sys.executable, "-c", script], env=buffered, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "traces written", "a warning")
    assert (tmp_path / "handler").exists()
