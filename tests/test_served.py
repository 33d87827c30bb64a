"""A served teacher speaking vLLM's prompt_logprobs shape, through a server that misbehaves.

``tests/servers/scoring_server.py`` answers like ``vllm serve`` from a made-up teacher whose
log-probs are known exactly, so the cache rows and the adapter's answers are checked against
hand-computed values; its faults (429, 500, dropped connections) must be retried, a SIGKILL
mid-run must resume to a complete cache, and each kind of unusable server is refused in one line.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.options import Endpoint
from distill.cli import main
from distill.models import load_tokenizer
from distill.rendering import RenderOptions, load_examples, target_mask
from distill.store import LogitsCache

from conftest import assert_within_bound
from test_generate import start_cli
from test_train_sft_data import make_trace, write_traces

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from scoring_server import LN2, ScoringServer, teacher_logprob, teacher_top  # noqa: E402

K = 8
FAULTS = ([], ["429"], ["500", "500"], ["drop"], ["429", "drop"], [])


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> str:
    return write_traces(tmp_path_factory.mktemp("served") / "traces.jsonl", [make_trace(i) for i in range(10)])


def serve(tok, **options) -> ScoringServer:
    options.setdefault("schedules", [[]])
    return ScoringServer(tok, model="teacher-7b", retry_after="0.1", **options).start()


def logits_args(url: str, traces: str, student, out: Path, *extra: str) -> list[str]:
    return ["logits", "--base-url", url, "--model", "teacher-7b", "--traces", traces, "--student", str(student),
            "--top-k", str(K), "--out", str(out), "--retry-backoff", "0.05", *extra]


def assert_cache_is_the_teacher(cache_dir: Path, traces: str, tok) -> None:
    """Every trace once, one row per target token, each row the made-up teacher's top-k and tail (ids exact,
    log-probs within the compact store's stated error)."""
    examples, _, _ = load_examples(traces, tok, RenderOptions())
    cache = LogitsCache(cache_dir)
    index = json.loads((cache_dir / "index.json").read_text())
    assert sum(s["traces"] for s in index["shards"]) == len(cache) == len(examples)  # no duplicate, none missing
    assert cache.trace_ids() == {e["id"] for e in examples}
    for ex in examples:
        positions = [t for t, on in enumerate(target_mask(ex["labels"])) if on]
        want = [teacher_top(ex["input_ids"][t], K, len(tok)) for t in positions]
        assert_within_bound(*(torch.tensor(x) for x in zip(*want)), cache.get(ex["id"]))


def test_served_cache_survives_faults_and_trains(tmp_path, traces, tok, smollm2_dir, tiny_llama):
    server = serve(tok, schedules=FAULTS, latency=0.1)  # each reply long enough for the next request to overlap it
    out = tmp_path / "logits"
    try:
        assert main(logits_args(server.base_url, traces, smollm2_dir, out, "--shard-size", "4",
                                "--concurrency", "3")) == 0
    finally:
        server.stop()
    assert {"429", "500", "drop"} <= set(server.faults), server.faults
    assert_cache_is_the_teacher(out, traces, tok)
    examples, _, _ = load_examples(traces, tok, RenderOptions())
    assert all(e["input_ids"] in server.scored for e in examples)  # sent as token ids, never as text
    assert server.max_in_flight >= 2
    record = json.loads((out / "run.json").read_text())
    assert record["header"]["source"] == "served" and record["header"]["top_k"] == K
    assert record["served"]["server"] == "vllm" and record["served"]["retries"] >= sum(server.faults.values())
    train = tmp_path / "kd"
    assert main(["train", "--method", "kd", "--student", str(tiny_llama), "--teacher-logits", str(out),
                 "--traces", traces, "--out", str(train), "--max-steps", "2", "--batch-size", "2",
                 "--report-to", "none", "--save-steps", "1000"]) == 0
    assert json.loads((train / "run.json").read_text())["kd"]["mode"] == "offline"


def test_sigkill_mid_run_then_resume_leaves_every_row_once(tmp_path, traces, tok, smollm2_dir):
    server = serve(tok, latency=0.15)
    out = tmp_path / "logits"
    args = logits_args(server.base_url, traces, smollm2_dir, out, "--shard-size", "2", "--concurrency", "1")
    try:
        proc = start_cli(args)
        deadline = time.monotonic() + 120
        while not (out / "index.json").exists() or not json.loads((out / "index.json").read_text())["shards"]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard was written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        done = json.loads((out / "index.json").read_text())["shards"]
        assert 1 <= len(done) < 5, "the kill came after the run had finished"
        assert main(args) == 0
    finally:
        server.stop()
    assert_cache_is_the_teacher(out, traces, tok)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize("options, top_k, expected", [
    ({"logprobs": False}, K, "returned no log-probs"),
    ({"max_logprobs": 20}, 32, "at most 20 log-probs per position, fewer than the top-32"),
    ({"vocab_shift": 1}, K, "tokenizes differently from student"),
    ({"vocab_shift": 1, "tokenize": False}, K, "tokenizes differently from student"),
    (None, K, "cannot reach the teacher server"),
])
def test_unusable_servers_are_refused_in_one_line(tmp_path, traces, tok, smollm2_dir, capsys, options, top_k,
                                                  expected):
    server = serve(tok, **options) if options is not None else None
    out = tmp_path / "logits"
    try:
        url = server.base_url if server else closed_port_url()
        rc = main(logits_args(url, traces, smollm2_dir, out, "--top-k", str(top_k)))
    finally:
        if server:
            server.stop()
    assert rc == 2
    line = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert line.startswith("distill logits: error: ") and expected in line, line
    if options and options.get("vocab_shift"):  # names the first mismatching token (a round trip cannot see token 0)
        assert re.search(r"at token \d+ of a probe text the server has id \d+ where the student has id \d+ '", line)
    assert not out.exists()  # refused before anything was written


def test_a_served_teacher_needs_its_name_and_a_student(tmp_path, traces, smollm2_dir, capsys):
    url = closed_port_url()  # refused before any request
    base = ["logits", "--teacher-url", url, "--traces", traces, "--out", str(tmp_path / "l")]
    assert main([*base, "--student", str(smollm2_dir)]) == 2
    assert "--teacher-url needs the served model's name: --teacher NAME" in capsys.readouterr().err
    assert main([*base, "--teacher", "m"]) == 2
    assert "a served teacher needs --student" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()


def test_a_trace_the_server_refuses_is_named(tmp_path, traces, tok, smollm2_dir, capsys):
    server = serve(tok, max_model_len=40)  # the probe fits, no trace does
    try:
        assert main(logits_args(server.base_url, traces, smollm2_dir, tmp_path / "logits")) == 2
    finally:
        server.stop()
    # (not always the last line: the test server may log a connection the failed run dropped)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("distill logits: error: "))
    assert line.startswith(f"distill logits: error: {traces}:1: trace 'p0#0': ") and "HTTP 400" in line, line
    assert "maximum context length is 40 tokens" in line and "not retried" in line


def padded_and_packed(examples: list[dict]) -> list[tuple[dict, torch.Tensor]]:
    from distill.batching import Collator

    batches = []
    for packing in (False, True):
        batch = Collator(pad_token_id=2, packing=packing)([{k: e[k] for k in ("input_ids", "labels")}
                                                           for e in examples])
        labels = batch.pop("labels")
        batches.append((batch, target_mask(labels)))
    return batches


@pytest.mark.parametrize("tokenize", [True, False])
def test_served_teacher_scores_padded_and_packed_batches(traces, tok, tokenize):
    from distill.teachers.served import ServedTeacher

    examples, _, _ = load_examples(traces, tok, RenderOptions())
    examples = examples[:3]
    want = [(ex["input_ids"][t], ex["input_ids"][t + 1]) for ex in examples
            for t, on in enumerate(target_mask(ex["labels"])) if on]
    server = serve(tok, tokenize=tokenize)
    teacher = ServedTeacher(base_url=server.base_url, model="teacher-7b", top_k=4, tokenizer=tok, student="smollm2",
                            vocab_size=len(tok), endpoint=Endpoint(concurrency=8))
    try:
        for inputs, mask in padded_and_packed(examples):
            sparse = teacher.scores(inputs, mask, None)
            assert sparse.ids.tolist() == [teacher_top(prev, 4, len(tok))[0] for prev, _ in want]
            assert torch.allclose(sparse.log_tail, torch.full((len(want),), -4 * LN2))
            sampled = teacher.sampled_logprobs(inputs, mask)
            assert sampled.tolist() == pytest.approx([teacher_logprob(p, y, len(tok)) for p, y in want], abs=1e-5)
    finally:
        teacher.close()
        server.stop()


def test_sampled_token_logprobs_alone_when_the_server_gives_no_top_k(traces, tok):
    """top_k=0 (a server that gives only the actual token's log-prob): the estimator's input, and no top-k."""
    from distill.errors import DistillError
    from distill.teachers.served import ServedTeacher

    examples, _, _ = load_examples(traces, tok, RenderOptions())
    (inputs, mask), _ = padded_and_packed(examples[:2])
    server = serve(tok, max_logprobs=0)
    teacher = ServedTeacher(base_url=server.base_url, model="teacher-7b", top_k=0, tokenizer=tok, student="smollm2",
                            vocab_size=len(tok), endpoint=Endpoint(concurrency=8))
    try:
        sampled = teacher.sampled_logprobs(inputs, mask)
        ids = inputs["input_ids"]
        rows = mask.nonzero().tolist()
        assert sampled.tolist() == pytest.approx(
            [teacher_logprob(int(ids[b, t]), int(ids[b, t + 1]), len(tok)) for b, t in rows], abs=1e-5)
        assert all(math.isfinite(x) for x in sampled.tolist())
        assert teacher.scores(inputs, mask, None).logprobs.tolist() == sampled.tolist()  # the estimator's teacher
    finally:
        teacher.close()
        server.stop()


def test_replicas_share_the_scoring_and_a_failing_one_loses_nothing(tmp_path, traces, tok, smollm2_dir):
    """``--base-url A,B``: both replicas score, the cache is exact; one that starts failing is worked around."""
    from distill.teachers.served import ServedTeacher

    replicas = [serve(tok, latency=0.02) for _ in range(3)]
    out = tmp_path / "logits"
    try:
        urls = [r.base_url for r in replicas]
        assert main(logits_args(",".join(urls[:2]), traces, smollm2_dir, out, "--concurrency", "4")) == 0
        assert_cache_is_the_teacher(out, traces, tok)
        served = json.loads((out / "run.json").read_text())["served"]
        assert [e["url"] for e in served["endpoints"]] == urls[:2]
        assert all(e["requests"] > 2 and e["tokens_in"] > 0 and not e["failures"] for e in served["endpoints"])

        examples, _, _ = load_examples(traces, tok, RenderOptions())
        want = [teacher_top(ex["input_ids"][t], 4, len(tok))[0] for ex in examples[:3]
                for t, on in enumerate(target_mask(ex["labels"])) if on]
        teacher = ServedTeacher(base_url=urls, model="teacher-7b", top_k=4, tokenizer=tok, student="smollm2",
                                vocab_size=len(tok), endpoint=Endpoint(concurrency=8, retry_backoff=0.05))
        dying = replicas[2]
        dying.always_fail = "("  # from now on every token-id prompt gets a 500
        scored_before = len(dying.scored)
        try:
            for inputs, mask in padded_and_packed(examples[:3]):
                assert teacher.scores(inputs, mask, None).ids.tolist() == want
        finally:
            teacher.close()
        counts = {e["url"]: e for e in teacher.client.pool.summary()}
        assert len(dying.scored) == scored_before and dying.faults["500"] == counts[dying.base_url]["failures"] > 0
        assert counts[dying.base_url]["requests"] == counts[dying.base_url]["failures"]
    finally:
        for r in replicas:
            r.stop()
