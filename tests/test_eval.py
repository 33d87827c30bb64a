"""`distill eval` end to end: a scripted OpenAI-compatible server (exact metrics), the in-process
HF backend on tiny models (LoRA adapter included), --rescore, and one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from distill.cli import main
from distill.results import load_results
from distill.records import read_jsonl

from test_train_sft_data import make_trace, write_traces

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from eval_server import EvalServer  # noqa: E402

SEED = 1234


@pytest.fixture(scope="module")
def aime(shared_data):
    return [json.loads(line) for line in (shared_data / "aime24.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def server(aime):
    """Golds 204, 113, 371, 385. Per problem the answers of samples 0..3 (None: cut off)."""
    problems = {
        aime[0]["problem"]: ["204", "204", "204", "5"],  # 3/4 right, vote right
        aime[1]["problem"]: ["113", "7", "7", None],  # 1/4 right, vote wrong
        aime[2]["problem"]: ["1", "2", None, None],  # 0/4
        aime[3]["problem"]: ["9", "9", "\\frac{770}{2}", "385"],  # 2/4, tie 2-2: vote scores 0.5
    }
    srv = EvalServer({"base_seed": SEED, "model": "scripted", "max_model_len": 4096, "problems": problems}).start()
    yield srv
    srv.stop()


def run_eval(*args: str) -> int:
    return main(["eval", *map(str, args)])


@pytest.fixture(scope="module")
def server_run(server, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-server")
    rc = run_eval("--tasks", "distill_aime24", "--base-url", server.base_url, "--k", 4, "--limit", 4,
                  "--seed", SEED, "--data-dir", shared_data, "--out", out, "--run-name", "scripted")
    assert rc == 0
    return out / "scripted"


def test_server_backend_reports_exact_pass_and_cons(server_run, shared_data):
    res = load_results(server_run)
    task = res["tasks"]["distill_aime24"]
    m = task["metrics"]
    assert m["pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0 + 2 / 4) / 4)  # 0.375
    assert m["pass@k"] == pytest.approx(3 / 4)  # 3 of 4 problems have a correct sample
    assert m["cons@k"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert m["finished_rate"] == pytest.approx(13 / 16) and m["boxed_rate"] == pytest.approx(13 / 16)
    assert m["timeouts"] == 0
    assert [p["correct"] for p in task["per_problem"]] == [3, 1, 0, 2]
    assert task["k"] == 4 and task["n_problems"] == 4
    assert task["data"]["sha256"] and task["data"]["path"].endswith("aime24.jsonl")
    assert res["backend"] == "server" and res["model"]["name_or_path"] == "scripted"
    assert res["generation"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_gen_tokens": 32768,
                                 "seed": SEED, "chat_template": True, "system_prompt": None}
    assert {"lm_eval", "math_verify", "transformers", "distill"} <= set(res["versions"])


def test_server_sees_k_distinct_seeds_and_the_sampling_settings(server_run, server, aime):
    by_problem: dict[str, list[int]] = {}
    for req in server.seen:
        by_problem.setdefault(req["problem"], []).append(req["seed"])
        assert req["temperature"] == 0.6 and req["top_p"] == 0.95
        assert req["max_tokens"] < 4096  # clamped to the server's context
    assert len(by_problem) == 4
    for seeds in by_problem.values():
        assert sorted(seeds) == [SEED, SEED + 1, SEED + 2, SEED + 3]


def test_generations_file_has_one_line_per_sample(server_run, aime):
    rows = read_jsonl(server_run / "generations.jsonl")
    assert len(rows) == 16
    first = [r for r in rows if r["doc_id"] == 0]
    assert [r["repeat"] for r in first] == [0, 1, 2, 3]
    assert [r["answer"] for r in first] == ["204", "204", "204", "5"]
    assert [r["correct"] for r in first] == [True, True, True, False]
    assert first[0]["gold"] == "204" and first[0]["finish"] == "stop" and first[0]["task"] == "distill_aime24"
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    assert first[0]["prompt"] == [{"role": "user", "content": f"{aime[0]['problem']}\n{instruction}"}]
    cut = [r for r in rows if r["answer"] is None]
    assert len(cut) == 3 and all(r["finish"] == "length" and not r["correct"] for r in cut)


def test_rescore_reproduces_the_numbers(server_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(server_run, copy)
    before = load_results(copy)
    assert run_eval("--rescore", copy) == 0
    after = load_results(copy)
    for key in ("metrics", "per_problem", "k", "n_problems", "data"):
        assert after["tasks"]["distill_aime24"][key] == before["tasks"]["distill_aime24"][key]
    assert "rescored_at" in after


def test_hf_backend_end_to_end_on_three_problems(tiny_llama, shared_data, tmp_path):
    rc = run_eval("--tasks", "distill_math500", "--model", tiny_llama, "--k", 2, "--limit", 3,
                  "--max-gen-tokens", 8, "--data-dir", shared_data, "--out", tmp_path, "--run-name", "tiny")
    assert rc == 0
    res = load_results(tmp_path / "tiny")
    task = res["tasks"]["distill_math500"]
    assert res["backend"] == "hf" and task["n_problems"] == 3 and task["k"] == 2
    assert [p["n"] for p in task["per_problem"]] == [2, 2, 2]
    assert 0 < task["metrics"]["mean_gen_tokens"] <= 8
    rows = read_jsonl(tmp_path / "tiny" / "generations.jsonl")
    assert len(rows) == 6 and all(r["gen_tokens"] <= 8 for r in rows)
    assert "<|im_start|>user" in rows[0]["prompt"]  # SmolLM2's chat template
    assert all(r["finish"] == ("length" if r["gen_tokens"] == 8 else "stop") for r in rows)
    # the two samples of a problem are sampled, not copies of one greedy answer
    assert any(rows[i]["response"] != rows[i + 1]["response"] for i in range(0, 6, 2))


def test_hf_budget_is_clamped_to_the_context(tiny_llama, shared_data, tmp_path):
    # 32768 new tokens do not fit a 256-token model: the budget becomes context - prompt.
    model = tmp_path / "short-context"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    assert run_eval("--tasks", "distill_gsm8k", "--model", model, "--limit", 1, "--k", 1,
                    "--data-dir", shared_data, "--out", tmp_path, "--run-name", "clamp") == 0
    task = load_results(tmp_path / "clamp")["tasks"]["distill_gsm8k"]
    rows = read_jsonl(tmp_path / "clamp" / "generations.jsonl")
    assert 0 < task["max_gen_tokens"] < 256 - 50
    assert rows[0]["gen_tokens"] <= task["max_gen_tokens"]


def test_lora_adapter_records_its_base_and_its_fidelity(tiny_llama, shared_data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(adapter)
    (adapter / "run.json").write_text(json.dumps({"summary": {
        "method": "sft", "base_model": str(tiny_llama), "teacher": "deepseek-reasoner", "train_examples": 3}}))
    traces = write_traces(tmp_path / "traces.jsonl", [make_trace(i) for i in range(3)])
    # a fresh adapter (LoRA's B starts at zero) is still its base: the base as teacher is matched exactly
    assert run_eval("--tasks", "distill_amc23", "--model", adapter, "--k", 1, "--limit", 1, "--max-tokens", 4,
                    "--data-dir", shared_data, "--out", tmp_path, "--run-name", "lora", "--label", "tiny-sft",
                    "--fidelity-traces", traces, "--teacher", tiny_llama) == 0
    res = load_results(tmp_path / "lora")
    assert res["model"]["base"] == str(tiny_llama) and res["model"]["teacher"] == "deepseek-reasoner"
    assert res["model"]["training"]["method"] == "sft" and res["label"] == "tiny-sft"
    assert res["schema_version"] == 3 and res["model"]["path"] == str(adapter.resolve())
    fidelity = res["fidelity"]
    assert fidelity["examples"] == 3 and fidelity["held_out_from"] is None and fidelity["metrics"]["nll"] > 0
    assert abs(fidelity["metrics"]["kl"]) < 1e-6 and fidelity["metrics"]["top1_agreement"] == 1.0
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert run["data"]["fidelity_traces"]["sha256"] == fidelity["traces"]["sha256"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_unknown_task_lists_the_known_ones(capsys, tmp_path):
    assert run_eval("--tasks", "aime24", "--base-url", "http://127.0.0.1:9", "--out", tmp_path) == 2
    line = error_line(capsys)
    assert "unknown task 'aime24'" in line and "distill_aime24" in line and "distill_gsm8k" in line


def test_missing_data_file_is_named(capsys, shared_data, tmp_path):
    assert run_eval("--tasks", "distill_aime25", "--base-url", "http://127.0.0.1:9",
                    "--data-dir", shared_data, "--out", tmp_path) == 2
    line = error_line(capsys)
    assert "aime25.jsonl" in line and "not found" in line


def test_bad_row_in_data_file_names_file_and_line(capsys, tmp_path):
    (tmp_path / "math500.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    assert run_eval("--tasks", "distill_math500", "--base-url", "http://127.0.0.1:9",
                    "--data-dir", tmp_path, "--out", tmp_path) == 2
    assert "math500.jsonl:2: missing field 'answer'" in error_line(capsys)


def test_unreachable_server(capsys, shared_data, tmp_path):
    assert run_eval("--tasks", "distill_aime24", "--base-url", "http://127.0.0.1:9/v1",
                    "--data-dir", shared_data, "--out", tmp_path) == 2
    assert "cannot reach the server at http://127.0.0.1:9/v1" in error_line(capsys)


def test_model_without_chat_template(capsys, tiny_llama, shared_data, tmp_path, without_chat_template):
    model = without_chat_template(tiny_llama)
    assert run_eval("--tasks", "distill_aime24", "--model", model, "--data-dir", shared_data,
                    "--out", tmp_path / "eval") == 2
    assert "no chat template" in error_line(capsys)


def test_the_summary_fits_80_columns_with_every_name_whole(tmp_path, monkeypatch, capsys):
    from distill.eval.runner import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    metrics = {"pass@1": 0.4321, "pass@1_stderr": 0.0123, "pass@k": 0.61, "cons@k": 0.55, "finished_rate": 0.97,
               "boxed_rate": 0.93, "mean_gen_tokens": 3456.0}
    tasks = ("distill_aime24", "distill_aime25", "distill_amc23", "distill_math500", "distill_gsm8k")
    result = {"label": "a rather long model label for a student", "tasks": {
        t: {"k": 64, "n_problems": 500, "metrics": metrics} for t in tasks}}
    _print_summary(tmp_path, result)
    err = capsys.readouterr().err
    assert max(len(line) for line in err.splitlines()) <= 80
    assert all(t in err for t in tasks) and "pass@1" in err and "0.432 ± 0.012" in err
    assert "…" not in err  # nothing cut short
