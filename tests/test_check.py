"""``distill check``: each check fires on a planted fault and stays quiet on the fixed version.

Real parts throughout: SmolLM2's tokenizer and chat template, Qwen2's real 151,936-row tokenizer
(from its vocabulary GGUF) under Qwen2.5-1.5B- and 7B-shaped configs, the vLLM-shaped scoring
server and the real llama-cpp-python server, transformers' own models (on the meta device) for
the parameter counts, and the peaks bench/RESULTS.md measured for the memory estimate.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from distill.check.base_student import check_base_student
from distill.check.memory import CALIBRATION, GiB, SHAPES, Plan, check_memory, estimate, parse_gpus, shape_of
from distill.check.protocol import check_protocol
from distill.check.runner import run_checks
from distill.check.served import check_served
from distill.check.templates import check_rendering
from distill.check.tokenizers import check_tokenizers
from distill.check.verdicts import exit_code, report
from distill.errors import DistillError
from distill.models import load_tokenizer

from test_generate_llamacpp import llama_server, llama_url  # noqa: F401  (the real server's fixtures)
from test_train_sft_data import make_trace, write_traces

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from llama_server import free_port  # noqa: E402
from scoring_server import ScoringServer  # noqa: E402

VOCAB_GGUF = Path.home() / ".cache" / "distill" / "vocab-gguf"
VOCAB_HF = Path.home() / ".cache" / "distill" / "vocab-hf"
QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True)
QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False)
IM_END, ENDOFTEXT = 151645, 151643


def levels(verdicts, check: str) -> list[str]:
    return [v.level for v in verdicts if v.check == check]


def message(verdicts, check: str) -> str:
    return " | ".join(v.message + " -> " + v.fix for v in verdicts if v.check == check)


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir() -> Path:
    """Qwen2's tokenizer (151,936 tokens, ChatML template) from its vocabulary GGUF, saved once as a directory."""
    out = VOCAB_HF / "qwen2"
    if not (out / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        gguf = VOCAB_GGUF / "ggml-vocab-qwen2.gguf"
        if not gguf.is_file():
            pytest.fail(f"{gguf} missing: run 'bash scripts/setup.sh --test' (extracts the vocabulary GGUFs)")
        tmp = out.with_name(f"qwen2.tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(VOCAB_GGUF, gguf_file=gguf.name).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def qwen_like(qwen2_tokenizer_dir, tmp_path_factory):
    """A function: (name, config fields, stop ids) -> a Qwen2.5-shaped model directory without weights."""
    from transformers import Qwen2Config

    def make(name: str, vocab: int, shape: dict, eos: list[int]) -> Path:
        out = tmp_path_factory.mktemp(name)
        for file in qwen2_tokenizer_dir.iterdir():
            shutil.copy(file, out)
        Qwen2Config(vocab_size=vocab, **shape).save_pretrained(out)
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        return out

    return make


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def qwen2_tok(qwen2_tokenizer_dir):
    return load_tokenizer(str(qwen2_tokenizer_dir))


# ---------------------------------------------------------------- tokenizers


def test_padded_rows_of_one_tokenizer_warn_and_equal_rows_pass(qwen_like, qwen2_tok):
    """Qwen2.5-1.5B has 151,936 output rows, Qwen2.5-7B 152,064, one tokenizer (TRL #2215, #3028)."""
    student = qwen_like("qwen2.5-1.5b-like", 151936, QWEN_1_5B, [IM_END, ENDOFTEXT])
    teacher = qwen_like("qwen2.5-7b-like", 152064, QWEN_7B, [IM_END, ENDOFTEXT])
    found = run_checks(student=str(student), teacher=str(teacher), method="kd")  # rows read from the configs
    assert levels(found, "tokenizers") == ["warning"]
    assert "student 151,936, teacher 152,064" in message(found, "tokenizers")
    assert "first 151,936" in message(found, "tokenizers")
    same_rows = check_tokenizers(qwen2_tok, qwen2_tok, student="s", teacher="t", student_rows=151936,
                                 teacher_rows=151936, logit_kd=True)
    assert [v.level for v in same_rows] == ["ok"]


def test_other_tokenizers_allow_sft_only(smollm2_tok, qwen2_tok):
    qwen2 = qwen2_tok
    kd = check_tokenizers(smollm2_tok, qwen2, student="smollm2", teacher="qwen2", student_rows=49152,
                          teacher_rows=151936, logit_kd=True)
    assert [v.level for v in kd] == ["error"] and "different tokenizers" in kd[0].message
    assert "--method sft" in kd[0].fix
    sft = check_tokenizers(smollm2_tok, qwen2, student="smollm2", teacher="qwen2", student_rows=49152,
                           teacher_rows=151936, logit_kd=False)
    assert [v.level for v in sft] == ["ok"] and "SFT" in sft[0].message


def test_renamed_special_tokens_are_one_family_but_not_one_tokenizer(qwen2_tok):
    """DeepSeek-R1-Distill-Qwen renames some of Qwen2.5's special tokens: the same family, not the same ids."""
    student, teacher = qwen2_tok, copy.deepcopy(qwen2_tok)
    teacher.add_special_tokens({"additional_special_tokens": ["<｜begin▁of▁sentence｜>"]})
    found = check_tokenizers(student, teacher, student="qwen2", teacher="r1-distill-like", student_rows=151936,
                             teacher_rows=151936, logit_kd=True)
    assert [v.level for v in found] == ["error"] and "one tokenizer family" in found[0].message


def test_an_api_teacher_is_fine_for_sft_and_refused_for_kd(smollm2_dir):
    sft = run_checks(student=str(smollm2_dir), teacher="deepseek-reasoner")
    assert levels(sft, "tokenizers") == ["ok"] and exit_code(sft) == 0
    kd = run_checks(student=str(smollm2_dir), teacher="deepseek-reasoner", method="kd")
    assert levels(kd, "teacher") == ["error"] and "--method sft" in message(kd, "teacher")


# ---------------------------------------------------------------- the student's template and the traces


def without_think(tokenizer):
    """SmolLM2's template changed as DeepSeek-R1-Distill's is: assistant turns keep only what follows </think>."""
    dropping = tokenizer.chat_template.replace("message['content']", "message['content'].split('</think>')[-1]")
    assert dropping != tokenizer.chat_template
    copy = load_tokenizer(tokenizer.name_or_path)
    copy.chat_template = dropping
    return copy


def test_a_template_that_drops_the_reasoning_fails(smollm2_tok, tmp_path):
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in range(4)])
    options = dict(think_style="think", max_length=4096, overlong="drop")
    dropped = check_rendering(without_think(smollm2_tok), traces, **options)
    assert levels(dropped, "think") == ["error"]
    assert "drops the reasoning" in message(dropped, "think") and f"{traces}:1" in message(dropped, "think")
    kept = check_rendering(smollm2_tok, traces, **options)
    assert levels(kept, "think") == ["ok"] and levels(kept, "template") == ["ok"]


def test_a_template_that_opens_the_think_block_in_the_generation_prompt_fails(smollm2_tok, tmp_path):
    """DeepSeek-R1-Distill's later template writes '<think>' after the generation prompt: training's labels
    need the conversation to continue the generation prompt, which it no longer does."""
    prefilled = load_tokenizer(smollm2_tok.name_or_path)
    prefilled.chat_template = smollm2_tok.chat_template.replace("'<|im_start|>assistant\n'",
                                                                "'<|im_start|>assistant\n<think>\n'")
    assert prefilled.chat_template != smollm2_tok.chat_template
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in range(2)])
    found = check_rendering(prefilled, traces, think_style="think", max_length=4096, overlong="drop")
    assert [v.level for v in found] == ["error"] and "after the generation prompt" in found[0].message


def test_thirty_percent_over_the_length_limit(smollm2_dir, tmp_path):
    traces = [make_trace(i) for i in range(10)]
    for trace in traces[:3]:
        trace["reasoning"] = "Adding them one at a time, carefully. " * 60
    path = write_traces(tmp_path / "t.jsonl", traces)

    def check(max_length: int, overlong: str):
        return run_checks(student=str(smollm2_dir), traces=path, max_length=max_length, overlong=overlong)

    dropped = check(256, "drop")
    assert levels(dropped, "length") == ["warning"] and exit_code(dropped) == 0
    assert "3 of 10 traces (30%)" in message(dropped, "length") and "dropped" in message(dropped, "length")
    truncated = check(256, "truncate")
    assert levels(truncated, "length") == ["error"] and exit_code(truncated) == 1
    assert "not to stop" in message(truncated, "length")
    longest = int(message(dropped, "length").split("--max-length ")[-1].split(" ")[0].replace(",", ""))
    fixed = check(longest, "drop")
    assert levels(fixed, "length") == ["ok"] and exit_code(fixed) == 0, report(fixed)
    not_yet = run_checks(student=str(smollm2_dir), traces=str(tmp_path / "later.jsonl"))
    assert levels(not_yet, "traces") == ["skipped"] and exit_code(not_yet) == 0


# ---------------------------------------------------------------- a Base student sent on-policy


def test_a_base_style_template_on_policy_without_sft_warns(smollm2_tok):
    base = load_tokenizer(smollm2_tok.name_or_path)
    base.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no end-of-turn token
    found = check_base_student(base, student="base", stop_ids=[2], on_policy=1.0, sft_before=False,
                               teacher_tokenizer=smollm2_tok)
    assert [v.level for v in found] == ["warning"]
    assert "writes no end-of-turn token" in found[0].message and "ms-swift #9526" in found[0].message
    after_sft = check_base_student(base, student="base", stop_ids=[2], on_policy=1.0, sft_before=True)
    assert [v.level for v in after_sft] == ["ok"]
    instruct = check_base_student(smollm2_tok, student="instruct", stop_ids=[2], on_policy=1.0, sft_before=False)
    assert [v.level for v in instruct] == ["ok"]


def test_a_base_model_that_never_stops_on_im_end_warns(qwen_like):
    """Qwen's Base models ship the ChatML template but stop on <|endoftext|> only (ms-swift #9526)."""
    base = qwen_like("qwen-base-like", 151936, QWEN_1_5B, [ENDOFTEXT])
    found = run_checks(student=str(base), on_policy=1.0, method="kd")
    assert levels(found, "base-student") == ["warning"]
    stops = "'<|endoftext|>' (id 151643), not on the template's end-of-turn '<|im_end|>'"
    assert stops in message(found, "base-student")
    instruct = qwen_like("qwen-instruct-like", 151936, QWEN_1_5B, [IM_END, ENDOFTEXT])
    assert levels(run_checks(student=str(instruct), on_policy=1.0, method="kd"), "base-student") == ["ok"]


def test_no_chat_template_is_an_error(smollm2_dir, without_chat_template):
    found = run_checks(student=str(without_chat_template(smollm2_dir)))
    assert levels(found, "base-student") == ["error"] and exit_code(found) == 1


# ---------------------------------------------------------------- a served teacher


def serve(tok, **options) -> ScoringServer:
    return ScoringServer(tok, model="teacher-7b", schedules=[[]], **options).start()


def served(url: str, tok, **options):
    return check_served(url, "teacher-7b", tok, student="smollm2", vocab_size=len(tok), top_k=8, timeout=5, **options)


def test_an_unreachable_teacher_fails(smollm2_tok):
    found = served(f"http://127.0.0.1:{free_port()}/v1", smollm2_tok)
    assert [v.level for v in found] == ["error"] and "cannot reach" in found[0].message


def test_a_server_without_prompt_logprobs_fails(smollm2_tok):
    server = serve(smollm2_tok, logprobs=False)
    try:
        found = served(server.base_url, smollm2_tok)
    finally:
        server.stop()
    assert [v.level for v in found] == ["ok", "error"]
    assert "returned no log-probs" in found[1].message


def test_a_working_server_is_scored_at_temperature_one(smollm2_tok):
    server = serve(smollm2_tok)
    try:
        found = served(server.base_url, smollm2_tok)
        other_name = check_served(server.base_url, "teacher-32b", smollm2_tok, student="smollm2",
                                  vocab_size=len(smollm2_tok), timeout=5)
        tempered_kd = served(server.base_url, smollm2_tok, kd_temperature=2.0)
    finally:
        server.stop()
    assert [v.level for v in found] == ["ok", "ok", "ok"], report(found)
    assert "serves 'teacher-7b'" in found[0].message and "top-8 prompt log-probs" in found[1].message
    assert "do not change with the request's temperature" in found[2].message
    assert [v.level for v in other_name] == ["error"] and "--teacher-model teacher-7b" in other_name[0].fix
    assert tempered_kd[-1].level == "error" and "--kd-temperature 1" in tempered_kd[-1].fix


def test_a_server_that_tempers_prompt_logprobs_is_told_apart(smollm2_tok):
    server = serve(smollm2_tok, tempered=True)
    try:
        found = served(server.base_url, smollm2_tok)
    finally:
        server.stop()
    assert found[-1].level == "ok" and "tempers prompt log-probs" in found[-1].message


def test_the_real_llama_cpp_server_passes(llama_url, smollm2_tok):  # noqa: F811  (the fixture)
    found = check_served(llama_url, "SmolLM2", smollm2_tok, student="smollm2", vocab_size=len(smollm2_tok),
                         top_k=5)
    assert [v.level for v in found] == ["ok", "ok", "ok"], report(found)
    assert "answers requests for 'SmolLM2'" in found[0].message  # it lists its model file, answers to any name
    assert "llama-cpp-python server" in found[1].message and "T = 1" in found[2].message


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("description, plan, measured", CALIBRATION, ids=["sft", "online-kd", "on-policy"])
def test_the_estimate_is_within_5_percent_of_the_measured_peaks(description, plan, measured):
    assert estimate(plan)["peak"] / GiB == pytest.approx(measured, rel=0.05), description


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B", "Qwen/Qwen3-8B", "meta-llama/Llama-3.2-1B"])
def test_parameter_counts_are_transformers_own(name):
    """The table's shapes built as real transformers models (on the meta device: no memory) count the same."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    s = SHAPES[name]
    kind = Qwen3Config if "Qwen3" in name else Qwen2Config if "Qwen" in name else LlamaConfig
    config = kind(hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
                  num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                  vocab_size=s.vocab, tie_word_embeddings=s.tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape_of(config) == s
    assert s.parameters() == sum(p.numel() for p in model.parameters())


def test_a_plan_that_fits_8x80_but_not_1x24(qwen_like):
    student = qwen_like("qwen2.5-7b-student", 152064, QWEN_7B, [IM_END, ENDOFTEXT])

    def check(gpus: str):
        return run_checks(student=str(student), max_length=8192, sharding="fsdp2", gpus=gpus)

    small, large = check("1x24GiB"), check("8x80GiB")
    assert levels(small, "memory") == ["error"] and exit_code(small) == 1
    assert "does not fit 1x 24GiB card" in message(small, "memory")
    assert levels(large, "memory") == ["ok"] and "FSDP2 over 8" in message(large, "memory")
    assert levels(run_checks(student=str(student), max_length=8192), "memory") == ["skipped"]  # no GPU named here
    assert parse_gpus("4 x A100-80GB") == (4, 80.0, "A100-80GB") and parse_gpus("H200") == (1, 140.4, "H200")
    with pytest.raises(DistillError, match="--gpus 'eight H100s'"):
        parse_gpus("eight H100s")


def test_a_plan_that_does_not_fit_names_the_change_that_does():
    plan = Plan(SHAPES["Qwen/Qwen2.5-1.5B"], batch_size=8, seq_len=8192, gradient_checkpointing=False)
    found = check_memory(plan, parse_gpus("1xH100"))
    assert [v.level for v in found] == ["error"] and found[0].fix.startswith("--gradient-checkpointing")
    checkpointed = Plan(SHAPES["Qwen/Qwen2.5-1.5B"], batch_size=8, seq_len=8192)
    assert [v.level for v in check_memory(checkpointed, parse_gpus("1xH100"))] == ["ok"]


# ---------------------------------------------------------------- eval protocol


def test_eval_settings_against_the_published_protocol():
    from distill.options import Sampling

    def tasks(**settings):
        return {task: Sampling(**settings) for task in ("distill_aime24", "distill_math500")}

    same = check_protocol("deepseek-r1", tasks(temperature=0.6, top_p=0.95, max_tokens=32768, n=64))
    assert [v.level for v in same] == ["ok"] and "2501.12948" in same[0].message
    other = check_protocol("DeepSeek-R1-Distill-Qwen-1.5B", tasks(temperature=1.0, top_p=0.95, max_tokens=8192, n=4))
    assert all(v.level == "warning" for v in other)
    assert [v.fix.split(" (or")[0] for v in other] == ["--temperature 0.6", "--max-tokens 32768", "--n 64",
                                                       "--max-tokens 32768", "--n 64"]
    assert all(v.fix.endswith("(or --protocol deepseek-r1: all of its settings)") for v in other)
    qwen3 = check_protocol("qwen3-thinking", tasks(temperature=0.6, top_p=0.95, max_tokens=32768, n=64))
    assert [v.fix.split(" (or")[0] for v in qwen3] == ["--top-k 20", "--max-tokens 38912"]  # AIME's longer budget
    unknown = check_protocol("gpt-5", tasks())
    assert [v.level for v in unknown] == ["error"]
