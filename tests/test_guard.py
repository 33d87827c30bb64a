"""One writer per output, and nothing left behind by a failed start.

Two real ``distill generate`` processes against the fault-injecting server; the other writing
commands are checked with the lock held by the test itself (they must refuse at once, naming it).
"""

from __future__ import annotations

import os
import signal

import pytest

from distill.cli import main
from distill.errors import DistillError
from distill.outputs import exclusive, lock_path
from distill.records import read_jsonl

from test_generate import (FaultServer, api_args, assert_complete, prompts_file, socket_port,  # noqa: F401
                           start_cli, wait_for_lines)
from test_train_sft_data import make_trace, write_traces


def test_a_second_generate_on_the_same_output_stops_at_once_naming_the_holder(tmp_path, prompts_file):  # noqa: F811
    srv = FaultServer(schedules=[[]], latency=0.1).start()   # no injected faults: one request per sample
    out = tmp_path / "traces.jsonl"
    args = api_args(srv, prompts_file, out, "--n", "2", "--concurrency", "2")
    try:
        first = start_cli(args)
        wait_for_lines(out, first, at_least=2)
        second = start_cli(args)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and f"PID {first.pid}" in err and str(out) in err
        first.communicate(timeout=120)
        assert first.returncode == 0
        posts = srv.posts
    finally:
        srv.stop()
    assert_complete(out, prompts_file, n=2)
    assert posts == 24                         # every sample requested (and paid for) once
    assert not lock_path(out).exists()


def test_a_sigkilled_run_leaves_no_lock_that_stops_the_next(tmp_path, prompts_file):  # noqa: F811
    srv = FaultServer(latency=0.1).start()
    out = tmp_path / "traces.jsonl"
    args = api_args(srv, prompts_file, out, "--n", "2", "--concurrency", "2")
    try:
        first = start_cli(args)
        wait_for_lines(out, first, at_least=2)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
        assert lock_path(out).exists()         # the file stays, the kernel dropped its lock
        assert main(args) == 0
    finally:
        srv.stop()
    assert_complete(out, prompts_file, n=2)


@pytest.fixture
def traces(tmp_path):
    return write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in range(3)])


@pytest.mark.parametrize("command", ["verify", "logits", "train", "eval"])
def test_every_writing_command_refuses_an_output_another_run_holds(tmp_path, traces, tiny_llama, capsys, command):
    out = tmp_path / "out"
    args = {
        "verify": ["verify", "--input", traces, "--out", str(out), "--keep", "all"],
        "logits": ["logits", "--teacher", str(tiny_llama), "--traces", traces, "--out", str(out)],
        "train": ["train", "--student", str(tiny_llama), "--traces", traces, "--out", str(out), "--max-steps", "1",
                  "--report-to", "none"],
        "eval": ["eval", "--model", str(tiny_llama), "--tasks", "distill_gsm8k", "--out", str(tmp_path),
                 "--run-name", "out", "--limit", "1", "--k", "1"],
    }[command]
    with exclusive(out):
        assert main(args) == 2
        assert f"PID {os.getpid()}" in capsys.readouterr().err
    assert not out.exists()


def test_a_lock_file_removed_under_a_starting_run_is_not_a_lock(tmp_path, monkeypatch):
    """The race at a run's end: B opens the lock file, A finishes (unlinks it, unlocks), C creates a new
    one and locks it, B's lock then succeeds on the removed file. B must see C, not write beside it."""
    import fcntl

    from distill import outputs as locks

    out = tmp_path / "traces.jsonl"
    real_flock, holder = fcntl.flock, []

    def flock_after_a_third_run_started(fd, op):
        if not holder:  # between B's open and B's lock: the old file goes, C takes a new one
            os.unlink(lock_path(out))
            holder.append(os.open(lock_path(out), os.O_RDWR | os.O_CREAT))
            real_flock(holder[0], fcntl.LOCK_EX)
            os.write(holder[0], b"4242\n")
        return real_flock(fd, op)

    lock_path(out).write_text("1\n")  # A's file
    monkeypatch.setattr(locks.fcntl, "flock", flock_after_a_third_run_started)
    with pytest.raises(DistillError, match="PID 4242"):
        with exclusive(out):
            pass
    os.close(holder[0])


def test_failed_starts_leave_no_files(tmp_path, prompts_file, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "traces.jsonl"
    base = ["generate", "--prompts", str(prompts_file), "--prompt-field", "question", "--out", str(out)]
    assert main([*base, "--teacher", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "'nosuch' is not a preset" in err and "deepseek-reasoner" in err and "hub id" in err
    assert "huggingface.co" not in err
    with socket_port() as closed_port:
        assert main([*base, "--teacher", "vllm-local", "--base-url", f"http://127.0.0.1:{closed_port}/v1"]) == 2
    assert "cannot reach the teacher endpoint" in capsys.readouterr().err
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert main([*base, "--teacher", "vllm-local", "--api-key-env", "NO_SUCH_KEY_VAR"]) == 2
    assert "NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    assert read_jsonl(prompts_file)


def run_limited(args: list[str], max_bytes: int):
    """``distill ARGS`` in a process whose files may not grow past ``max_bytes`` (as on a full disk)."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "distill.cli", *args], preexec_fn=limit, text=True,
                          capture_output=True, timeout=300)


def test_a_file_size_limit_stops_generate_without_a_torn_line_and_a_rerun_resumes(tmp_path, prompts_file):  # noqa: F811
    srv = FaultServer(schedules=[[]]).start()
    out = tmp_path / "traces.jsonl"
    args = api_args(srv, prompts_file, out, "--n", "2", "--concurrency", "2")
    try:
        stopped = run_limited(args, 4000)
        assert stopped.returncode == 2 and "File too large" in stopped.stderr, stopped.stderr
        assert "Traceback" not in stopped.stderr
        kept = out.read_bytes()
        assert 0 < len(kept) <= 4000 and kept.endswith(b"\n")
        assert 0 < len(read_jsonl(out)) < 24
        assert main(args) == 0
    finally:
        srv.stop()
    assert_complete(out, prompts_file, n=2)


def test_a_file_size_limit_leaves_no_half_logits_shard_and_a_rerun_resumes(tmp_path, traces, tiny_llama):
    out = tmp_path / "logits"
    args = ["logits", "--teacher", str(tiny_llama), "--traces", traces, "--out", str(out), "--shard-size", "2"]
    stopped = run_limited(args, 4_000)  # the first shard (2 traces, ~56 rows of ~120 B) is larger
    assert stopped.returncode == 2 and "cannot write the shard" in stopped.stderr, stopped.stderr
    assert not list(out.glob("shard-*")) and not list(out.glob("*.tmp"))
    assert main(args) == 0
    assert [p.name for p in sorted(out.glob("shard-*"))] == ["shard-00000.safetensors", "shard-00001.safetensors"]


def test_max_cost_stops_sending_at_the_limit_and_a_higher_limit_resumes(tmp_path, prompts_file):  # noqa: F811
    import json

    srv = FaultServer(schedules=[[]]).start()
    preset = tmp_path / "paid.yaml"              # one dollar per token, in or out
    preset.write_text(f"kind: api\nmodel: {srv.model}\nbase_url: {srv.base_url}\n"
                      "price: {input_per_million: 1000000, output_per_million: 1000000, currency: USD}\n")
    out = tmp_path / "traces.jsonl"
    args = api_args(srv, prompts_file, out, "--n", "2", "--concurrency", "2", "--max-tokens", "40")
    args[args.index("--teacher") + 1] = str(preset)
    try:
        assert main([*args, "--max-cost", "600"]) == 3
        records = read_jsonl(out)
        spent = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in records)
        assert srv.posts == len(records) and 0 < len(records) < 24   # no request went out and was dropped
        assert spent <= 600
        run = json.loads((tmp_path / "traces.jsonl.run.json").read_text())
        assert run["status"] == "limit reached"
        assert main([*args, "--max-cost", "100000"]) == 0
    finally:
        srv.stop()
    assert_complete(out, prompts_file, n=2)


def test_max_cost_needs_prices_and_a_budget_above_one_request(tmp_path, prompts_file, capsys):  # noqa: F811
    base = ["generate", "--teacher", "vllm-local", "--base-url", "http://127.0.0.1:9/v1", "--prompts",
            str(prompts_file), "--prompt-field", "question", "--out", str(tmp_path / "t.jsonl")]
    assert main([*base, "--max-cost", "5"]) == 2
    assert "has no 'price'" in capsys.readouterr().err
    assert main([*base, "--max-output-tokens", "10", "--max-tokens", "100"]) == 2
    assert "no request could go out" in capsys.readouterr().err

