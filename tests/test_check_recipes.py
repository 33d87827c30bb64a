"""`distill check RECIPE` and `distill run RECIPE --check` at the command line; `eval --protocol`
and the protocol in `compare`.

The hub models of the shipped recipes are stood in for by weightless directories of their real
shapes (distill's table) with Qwen2's real tokenizer and ChatML template: the recipes' own
tokenizers, templates, stop tokens and memory plans are checked, offline (conftest sets
HF_HUB_OFFLINE). The planted faults are the check library's (tests/test_check.py), here through
recipes: what the command prints, one line per check, and its exit code.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import family_tokenizer_dir
from distill import config
from distill.check.memory import SHAPES
from distill.cli import main
from distill.config import build, make
from distill.eval.runner import EvalConfig
from distill.protocols import PROTOCOLS, benchmark
from distill.results import load_results

from test_compare import result, task, write
from test_eval import aime, server  # noqa: F401  (the scripted eval server's fixtures)
from test_train_sft_data import make_trace, write_traces

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from llama_server import free_port  # noqa: E402
from scoring_server import ScoringServer  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
IM_END, ENDOFTEXT = 151645, 151643
#: every hub model the shipped recipes name (directly or through a preset): Base models stop on <|endoftext|>
HUB_MODELS = {"Qwen/Qwen2.5-0.5B-Instruct": False, "Qwen/Qwen2.5-1.5B-Instruct": False,
              "Qwen/Qwen2.5-7B-Instruct": False, "Qwen/Qwen2.5-Math-1.5B": True,
              "open-r1/Qwen2.5-Math-7B-RoPE-300k": True, "Qwen/Qwen3-8B-Base": True, "Qwen/Qwen3-32B": False}


def weightless(out: Path, shape_of: str, base: bool) -> Path:
    """A model directory without weights: Qwen2's real tokenizer (ChatML) and a config of the shape
    distill's table gives ``shape_of``; a Base model's generation config stops on <|endoftext|> only."""
    from transformers import Qwen2Config, Qwen3Config

    s = SHAPES[shape_of.removesuffix("-Instruct").removesuffix("-Base")]
    shutil.copytree(family_tokenizer_dir("qwen2"), out)
    kind = Qwen3Config if s.qk_norm else Qwen2Config
    kind(hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim, vocab_size=s.vocab,
         tie_word_embeddings=s.tied).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [ENDOFTEXT] if base else
                                                            [IM_END, ENDOFTEXT]}))
    return out


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand-ins")
    return {name: weightless(root / name.replace("/", "--"), name, base) for name, base in HUB_MODELS.items()}


def flag(stand_ins: dict[str, Path]) -> str:
    return ",".join(f"{name}={path}" for name, path in stand_ins.items())


def check(*args, capsys) -> tuple[int, list[str]]:
    rc = main(["check", *map(str, args)])
    return rc, capsys.readouterr().out.splitlines()


def lines_of(out: list[str], step: str) -> list[str]:
    """The verdict lines printed under one step's header."""
    start = next(i for i, line in enumerate(out) if line.startswith(f"== {step}"))
    return list(itertools.takewhile(lambda line: line.startswith("["), out[start + 1:]))


def recipe(tmp_path: Path, steps: list[dict], **top) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**top, "pipeline": steps}, sort_keys=False))
    return path


# ---------------------------------------------------------------- every shipped recipe


@pytest.mark.parametrize("shipped", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_passes_check_with_stand_ins(shipped, stand_ins, capsys, monkeypatch, repo):
    monkeypatch.chdir(repo)  # the recipes' paths are the repository's
    rc, out = check(shipped, "--stand-in", flag(stand_ins), "--gpus", "8xH100", "--sharding", "fsdp2", capsys=capsys)
    text = "\n".join(out)
    assert rc == 0 and "[FAIL]" not in text, text
    assert "hub model" not in text and "[skip] student" not in text, text  # every model at hand, none skipped
    trains = [line for line in out if line.startswith("== step") and line.endswith("(train)")]
    assert trains and len(trains) == text.count("] memory:"), text  # each train step's plan estimated
    assert out[-1].startswith("distill check: ") and "error" not in out[-1]


# ---------------------------------------------------------------- the command


@pytest.fixture
def qwen(stand_ins) -> dict[str, str]:
    return {"instruct": str(stand_ins["Qwen/Qwen2.5-1.5B-Instruct"]), "base": str(stand_ins["Qwen/Qwen2.5-Math-1.5B"]),
            "teacher": str(stand_ins["Qwen/Qwen2.5-7B-Instruct"])}


def test_one_line_per_check_and_what_was_skipped(tmp_path, qwen, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n")
    path = recipe(tmp_path, [
        {"generate": {"teacher": qwen["teacher"], "prompts": str(prompts), "out": str(tmp_path / "t.jsonl")}},
        {"verify": {"traces": str(tmp_path / "t.jsonl"), "out": str(tmp_path / "t.ok.jsonl")}},
        {"train": {"student": qwen["instruct"], "traces": str(tmp_path / "t.ok.jsonl"), "out": str(tmp_path / "s"),
                   "max_length": 4096}}])
    rc, out = check(path, "--gpus", "1xH100", capsys=capsys)
    assert rc == 0
    lines = lines_of(out, "step 3: train (train)")
    assert [line.split(":")[0] for line in lines] == [
        "[  ok] tokenizers", "[skip] traces", "[  ok] base-student", "[  ok] memory"]
    assert "teacher '" + qwen["teacher"] + "'" in lines[0] and "SFT does not compare rows" in lines[0]  # generate's
    assert "t.ok.jsonl is not written yet" in lines[1] and "template, think and length checks not run" in lines[1]
    assert out[-1] == "distill check: 3 ok, 1 skipped"
    assert "== step 1" not in "\n".join(out)  # generate and verify have nothing to check before they run


def test_a_base_student_on_policy_warns_unless_an_earlier_step_trains_it_on_traces(tmp_path, qwen, capsys):
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in range(4)])
    on_policy = {"method": "on-policy", "teacher": qwen["teacher"], "traces": traces, "max_length": 1024,
                 "max_tokens": 256}
    alone = recipe(tmp_path, [{"train": {**on_policy, "student": qwen["base"], "out": str(tmp_path / "op")}}])
    rc, out = check(alone, "--gpus", "1xH200", capsys=capsys)
    base = [line for line in out if "] base-student:" in line]
    assert rc == 0 and base[0].startswith("[WARN]") and "ms-swift #9526" in base[0]
    assert "'<|endoftext|>' (id 151643), not on the template's end-of-turn '<|im_end|>'" in base[0]

    sft_first = recipe(tmp_path, [
        {"train": {"step": "sft", "student": qwen["base"], "traces": traces, "out": str(tmp_path / "sft"),
                   "max_length": 1024}},
        {"train": {**on_policy, "student": str(tmp_path / "sft"), "out": str(tmp_path / "op")}}])
    rc, out = check(sft_first, "--gpus", "1xH200", capsys=capsys)
    lines = lines_of(out, "step 2: train (train)")
    assert rc == 0 and lines[0].startswith("[  ok] student: ") and "written by step 1 (sft)" in lines[0]
    assert f"checked as {qwen['base']}, the model it starts from" in lines[0]
    base = [line for line in lines if "] base-student:" in line]
    assert base[0].startswith("[  ok]") and "training on the traces teaches it" in base[0]


def test_a_failing_check_fails_the_command_and_stops_run_before_any_step(tmp_path, qwen, smollm2_dir, capsys):
    traces = [make_trace(i) for i in range(10)]
    for trace in traces[:3]:
        trace["reasoning"] = "Adding them one at a time, carefully. " * 60
    path = write_traces(tmp_path / "t.jsonl", traces)
    verify = {"verify": {"traces": path, "out": str(tmp_path / "kept.jsonl"), "keep": "all"}}
    train = {"student": str(smollm2_dir), "traces": path, "out": str(tmp_path / "s"), "overlong": "truncate"}
    faulty = recipe(tmp_path, [verify, {"train": {**train, "max_length": 256}}])
    rc, out = check(faulty, capsys=capsys)
    length = [line for line in out if "] length:" in line]
    assert rc == 1 and length[0].startswith("[FAIL]") and "3 of 10 traces (30%)" in length[0]
    assert "not to stop" in length[0] and " -> --max-length " in length[0]
    assert out[-1].endswith("1 error")

    assert main(["run", str(faulty), "--check"]) == 1
    assert "distill run: a check failed" in capsys.readouterr().err
    assert not (tmp_path / "kept.jsonl").exists()  # no step ran

    longest = length[0].split(" -> --max-length ")[1].split(" ")[0].replace(",", "")
    fixed = recipe(tmp_path, [verify, {"train": {**train, "max_length": int(longest)}}])
    rc, out = check(fixed, capsys=capsys)
    assert rc == 0 and [line for line in out if "] length:" in line][0].startswith("[  ok]")
    assert main(["run", str(fixed), "--check", "--only", "verify"]) == 0  # checks the step it runs, then runs it
    assert (tmp_path / "kept.jsonl").is_file()


def test_teacher_faults_at_the_command_line(tmp_path, qwen, smollm2_dir, capsys):
    """Another tokenizer under logit KD: ok, aligned; an unreachable served teacher: FAIL; SFT and a working
    server: ok."""
    from distill.models import load_tokenizer

    traces = write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in range(2)])
    train = {"student": str(smollm2_dir), "traces": traces, "out": str(tmp_path / "s"), "max_length": 1024}
    rc, out = check(recipe(tmp_path, [{"train": {**train, "method": "kd", "teacher": qwen["teacher"]}}]), capsys=capsys)
    tokenizers = [line for line in out if "] tokenizers:" in line][0]
    assert rc == 0 and tokenizers.startswith("[  ok]") and "logit KD runs aligned" in tokenizers
    rc, out = check(recipe(tmp_path, [{"train": {**train, "method": "sft"}}]), capsys=capsys)
    assert rc == 0 and "[FAIL]" not in "\n".join(out)

    served = {**train, "method": "kd", "teacher_url": f"http://127.0.0.1:{free_port()}/v1",
              "teacher_model": "teacher-7b", "top_logprobs": 8}
    rc, out = check(recipe(tmp_path, [{"train": served}]), capsys=capsys)
    assert rc == 1 and [line for line in out if "] served:" in line][0].startswith("[FAIL] served: ")
    assert "cannot reach the teacher server" in "\n".join(out)
    server = ScoringServer(load_tokenizer(str(smollm2_dir)), model="teacher-7b", schedules=[[]]).start()
    try:
        rc, out = check(recipe(tmp_path, [{"train": {**served, "teacher_url": server.base_url}}]), capsys=capsys)
    finally:
        server.stop()
    lines = [line for line in out if "] served:" in line]
    assert rc == 0 and len(lines) == 3 and all(line.startswith("[  ok]") for line in lines), "\n".join(out)


def test_memory_against_the_gpus_named_and_the_sharding_the_step_asks_for(tmp_path, stand_ins, capsys):
    student = str(stand_ins["Qwen/Qwen2.5-7B-Instruct"])
    train = {"student": student, "traces": str(tmp_path / "later.jsonl"), "out": str(tmp_path / "s"),
             "max_length": 8192, "global_batch_size": 64}
    path = recipe(tmp_path, [{"train": train}])
    rc, out = check(path, "--gpus", "1x24GiB", capsys=capsys)
    memory = [line for line in out if "] memory:" in line][0]
    assert rc == 1 and memory.startswith("[FAIL]") and "does not fit 1x 24GiB card" in memory
    rc, out = check(path, "--gpus", "8x80GiB", "--sharding", "fsdp2", capsys=capsys)
    memory = [line for line in out if "] memory:" in line][0]
    assert rc == 0 and memory.startswith("[  ok]") and "FSDP2 over 8" in memory
    sharded = recipe(tmp_path, [{"train": {**train, "fsdp": "full_shard auto_wrap"}}])  # the step's own sharding
    rc, out = check(sharded, "--gpus", "8x80GiB", capsys=capsys)
    assert rc == 0 and "FSDP2 over 8" in [line for line in out if "] memory:" in line][0]


def test_the_eval_step_is_held_against_the_protocol_of_the_numbers_cited(tmp_path, capsys):
    evaluate = {"model": str(tmp_path / "s"), "tasks": ["distill_aime24", "distill_math500"],
                "out": str(tmp_path / "e")}
    loose = recipe(tmp_path, [{"eval": {**evaluate, "n": 4, "max_tokens": 8192}}])
    rc, out = check(loose, "--cites", "DeepSeek-R1-Distill-Qwen-1.5B", capsys=capsys)
    warned = lines_of(out, "step 1: eval (eval)")
    assert rc == 0 and all(line.startswith("[WARN] protocol: ") for line in warned)
    assert [line.split(" -> ")[1].split(" (or")[0] for line in warned] == [
        "--max-tokens 32768", "--n 64", "--max-tokens 32768", "--n 64"]
    assert "distill_aime24: pass@1 over 4 samples per problem where deepseek-r1 averaged 64" in warned[1]

    published = {"model": "DeepSeek-R1-Distill-Qwen-1.5B", "protocol": "deepseek-r1",
                 "scores": {"aime24": 28.9, "math500": 83.9}}
    same = recipe(tmp_path, [{"eval": {**evaluate, "protocol": "deepseek-r1"}}], reproduces=published)
    rc, out = check(same, capsys=capsys)  # cites what it reproduces
    assert rc == 0 and lines_of(out, "step 1: eval (eval)")[0].startswith("[  ok] protocol: the eval settings match")
    assert lines_of(out, "reproduces")[0].startswith("[  ok] published: DeepSeek-R1-Distill-Qwen-1.5B: aime24 28.9")

    drifted = recipe(tmp_path, [{"eval": {**evaluate, "protocol": "deepseek-r1"}}],
                     reproduces={**published, "scores": {"aime24": 29.9, "math500": 83.9}})
    rc, out = check(drifted, capsys=capsys)
    assert rc == 1 and lines_of(out, "reproduces")[0].startswith("[FAIL] published: ")
    assert "aime24 29.9 (published: 28.9)" in lines_of(out, "reproduces")[0]


def test_bad_stand_ins_and_recipes_are_one_line_errors(tmp_path, capsys):
    path = recipe(tmp_path, [{"eval": {"model": "m"}}])
    assert main(["check", str(path), "--stand-in", "Qwen/Qwen2.5-7B"]) == 2
    assert "say NAME=DIR" in capsys.readouterr().err
    assert main(["check", str(path), "--stand-in", f"Qwen/Qwen2.5-7B={tmp_path / 'none'}"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    bad = recipe(tmp_path, [{"train": {"student": "s", "traces": "t.jsonl", "out": "o", "lr": -1}}])
    assert main(["check", str(bad)]) == 2
    assert "--lr must be > 0" in capsys.readouterr().err  # the step's config is built as distill run builds it


# ---------------------------------------------------------------- eval --protocol


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_protocol_sets_exactly_the_published_settings(name):
    from distill.eval.data import task_spec

    p = PROTOCOLS[name]
    tasks = ["distill_aime24", "distill_math500", "distill_amc23"]
    cfg = make(EvalConfig, model="m", protocol=name, tasks=tasks)
    s = cfg.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (p.temperature, p.top_p, p.top_k, p.max_tokens)
    for t in tasks:
        spec = task_spec(t, cfg.task_sampling(t), data_dir=None)
        wanted_k = p.samples.get(benchmark(t), p.n)
        assert spec.config["repeats"] == (wanted_k or {"distill_aime24": 16, "distill_math500": 4,
                                                       "distill_amc23": 8}[t])  # unstated: the task's own
        gen = spec.config["generation_kwargs"]
        assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (p.temperature, p.top_p, p.top_k)
        assert gen["max_gen_toks"] == p.max_tokens_for.get(benchmark(t), p.max_tokens)


def test_published_settings_by_hand():
    """The protocols' numbers as their sources give them."""
    aime = {name: make(EvalConfig, model="m", protocol=name).task_sampling("distill_aime24") for name in PROTOCOLS}
    assert (aime["deepseek-r1"].temperature, aime["deepseek-r1"].top_p, aime["deepseek-r1"].max_tokens,
            aime["deepseek-r1"].n) == (0.6, 0.95, 32768, 64)
    assert (aime["open-r1"].n, make(EvalConfig, model="m", protocol="open-r1").task_sampling("distill_math500").n) \
        == (64, 4)
    assert (aime["qwen3-thinking"].top_k, aime["qwen3-thinking"].max_tokens, aime["qwen3-thinking"].n) == \
        (20, 38912, 64)
    assert (aime["thinking-machines"].temperature, aime["thinking-machines"].top_p, aime["thinking-machines"].top_k,
            aime["thinking-machines"].max_tokens) == (1.0, 1.0, 0, 64000)


def test_a_flag_still_sets_what_the_protocol_sets_with_a_note(capsys, monkeypatch):
    monkeypatch.setattr(config, "_NOTED", set())
    cfg = build(EvalConfig, ("recipe.yaml [eval]", {"model": "m", "protocol": "qwen3-thinking"}),
                ("flags", {"temperature": "1.0", "n": "4"}))
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 0.95 and cfg.sampling.top_k == 20
    aime = cfg.task_sampling("distill_aime24")
    assert (aime.n, aime.max_tokens) == (4, 38912)  # --n set outright wins; the AIME budget is still the protocol's
    err = capsys.readouterr().err
    assert "flags: --temperature 1.0 replaces protocol qwen3-thinking's 0.6" in err
    assert "flags: --n 4 replaces" not in err  # qwen3-thinking states k for AIME only: nothing whole-eval to replace
    again = config.replace(cfg, label="x")
    assert again.task_sampling("distill_aime24") == aime  # rebuilt from what was set outright, the protocol under it
    assert make(EvalConfig, model="m").protocol is None and make(EvalConfig, model="m").task_sampling("x") == \
        make(EvalConfig, model="m").sampling


def test_eval_samples_as_the_protocol_says_and_records_it(server, shared_data, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    common = ["--tasks", "distill_aime24", "--model-url", server.base_url, "--limit", 2, "--data-dir", shared_data,
              "--out", out]
    assert main(["eval", *map(str, common), "--protocol", "thinking-machines", "--n", "2", "--run-name", "tm"]) == 0
    assert {(r["temperature"], r["top_p"]) for r in server.seen} == {(1.0, 1.0)}
    res = load_results(out / "tm")
    assert res["protocol"]["name"] == "thinking-machines" and res["protocol"]["changed"] == {}
    assert "ca232b08" in res["protocol"]["source"]
    assert (res["generation"]["temperature"], res["generation"]["top_p"]) == (1.0, 1.0)

    assert main(["eval", *map(str, common), "--protocol", "deepseek-r1", "--n", "2", "--run-name", "r1"]) == 0
    res = load_results(out / "r1")
    assert res["protocol"]["changed"] == {"distill_aime24": {"n": 2}}  # 2 samples where DeepSeek averaged 64
    assert res["tasks"]["distill_aime24"]["k"] == 2


# ---------------------------------------------------------------- compare


def test_compare_shows_each_rows_protocol_and_marks_rows_whose_protocols_differ(tmp_path, capsys):
    def under(label, protocol, changed=None):
        res = result(label, {"distill_aime24": task(0.3, 0.05, 0.4, 0.9)})
        if protocol:
            res["protocol"] = {"name": protocol, "source": PROTOCOLS[protocol].source, "changed": changed or {}}
        return res

    same = [write(tmp_path / "a", name, under(name, "deepseek-r1")) for name in ("one", "two")]
    assert main(["compare", *map(str, same)]) == 0
    table = capsys.readouterr().out
    assert "| protocol " in table and table.count("| deepseek-r1 ") == 2 and "NOT COMPARABLE" not in table

    other = write(tmp_path / "b", "three", under("three", "open-r1"))
    changed = write(tmp_path / "b", "four", under("four", "deepseek-r1", {"distill_aime24": {"n": 4}}))
    unnamed = write(tmp_path / "b", "five", under("five", None))
    assert main(["compare", str(same[0]), str(other)]) == 2
    assert "in protocol 'open-r1' vs 'deepseek-r1'" in capsys.readouterr().err
    assert main(["compare", str(same[0]), str(other), str(changed), str(unnamed), "--force"]) == 0
    table = capsys.readouterr().out
    assert all(f"{label} ⚠ NOT COMPARABLE" in table for label in ("three", "four", "five"))
    assert "deepseek-r1 (changed: n)" in table and "protocol = the published evaluation protocol" in table
