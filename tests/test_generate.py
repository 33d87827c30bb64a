"""``distill generate`` against a real HTTP server that injects faults: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from distill.cli import main
from distill.errors import DistillError
from distill.options import PromptFormat, PromptSet
from distill.prompts import load_prompts, prompt_hash
from distill.records import read_jsonl
from distill.teachers.endpoints import backoff_seconds, retry_after_seconds
from distill.teachers.base import split_reasoning

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from fault_server import ANSWER, REASONING, FaultServer  # noqa: E402

FAST_RETRIES = ["--retry-backoff", "0.05", "--request-timeout", "1", "--max-retries", "4"]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"question": f"What is {i} times 7?", "gold": str(7 * i)} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def server():
    srv = FaultServer(slow_seconds=2.0).start()
    yield srv
    srv.stop()


def api_args(srv: FaultServer, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--teacher", "vllm-local", "--base-url", srv.base_url, "--model", srv.model,
            "--prompts", str(prompts), "--prompt-field", "question", "--answer-field", "gold",
            "--out", str(out), "--seed", "100", *FAST_RETRIES, *extra]


def assert_complete(out: Path, prompts: Path, n: int, field: str = "question") -> list[dict]:
    """Every prompt x sample exactly once, and the file loads with datasets."""
    import datasets

    records = read_jsonl(out)
    expected = {(prompt_hash(json.loads(line)[field]), s)
                for line in prompts.read_text().splitlines() for s in range(n)}
    pairs = Counter((r["prompt_id"], r["sample"]) for r in records)
    assert set(pairs) == expected
    assert max(pairs.values()) == 1, [p for p, c in pairs.items() if c > 1]
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == len(expected)
    return records


# --- pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content,channel,expected", [
    ("The answer is 4.", "Two plus two.", ("Two plus two.", "The answer is 4.")),
    ("<think>\nTwo plus two.\n</think>\n\nThe answer is 4.", None, ("Two plus two.", "The answer is 4.")),
    ("Two plus two.\n</think>\nThe answer is 4.", None, ("Two plus two.", "The answer is 4.")),
    ("<think>Two plus two, so", None, ("Two plus two, so", "")),
    ("The answer is 4.", None, ("", "The answer is 4.")),
])
def test_split_reasoning(content, channel, expected):
    assert split_reasoning(content, channel) == expected


def test_retry_after_and_backoff():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({}) is None
    assert 3.0 <= backoff_seconds(5, 1.0, retry_after=3.0) <= 3.3
    waits = [backoff_seconds(a, 1.0) for a in range(8)]
    assert 0.5 <= waits[0] <= 1.0 and 8 <= waits[4] <= 16 and max(waits) <= 60


def test_prompt_sources_agree(tmp_path, prompts_file):
    """JSONL, JSON, parquet and a saved datasets dir give the same prompts and stable ids."""
    import datasets

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    (tmp_path / "p.json").write_text(json.dumps({"data": rows}))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "p_dir"))
    fields = dict(prompt_field="question", answer_field="gold")
    style = PromptFormat(template="Q: {prompt} ({gold}?)", system="Be brief.")
    loaded = [load_prompts(PromptSet(str(prompts_file), **fields), style)] + [
        load_prompts(PromptSet(str(tmp_path / name), split="test", **fields), style)
        for name in ("p.json", "p.parquet", "p_dir")]
    for other in loaded[1:]:
        assert other == loaded[0]
    first = loaded[0][0]
    assert first.id == prompt_hash("What is 0 times 7?") and first.reference == "0"
    assert first.messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Q: What is 0 times 7? (0?)"}]
    assert len(load_prompts(PromptSet(str(prompts_file), prompt_field="question", limit=3), PromptFormat())) == 3


@pytest.mark.parametrize("content,kwargs,message", [
    (None, {}, "missing.jsonl: file not found"),
    ('{"question": "a"}\n{"question": \n', {}, "p.jsonl:2: bad JSON"),
    ('{"question": "a"}\n{"q": "b"}\n', {}, "p.jsonl:2: field 'question' missing"),
    ('{"question": "a", "gold": 1}\n', {"answer_field": "answer"}, "p.jsonl:1: field 'answer' missing"),
    ('{"question": "a", "k": 1}\n{"question": "b", "k": 1}\n', {"id_field": "k"}, "p.jsonl:2: field 'k': duplicate id"),
])
def test_prompt_errors_name_the_place(tmp_path, content, kwargs, message):
    path = tmp_path / ("missing.jsonl" if content is None else "p.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DistillError, match=message.replace("(", r"\(")):
        load_prompts(PromptSet(str(path), prompt_field="question", **kwargs), PromptFormat())


# --- the API teacher against the fault server -------------------------------------------------


def test_faults_are_retried_and_nothing_is_lost(tmp_path, prompts_file, server):
    out = tmp_path / "traces.jsonl"
    rc = main(api_args(server, prompts_file, out, "--n", "2", "--concurrency", "4", "--top-logprobs", "2"))
    assert rc == 0
    records = assert_complete(out, prompts_file, n=2)
    # every fault type was hit and healed by a retry
    assert {"429", "500", "slow", "drop"} <= set(server.faults)
    assert server.retry_gaps and min(server.retry_gaps) >= 1.0  # Retry-After: 1 was honoured
    assert server.max_in_flight <= 4
    for r in records:
        assert r["reasoning"] == REASONING and r["answer"] == ANSWER
        assert r["id"] == f"{r['prompt_id']}#{r['sample']}"
        assert r["reference"] == str(7 * int(r["prompt"].split()[2]))
        assert r["teacher"]["sampling"]["seed"] == 100 + r["sample"]
        assert r["usage"]["completion_tokens"] == len(r["top_logprobs"]) > 0
        assert all(len(t["top"]) == 2 for t in r["top_logprobs"])  # server sent 3, K=2 kept
    assert not Path(f"{out}.errors.jsonl").exists()
    run = json.loads(Path(f"{out}.run.json").read_text())
    assert run["status"] == "complete" and run["summary"]["done"] == 24
    assert run["data"]["prompts"]["sha256"]


def test_rerun_skips_what_is_there(tmp_path, prompts_file, server):
    out = tmp_path / "traces.jsonl"
    assert main(api_args(server, prompts_file, out, "--limit", "5")) == 0
    first = dict(server.attempts)
    assert main(api_args(server, prompts_file, out, "--n", "2")) == 0
    assert_complete(out, prompts_file, n=2)
    assert len(server.attempts) == 24  # (prompt, seed) pairs asked for, over both runs
    assert all(server.attempts[key] == count for key, count in first.items())  # none asked again


@pytest.mark.parametrize("mode", ["reasoning", "think", "none"])
def test_reasoning_channels(tmp_path, prompts_file, mode):
    srv = FaultServer(schedules=[[]], reasoning=mode).start()
    try:
        out = tmp_path / "traces.jsonl"
        assert main(api_args(srv, prompts_file, out, "--limit", "3")) == 0
    finally:
        srv.stop()
    for r in read_jsonl(out):
        assert r["reasoning"] == ("" if mode == "none" else REASONING)
        assert r["answer"] == ANSWER and r["top_logprobs"] is None


def test_failures_go_to_errors_file_and_are_retried_next_run(tmp_path, prompts_file, capsys):
    srv = FaultServer(schedules=[[]], always_fail="What is 3 times").start()
    out = tmp_path / "traces.jsonl"
    errors = Path(f"{out}.errors.jsonl")
    try:
        assert main(api_args(srv, prompts_file, out, "--max-retries", "1")) == 1
        failed = read_jsonl(errors)
        assert [e["prompt_id"] for e in failed] == [prompt_hash("What is 3 times 7?")]
        assert "HTTP 500" in failed[0]["error"] and failed[0]["attempts"] == 2 and failed[0]["endpoint"] == srv.base_url
        assert len(read_jsonl(out)) == 11
        assert "rerun the same command" in capsys.readouterr().err
        srv.always_fail = None  # the outage is over
        assert main(api_args(srv, prompts_file, out)) == 0
    finally:
        srv.stop()
    assert_complete(out, prompts_file, n=1)
    assert not errors.exists()


@pytest.mark.parametrize("case", ["bad key", "unknown model"])
def test_client_errors_stop_the_run_without_retry(tmp_path, prompts_file, capsys, monkeypatch, case):
    srv = FaultServer(schedules=[[]], api_key="sk-right").start()
    monkeypatch.setenv("FAULT_KEY", "sk-wrong-secret" if case == "bad key" else "sk-right")
    args = api_args(srv, prompts_file, tmp_path / "t.jsonl", "--api-key-env", "FAULT_KEY", "--concurrency", "2")
    if case == "unknown model":
        args[args.index("--model") + 1] = "no-such-model"
    try:
        assert main(args) == 2
    finally:
        srv.stop()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("distill generate: error:")
    assert ("HTTP 401" in err and "$FAULT_KEY" in err) if case == "bad key" else "HTTP 404" in err
    assert "sk-wrong-secret" not in err
    assert srv.posts <= 2 and not srv.bodies  # each of the 2 workers asked once at most: no retry
    # nothing was produced, so nothing is left behind (no traces, errors file or run record to leak a key)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("t.jsonl")) == []


def test_bad_input_gives_one_line(tmp_path, prompts_file, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n{oops}\n')
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with socket_port() as closed_port:
        cases = {
            "nope.jsonl: file not found": ["--prompts", str(tmp_path / "nope.jsonl")],
            "bad.jsonl:2: bad JSON": ["--prompts", str(bad)],
            "field 'problem' missing": ["--prompt-field", "problem"],
            "environment variable NO_SUCH_KEY_VAR is not set": ["--api-key-env", "NO_SUCH_KEY_VAR"],
            f"127.0.0.1:{closed_port}/v1: cannot reach the teacher endpoint": [
                "--base-url", f"http://127.0.0.1:{closed_port}/v1"],
        }
        for expected, override in cases.items():
            args = ["generate", "--teacher", "vllm-local", "--prompts", str(prompts_file),
                    "--prompt-field", "question", "--out", str(tmp_path / "t.jsonl"), *override]
            assert main(args) == 2, expected
            err = capsys.readouterr().err.strip()
            assert expected in err and "Traceback" not in err, err


class socket_port:
    """A localhost port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        pass


# --- crashes: kill -9 and Ctrl-C, then rerun -------------------------------------------------


def _as_from_a_terminal() -> None:
    """Ctrl-C (SIGINT) delivered and handled, as in a terminal, even where the tests run as a shell's
    background job (SIGINT ignored) or a thread of the test process blocked it: a child inherits both."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", *args], env=env, preexec_fn=_as_from_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"generate ended before it could be killed: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no traces appeared")


def kill_and_resume(args: list[str], out: Path, at_least: int, sig=signal.SIGKILL) -> subprocess.CompletedProcess:
    """Start generate, send ``sig`` once some lines exist, check it was mid-way; returns the stopped run."""
    proc = start_cli(args)
    wait_for_lines(out, proc, at_least)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigkill_mid_run_then_rerun_completes(tmp_path, prompts_file):
    srv = FaultServer(latency=0.1, slow_seconds=2.0).start()
    out = tmp_path / "traces.jsonl"
    args = api_args(srv, prompts_file, out, "--n", "3", "--concurrency", "3")[1:]
    try:
        stopped = kill_and_resume(["generate", *args], out, at_least=5)
        assert stopped.returncode == -signal.SIGKILL
        assert 5 <= len(read_jsonl(out)) < 36
        assert main(["generate", *args]) == 0
    finally:
        srv.stop()
    records = assert_complete(out, prompts_file, n=3)
    assert all(r["reasoning"] == REASONING for r in records)


def test_ctrl_c_exits_130_with_resume_hint(tmp_path, prompts_file):
    srv = FaultServer(schedules=[[]], latency=0.2).start()
    out = tmp_path / "traces.jsonl"
    args = api_args(srv, prompts_file, out, "--n", "2", "--concurrency", "2")
    try:
        stopped = kill_and_resume(args, out, at_least=2, sig=signal.SIGINT)
        assert stopped.returncode == 130, stopped.stderr
        assert "rerun the same command to resume" in stopped.stderr
        assert "Traceback" not in stopped.stderr
        assert json.loads(Path(f"{out}.run.json").read_text())["status"] == "interrupted"
        assert main(args) == 0
    finally:
        srv.stop()
    assert_complete(out, prompts_file, n=2)


def test_verify_flag_grades_the_traces(tmp_path, prompts_file):
    srv = FaultServer(schedules=[[]]).start()  # always answers \boxed{42}
    out = tmp_path / "traces.jsonl"
    try:
        assert main(api_args(srv, prompts_file, out, "--limit", "8", "--verify")) == 0
    finally:
        srv.stop()
    records = read_jsonl(out)
    assert len(records) == 8
    assert {r["reference"]: r["correct"] for r in records} == {str(7 * i): i == 6 for i in range(8)}
