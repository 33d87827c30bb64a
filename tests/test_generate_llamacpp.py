"""``distill generate`` against the real llama-cpp-python server serving SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distill.cli import main
from distill.records import read_jsonl

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from llama_server import LlamaCppServer  # noqa: E402
from test_generate import assert_complete, kill_and_resume  # noqa: E402

pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is in the 'test' extra")


@pytest.fixture(scope="module")
def llama_server(smollm2_gguf):
    with LlamaCppServer(smollm2_gguf) as server:
        yield server


@pytest.fixture
def llama_url(llama_server):
    """The server's URL; a test during which the server died fails saying so, with its log."""
    llama_server.check()
    yield llama_server.base_url
    llama_server.check()


@pytest.fixture
def questions(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    rows = [{"problem": f"What is {a} + {a}?", "answer": str(2 * a)} for a in (2, 5, 11)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args_for(url: str, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--teacher", "vllm-local", "--base-url", url, "--model", "smollm2",
            "--prompts", str(prompts), "--answer-field", "answer", "--out", str(out),
            "--max-tokens", "12", "--seed", "7", "--concurrency", "2", "--request-timeout", "60", *extra]


def test_llamacpp_traces_with_top_logprobs(llama_url, questions, tmp_path):
    out = tmp_path / "traces.jsonl"
    assert main(args_for(llama_url, questions, out, "--n", "2", "--top-logprobs", "3")) == 0
    records = assert_complete(out, questions, n=2, field="problem")
    for r in records:
        assert r["answer"] and r["reasoning"] == ""  # SmolLM2 does not think; nothing to capture
        assert r["finish_reason"] in ("stop", "length")
        assert r["teacher"]["endpoint"] == llama_url
        tops = r["top_logprobs"]
        assert len(tops) == r["usage"]["completion_tokens"] > 0
        for t in tops:
            alternatives = [a["logprob"] for a in t["top"]]
            assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
            assert t["logprob"] <= alternatives[0] + 1e-4 and t["logprob"] <= 0
        assert "".join(t["token"] for t in tops).strip() == r["answer"]


def test_llamacpp_sigkill_mid_run_then_rerun_completes(llama_url, questions, tmp_path):
    out = tmp_path / "traces.jsonl"
    args = args_for(llama_url, questions, out, "--n", "3", "--max-tokens", "24")
    stopped = kill_and_resume(args, out, at_least=2)
    assert stopped.returncode < 0
    assert 2 <= len(read_jsonl(out)) < 9
    assert main(args) == 0
    records = assert_complete(out, questions, n=3, field="problem")
    assert all(r["answer"] for r in records)
