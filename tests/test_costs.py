"""What a student's data cost the teacher: followed from the traces it trained on, through verify's
run record, back to generate's (whose teacher preset has the price)."""

from __future__ import annotations

import json

import pytest

from distill.costs import device_hours, estimated_cost, generation_cost
from distill.runinfo import run_record

DEEPSEEK = {"input_per_million": 0.28, "output_per_million": 0.42, "currency": "USD"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def test_generation_cost_counts_every_generated_trace_and_prices_it(tmp_path):
    generated = tmp_path / "traces.jsonl"
    write_jsonl(generated, [{"id": f"p{i}#0", "prompt_id": f"p{i}", "usage": usage(100, 1000 * (i + 1))}
                            for i in range(3)])
    # a resumed generate run's summary counts only its own requests (here none): the traces count
    (tmp_path / "traces.jsonl.run.json").write_text(json.dumps(run_record(
        "generate", {"out": str(generated)}, teacher={"name": "deepseek-reasoner", "price": DEEPSEEK},
        summary={"done": 0, "skipped": 3, "tokens_in": 0, "tokens_out": 0})))
    kept = tmp_path / "traces.kept.jsonl"
    write_jsonl(kept, [{"id": "p0#0", "prompt_id": "p0", "usage": usage(100, 1000)}])  # verify kept one of three
    (tmp_path / "traces.kept.jsonl.run.json").write_text(json.dumps(run_record(
        "verify", {"input": str(generated), "out": str(kept)})))

    cost = generation_cost(kept)
    assert cost["traces"] == str(generated) and cost["teacher"] == "deepseek-reasoner" and cost["samples"] == 3
    assert cost["tokens_in"] == 300 and cost["tokens_out"] == 6000
    assert cost["cost"]["amount"] == pytest.approx((300 * 0.28 + 6000 * 0.42) / 1e6)
    assert cost["cost"]["currency"] == "USD"

    (tmp_path / "traces.jsonl.run.json").write_text(json.dumps(run_record(
        "generate", {}, teacher={"name": "smollm2-135m-instruct", "price": None})))
    local = generation_cost(kept)
    assert local["cost"] is None and local["tokens_out"] == 6000  # a local teacher has no price
    assert generation_cost(tmp_path / "elsewhere.jsonl") is None  # no record: unknown, not zero


def test_prices_and_device_hours():
    assert estimated_cost({"input_per_million": 4.0, "output_per_million": 16.0, "currency": "CNY"},
                          1_000_000, 500_000) == (12.0, "CNY")
    assert estimated_cost(None, 10, 10) is None
    assert device_hours({"wall_time_s": 1800, "device": {"type": "cuda", "count": 8}}) == (4.0, "GPU")
    assert device_hours({"wall_time_s": 90, "device": {"type": "cpu", "count": 2}}) == (0.05, "CPU")
    assert device_hours({"wall_time_s": 90}) is None  # a run recorded before devices were
