"""``distill generate`` with several endpoints: a dead one loses and duplicates nothing; load follows speed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from time import monotonic

import pytest

from distill.cli import main
from distill.records import read_jsonl
from distill.teachers.endpoints import MAX_BACKOFF, EndpointPool, RequestFailed, Retry

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from fault_server import FaultServer  # noqa: E402
from test_generate import assert_complete, prompts_file  # noqa: E402,F401  (a fixture)


@pytest.fixture
def servers():
    started: list[FaultServer] = []

    def start(**kwargs) -> FaultServer:
        started.append(FaultServer(schedules=[[]], **kwargs).start())
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


def generate(urls: list[str] | Path, prompts: Path, out: Path, *extra: str) -> int:
    """``urls``: comma-separated on the command line, or a preset file listing them."""
    teacher = ["--teacher", str(urls)] if isinstance(urls, Path) else \
        ["--teacher", "vllm-local", "--base-url", ",".join(urls), "--model", "fault-model"]
    return main(["generate", *teacher, "--prompts", str(prompts), "--prompt-field", "question", "--out", str(out),
                 "--seed", "100", "--n", "2", "--retry-backoff", "0.05", "--request-timeout", "5", *extra])


def endpoint_counts(out: Path) -> dict[str, dict]:
    return {e["url"]: e for e in json.loads(Path(f"{out}.run.json").read_text())["summary"]["endpoints"]}


def test_an_endpoint_failing_every_request_loses_and_repeats_nothing(tmp_path, prompts_file, servers, capsys):
    good = [servers(latency=0.02), servers(latency=0.02)]
    bad = servers(always_fail="What is")  # every prompt: HTTP 500
    urls = [good[0].base_url, bad.base_url, good[1].base_url]
    out = tmp_path / "traces.jsonl"
    assert generate(urls, prompts_file, out, "--concurrency", "6", "--max-retries", "2") == 0
    records = assert_complete(out, prompts_file, n=2)
    # the failing endpoint was asked and answered nothing; each sample was generated once, by the healthy two
    assert bad.posts > 0 and not bad.completed
    generated = good[0].completed + good[1].completed
    assert len(generated) == 24 and set(generated.values()) == {1}
    by_endpoint = Counter(r["teacher"]["endpoint"] for r in records)
    assert by_endpoint == {g.base_url: sum(g.completed.values()) for g in good}
    counts = endpoint_counts(out)
    assert counts[bad.base_url]["requests"] == counts[bad.base_url]["failures"] == bad.posts
    assert counts[bad.base_url]["mean_latency_s"] is None and counts[bad.base_url]["tokens_out"] == 0
    for g in good:
        c = counts[g.base_url]
        assert c["failures"] == 0 and c["requests"] == by_endpoint[g.base_url]
        assert c["tokens_out"] == sum(r["usage"]["completion_tokens"] for r in records
                                      if r["teacher"]["endpoint"] == g.base_url)
        assert c["mean_latency_s"] >= 0.02
    summary = capsys.readouterr().err
    assert f"{bad.base_url}: {bad.posts} requests, {bad.posts} failed" in summary


def test_requests_go_where_fewest_are_in_flight(tmp_path, prompts_file, servers):
    """Two equally slow endpoints share the load evenly; a faster one takes more (round robin would not)."""
    even = [servers(latency=0.2), servers(latency=0.2)]
    out = tmp_path / "even.jsonl"
    assert generate([s.base_url for s in even], prompts_file, out, "--concurrency", "4") == 0
    assert_complete(out, prompts_file, n=2)
    asked = [sum(s.attempts.values()) for s in even]
    assert sum(asked) == 24 and abs(asked[0] - asked[1]) <= 2, asked
    assert all(0.2 <= c["mean_latency_s"] < 1.0 for c in endpoint_counts(out).values())

    fast, slow = servers(latency=0.02), servers(latency=0.4)
    preset = tmp_path / "replicas.yaml"
    preset.write_text(f"kind: api\nmodel: fault-model\nbase_url:\n  - {slow.base_url}\n  - {fast.base_url}\n")
    out = tmp_path / "uneven.jsonl"
    assert generate(preset, prompts_file, out, "--concurrency", "2") == 0
    assert_complete(out, prompts_file, n=2)
    assert sum(fast.attempts.values()) > 3 * sum(slow.attempts.values()) > 0, (fast.attempts, slow.attempts)
    assert json.loads(Path(f"{out}.run.json").read_text())["teacher"]["base_url"] == [slow.base_url, fast.base_url]


def test_a_failing_endpoint_is_backed_off_and_its_requests_go_elsewhere():
    pool = EndpointPool(["http://down/v1", "http://up/v1"], max_retries=3, retry_backoff=1.0)
    down, up = pool.endpoints

    async def attempt(endpoint):
        if endpoint is down:
            raise Retry("HTTP 503: overloaded")
        return "completion"

    for _ in range(5):
        assert asyncio.run(pool.call(attempt)) == ("completion", up)
    assert (down.requests, down.failures, up.requests) == (1, 1, 5)  # tried once, then closed
    # each time its back-off is over it gets one probe; each failure in a row doubles the back-off, up to a cap
    waits = [down.down_until - monotonic()]
    for _ in range(8):
        down.down_until = 0.0
        assert pool.pick() is down
        assert asyncio.run(pool.call(attempt)) == ("completion", up)
        waits.append(down.down_until - monotonic())
    assert down.failures == down.failing == 9 and up.failures == 0
    assert all(0.49 * min(MAX_BACKOFF, 2 ** k) <= w <= min(MAX_BACKOFF, 2 ** k) for k, w in enumerate(waits)), waits
    assert max(waits) > MAX_BACKOFF / 2
    down.down_until = 0.0
    down.in_flight = 1  # a probe is out: nothing else goes there until it succeeds
    assert not down.is_open(monotonic()) and pool.pick() is up
    down.in_flight = 0
    assert asyncio.run(pool.call(lambda endpoint: asyncio.sleep(0, endpoint.url))) == ("http://down/v1", down)
    assert down.failing == 0 and down.is_open(monotonic())  # a success reopens it


def test_a_request_failing_everywhere_fails_after_its_retries():
    pool = EndpointPool(["http://a/v1", "http://b/v1"], max_retries=2, retry_backoff=0.001)

    async def attempt(endpoint):
        raise Retry("connection error (ConnectError)")

    with pytest.raises(RequestFailed) as failed:
        asyncio.run(pool.call(attempt))
    assert failed.value.attempts == 3 and failed.value.url in ("http://a/v1", "http://b/v1")
    assert failed.value.reason == "connection error (ConnectError)"
    assert sum(e.requests for e in pool.endpoints) == 3 and all(e.failures for e in pool.endpoints)
