"""``distill train`` and ``distill logits`` with a teacher of another tokenizer, through ``cli.main``.

The setting is tests/test_cross_tokenizer_learning.py's: a tiny Qwen2-tokenizer teacher fitted to a few
traces, a random tiny Llama 3-tokenizer student, pure KD (``--kd-weight 1``), and the student's NLL per
UTF-8 byte of held-out teacher text as the measure. Here each teacher source runs as a user runs it:
online, a cache from ``distill logits``, API top_logprobs cached without ``--student``, a served teacher,
and on-policy; the run record says which path ran and how the text aligned. Bad input: one line,
nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from distill.cli import main

from test_cross_tokenizer_learning import (HELD, KD, deepseek_response, held_out, setting,  # noqa: F401 (fixtures)
                                           teacher_dir, teacher_nll_per_byte_of_samples)
from test_train_sft_data import make_trace, write_traces

QUIET = ["--report-to", "none", "--logging-steps", "100", "--save-steps", "1000"]
#: the library tests' schedule (one batch of the four KD traces, 8 steps at a constant 2e-2), as flags
PURE_KD = ["--kd-weight", "1", "--max-steps", "8", "--batch-size", "4", "--lr", "2e-2", "--lr-scheduler", "constant",
           "--warmup-ratio", "0", "--eval-fraction", "0", "--no-gradient-checkpointing", *QUIET]


def trained(out: Path):
    from distill.models import load_model

    return load_model(str(out), "cpu")


def kd_record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["kd"]


def assert_aligned(kd: dict, mode: str) -> None:
    """The record of a cross-tokenizer run: the path, and the student's tokens by kind (Llama 3 writes
    numbers in runs of three digits, Qwen2 digit by digit: many-to-one), all the text found."""
    counts = kd["alignment"]
    assert kd["mode"] == mode and kd["tokenizers"] == "cross", kd
    assert counts["one_to_one"] > counts["many_to_one"] > 0 and counts["matched_bytes"] == counts["bytes"] > 0


def test_an_online_teacher_of_another_tokenizer_teaches_through_the_cli(setting, teacher_dir, capsys):
    _, _, _, student_dir, work, measure = setting
    traces, out = write_traces(work / "kd.jsonl", KD), work / "online"
    assert main(["train", "--method", "kd", "--teacher", str(teacher_dir), "--student", str(student_dir),
                 "--traces", traces, "--out", str(out), "--top-logprobs", "32", *PURE_KD]) == 0
    log = capsys.readouterr().out
    assert "has another tokenizer than student" in log and "% many-to-one" in log
    kd = kd_record(out)
    assert_aligned(kd, "online")
    assert kd["top_k"] == 32 and kd["uld_weight"] == 1.0
    after = held_out(setting, trained(out))
    assert after < 0.6 * measure["student"], (after, measure)


def test_a_cache_from_distill_logits_teaches_a_student_of_another_tokenizer(setting, teacher_dir):
    """``distill logits --student S`` with S of another tokenizer caches the teacher's own tokens (and its
    tokenizer); ``distill train --teacher DIR`` aligns S to them when it opens the cache."""
    _, t_tok, _, student_dir, work, measure = setting
    traces, cache, out = write_traces(work / "kd.jsonl", KD), work / "cache", work / "from-cache"
    assert main(["logits", "--teacher", str(teacher_dir), "--student", str(student_dir), "--traces",
                 traces, "--out", str(cache), "--top-logprobs", "16"]) == 0
    header = json.loads((cache / "index.json").read_text())["header"]
    assert header["tokens"] == "teacher" and header["vocab_size"] >= len(t_tok)
    assert (cache / "teacher-tokenizer" / "tokenizer.json").is_file()
    assert main(["train", "--method", "kd", "--teacher", str(cache), "--student", str(student_dir), "--traces", traces,
                 "--out", str(out), *PURE_KD]) == 0
    assert_aligned(kd_record(out), "offline")
    after = held_out(setting, trained(out))
    assert after < 0.6 * measure["student"], (after, measure)


def test_api_top_logprobs_cached_without_a_student_teach_a_student_of_another_tokenizer(setting):
    """DeepSeek-shaped top_logprobs in the traces; ``distill logits`` without --student keeps them in the
    teacher's own token strings (resumably: a rerun numbers the tokens as the first run did), and that cache
    trains a Llama 3 student."""
    from test_cross_tokenizer_learning import deepseek_traces

    teacher, t_tok, _, student_dir, work, measure = setting
    traces = deepseek_traces(teacher, t_tok)
    path, cache, out = work / "api.jsonl", work / "api-cache", work / "from-api"
    logits = ["logits", "--traces", str(path), "--out", str(cache), "--shard-size", "2"]
    write_traces(path, traces[:2])
    assert main(logits) == 0
    write_traces(path, traces)
    assert main(logits) == 0
    index = json.loads((cache / "index.json").read_text())
    assert [s["traces"] for s in index["shards"]] == [2, 2]
    assert index["header"]["tokens"] == "teacher" and index["header"]["teacher_vocab"] == "strings"
    assert index["header"]["top_k"] == 5 and (cache / "teacher-strings.json").is_file()
    assert main(["train", "--method", "kd", "--teacher", str(cache), "--student", str(student_dir), "--traces",
                 str(path), "--out", str(out), *PURE_KD]) == 0
    assert_aligned(kd_record(out), "offline")
    after = held_out(setting, trained(out))
    assert after < 0.6 * measure["student"], (after, measure)


def test_a_served_teacher_of_another_tokenizer_scores_its_own_tokens_in_train_and_logits(setting, teacher_dir):
    """A vLLM-shaped server of a Qwen2-tokenizer teacher: ``train --teacher-url`` finds the teacher's tokenizer
    without the server (--teacher names a directory that has it) and has the server score the teacher's own
    tokens; ``logits --teacher-url --teacher-tokenizer`` without --student caches them for any student."""
    sys.path.insert(0, str(Path(__file__).parent / "servers"))
    from scoring_server import ScoringServer

    from distill.rendering import RenderOptions, load_examples

    _, t_tok, s_tok, student_dir, work, _ = setting
    traces = write_traces(work / "served.jsonl", KD)
    teacher_ids = [ex["teacher_input_ids"]
                   for ex in load_examples(traces, s_tok, RenderOptions(), teacher_tokenizer=t_tok)[0]]
    server = ScoringServer(t_tok, model="teacher-7b", schedules=[[]]).start()
    served = ["--teacher-url", server.base_url, "--teacher-model", "teacher-7b", "--top-logprobs", "8",
              "--retry-backoff", "0.05"]
    short = ["--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0", "--no-gradient-checkpointing", *QUIET]
    try:
        out = work / "served"  # packed rows: the teacher's side is found per sequence
        assert main(["train", "--method", "kd", "--teacher", str(teacher_dir), *served, "--student", str(student_dir),
                     "--traces", traces, "--out", str(out), "--packing", *short]) == 0
        assert_aligned(kd_record(out), "served")
        assert all(any(full[:len(ids)] == ids and 2 * len(ids) > len(full) for ids in server.scored)
                   for full in teacher_ids)  # each trace in the teacher's own template and tokens (to its last row)
        cache = work / "served-cache"
        assert main(["logits", "--teacher-tokenizer", str(teacher_dir), *served, "--traces", traces,
                     "--out", str(cache)]) == 0
    finally:
        server.stop()
    header = json.loads((cache / "index.json").read_text())["header"]
    assert header["tokens"] == "teacher" and header["source"] == "served" and header["vocab_size"] == len(t_tok)
    out = work / "from-served-cache"
    assert main(["train", "--method", "kd", "--teacher", str(cache), "--student", str(student_dir), "--traces", traces,
                 "--out", str(out), *short]) == 0
    assert_aligned(kd_record(out), "offline")


@pytest.mark.slow  # sampling from a 128k-vocabulary student on a CPU, 8 on-policy steps: ~60 s on the 2-core machine
def test_on_policy_across_tokenizers_through_the_cli(setting, teacher_dir):
    """``--method on-policy`` with a local teacher of another tokenizer: the teacher reads the student's samples
    in its own tokens, and the teacher's NLL per byte of what the student writes falls; the record counts the
    rollouts' tokens in its alignment."""
    from distill.models import load_model
    from distill.rendering import RenderOptions, load_examples
    from distill.teachers.align import TeacherSide
    from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher
    from distill.train.onpolicy.rollouts import HFRollouts, RolloutSettings, prompt_ids

    teacher, t_tok, s_tok, student_dir, work, _ = setting
    traces, out = write_traces(work / "kd.jsonl", KD), work / "on-policy"
    assert main(["train", "--method", "on-policy", "--teacher", str(teacher_dir), "--student", str(student_dir),
                 "--traces", traces, "--out", str(out), "--max-tokens", "12", "--top-logprobs", "32", *PURE_KD]) == 0
    kd = kd_record(out)
    assert kd["loss"] == "rkl" and kd["tokenizers"] == "cross"

    examples = load_examples(traces, s_tok, RenderOptions(), teacher_tokenizer=t_tok)[0]
    side = TeacherSide(examples, s_tok, t_tok, "llama3", "qwen2")
    assert kd["alignment"]["one_to_one"] > side.counts["one_to_one"]  # the rollouts were aligned as they came
    online = AlignedOnlineTeacher(OnlineTeacher(teacher, len(s_tok)), side, len(s_tok), top_k=32)
    engine = HFRollouts(s_tok, RolloutSettings(max_tokens=12, temperature=1.0))
    prompts = [prompt_ids(ex) for ex in examples]
    before = teacher_nll_per_byte_of_samples(setting, online, load_model(str(student_dir), "cpu"), prompts, engine)
    after = teacher_nll_per_byte_of_samples(setting, online, trained(out), prompts, engine)
    assert after < 0.7 * before, (before, after)


def test_on_policy_from_prompts_alone_reads_the_rollouts_in_the_teachers_tokens(setting, teacher_dir):
    """``--prompts`` (no traces): each prompt is rendered in both templates, and the student's rollouts are
    the only text the teacher reads."""
    _, _, _, student_dir, work, _ = setting
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?"}) + "\n" for i in range(4)))
    out = work / "prompts-on-policy"
    assert main(["train", "--method", "on-policy", "--teacher", str(teacher_dir), "--student", str(student_dir),
                 "--prompts", str(prompts), "--out", str(out), "--max-tokens", "6", "--max-steps", "1",
                 "--batch-size", "4", "--no-gradient-checkpointing", *QUIET]) == 0
    kd = kd_record(out)
    assert kd["tokenizers"] == "cross" and kd["on_policy"]["prompts"] == str(prompts)
    assert 0 < sum(kd["alignment"][kind] for kind in ("one_to_one", "many_to_one", "one_to_many", "unmapped")) <= 4 * 6


def test_routed_teachers_one_of_another_tokenizer_each_take_their_own_path(setting, teacher_dir):
    """Several teachers (issue 36) where one has another tokenizer: that one is aligned, the one of the student's
    tokenizer keeps the exact path, and the run record says which for each."""
    _, _, _, student_dir, work, _ = setting
    traces = write_traces(work / "routed.jsonl", [make_trace(30 + i, domain="qwen" if i % 2 else "own")
                                                  for i in range(4)])
    out = work / "routed"
    assert main(["train", "--method", "kd", "--teacher", f"qwen={teacher_dir},own={student_dir}", "--route-field",
                 "domain", "--student", str(student_dir), "--traces", traces, "--out", str(out), "--top-logprobs",
                 "32", *PURE_KD[:2], "--max-steps", "1", "--batch-size", "4", "--no-gradient-checkpointing",
                 *QUIET]) == 0
    teachers = kd_record(out)["teachers"]
    assert teachers["qwen"]["tokenizers"] == "cross" and teachers["own"]["tokenizers"] == "same"
    assert teachers["qwen"]["examples"] == teachers["own"]["examples"] == 2


# ---------------------------------------------------------------- bad input: one line, nothing written


def error_line(capsys, command: str) -> str:
    """The command's error: one line of stderr."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"distill {command}: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_cache_whose_teacher_tokenizer_cannot_be_loaded_is_refused(setting, tmp_path, capsys):
    from test_cross_tokenizer import teacher_token_cache

    from distill.rendering import RenderOptions, load_examples

    teacher, t_tok, _, student_dir, work, _ = setting
    traces = write_traces(work / "kd.jsonl", KD)
    cache = teacher_token_cache(tmp_path / "cache", teacher, t_tok, load_examples(traces, t_tok, RenderOptions())[0],
                                top_k=4)
    (cache / "teacher-tokenizer" / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    assert main(["train", "--method", "kd", "--teacher", str(cache), "--student", str(student_dir), "--traces", traces,
                 "--out", str(out), "--max-steps", "1", *QUIET]) == 2
    line = error_line(capsys, "train")
    assert "cannot load the teacher's vocabulary" in line and "teacher-tokenizer" in line
    assert not out.exists()


def test_a_teacher_of_another_tokenizer_without_a_chat_template_is_refused(setting, teacher_dir, without_chat_template,
                                                                        tmp_path, capsys):
    _, _, _, student_dir, work, _ = setting
    traces, base = write_traces(work / "kd.jsonl", KD), without_chat_template(teacher_dir)
    out = tmp_path / "out"
    assert main(["train", "--method", "kd", "--teacher", str(base), "--student", str(student_dir), "--traces", traces,
                 "--out", str(out), "--max-steps", "1", *QUIET]) == 2
    line = error_line(capsys, "train")
    assert "no chat template" in line and str(base) in line
    assert main(["logits", "--teacher", str(base), "--student", str(student_dir), "--traces", traces,
                 "--out", str(out)]) == 2
    assert "no chat template" in error_line(capsys, "logits")
    assert main(["train", "--method", "kd", "--teacher", str(teacher_dir), "--teacher-tokenizer", str(teacher_dir),
                 "--student", str(student_dir), "--traces", traces, "--out", str(out), "--max-steps", "1", *QUIET]) == 2
    line = error_line(capsys, "train")
    assert "--teacher-tokenizer" in line and "served teacher" in line
    assert main(["logits", "--teacher", str(teacher_dir), "--teacher-tokenizer", str(teacher_dir), "--student",
                 str(student_dir), "--traces", traces, "--out", str(out)]) == 2
    assert "served teacher" in error_line(capsys, "logits")
    assert not out.exists()


def test_api_bytes_that_are_not_utf8_text_are_refused_before_anything_is_written(tmp_path, capsys):
    """A trace whose sampled tokens' bytes do not decode (a lead byte followed by ASCII), after a good one:
    ``distill logits`` without --student names its line and token, and writes nothing."""
    from distill.teachers.base import top_entry

    good = [top_entry("Tok", -0.1, [("Tok", -0.1)]), top_entry("yo", -0.3, [("yo", -0.3)])]
    bad = [good[0], top_entry("\ufffd", -0.2, [("\ufffd", -0.2, [0xE6])], [0xE6]), good[1]]
    traces = write_traces(tmp_path / "api.jsonl", [make_trace(1, top_logprobs=good, finish_reason="stop"),
                                                   make_trace(2, top_logprobs=bad, finish_reason="stop")])
    out = tmp_path / "cache"
    assert main(["logits", "--traces", traces, "--out", str(out)]) == 2
    line = error_line(capsys, "logits")
    assert f"{traces}:2: trace 'p2#0'" in line and "not UTF-8 text: generated token 1" in line
    assert not out.exists()
