"""distill import / export on small files written from the public datasets' documented schemas."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from distill.cli import main
from distill.prompts import prompt_hash
from distill.records import read_jsonl

STAMP = 1_700_000_000  # the files' mtime, which imported traces take as created_at
CREATED = "2023-11-14T22:13:20+00:00"
OPENTHOUGHTS_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a systematic "
                       "long thinking process before providing the final precise and accurate solutions.")

# OpenR1-Math-220k (default config): one problem, several R1 generations, math-verify's verdicts.
OPENR1 = {
    "problem": "What is 2 + 3?", "solution": "2 + 3 = 5.", "answer": "5", "problem_type": "Algebra",
    "question_type": "math-word-problem", "source": "olympiads", "uuid": "0b1c",
    "is_reasoning_complete": [True, False],
    "generations": ["<think>\nTwo plus three is five.\n</think>\n\nThe answer is $\\boxed{5}$.",
                    "<think>\nMaybe it is six"],
    "correctness_math_verify": [True, False], "correctness_llama": None, "finish_reasons": None,
    "correctness_count": 1,
    "messages": [{"role": "user", "content": "What is 2 + 3?"},
                 {"role": "assistant", "content": "<think>\nTwo plus three is five.\n</think>\n\n$\\boxed{5}$"}],
}
# ShareGPT: conversations of {from, value}, here with a system turn.
SHAREGPT = {"conversations": [{"from": "system", "value": "You are terse."},
                              {"from": "human", "value": "What is 3 + 4?"},
                              {"from": "gpt", "value": "<think>3 and 4 make 7.</think>\\boxed{7}"}]}
# OpenThoughts-114k / Bespoke-Stratos-17k: a system column, conversations with thought/solution markers.
OPENTHOUGHTS = {"system": OPENTHOUGHTS_SYSTEM, "conversations": [
    {"from": "user", "value": "What is 5 + 5?"},
    {"from": "assistant", "value": "<|begin_of_thought|>\n\nFive and five make ten.\n\n<|end_of_thought|>\n\n"
                                   "<|begin_of_solution|>\n\n\\boxed{10}\n\n<|end_of_solution|>"}]}
# OpenAI-style messages (Mixture-of-Thoughts keeps <think> in the assistant turn); this one has none.
MESSAGES = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
# TRL prompt-completion, with a gold answer column.
PROMPT_COMPLETION = {"prompt": "What is 1 + 1?", "completion": "<think>One and one.</think>\\boxed{2}", "answer": "2"}


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.utime(path, (STAMP, STAMP))
    return str(path)


def expected(path, fmt, prompt, messages, reasoning, answer, reference=None, sample=0, row=0, **extra) -> dict:
    pid = prompt_hash(prompt)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return {"id": f"{pid}#{sample}", "prompt_id": pid, "sample": sample, "prompt": prompt, "messages": messages,
            "reasoning": reasoning, "answer": answer, "reference": reference, "finish_reason": "stop",
            "usage": None, "teacher": {"name": path, "kind": "import"}, "created_at": CREATED, **extra,
            "source": {"dataset": path, "format": fmt, "sha256": sha, "split": None, "row": row}}


def run_import(path, out, *flags) -> list[dict]:
    assert main(["import", "--input", path, "--out", str(out), *flags]) == 0
    return read_jsonl(out)


def user(text):
    return [{"role": "user", "content": text}]


def test_each_format_imports_to_exactly_the_expected_records_and_trains(tmp_path, tiny_llama, capsys):
    files = {name: write_rows(tmp_path / f"{name}.jsonl", [row]) for name, row in
             [("openr1", OPENR1), ("sharegpt", SHAREGPT), ("openthoughts", OPENTHOUGHTS), ("messages", MESSAGES),
              ("prompt-completion", PROMPT_COMPLETION)]}
    want = {
        "openr1": [
            expected(files["openr1"], "openr1", "What is 2 + 3?", user("What is 2 + 3?"), "Two plus three is five.",
                     "The answer is $\\boxed{5}$.", reference="5", correct=True),
            {**expected(files["openr1"], "openr1", "What is 2 + 3?", user("What is 2 + 3?"), "Maybe it is six", "",
                        reference="5", sample=1, correct=False), "finish_reason": "length"},
        ],
        "sharegpt": [expected(files["sharegpt"], "sharegpt", "What is 3 + 4?",
                              [{"role": "system", "content": "You are terse."}, *user("What is 3 + 4?")],
                              "3 and 4 make 7.", "\\boxed{7}")],
        "openthoughts": [expected(files["openthoughts"], "openthoughts", "What is 5 + 5?",
                                  [{"role": "system", "content": OPENTHOUGHTS_SYSTEM}, *user("What is 5 + 5?")],
                                  "Five and five make ten.", "\\boxed{10}")],
        "messages": [expected(files["messages"], "messages", "Say hi.", user("Say hi."), "", "Hi!")],
        "prompt-completion": [expected(files["prompt-completion"], "prompt-completion", "What is 1 + 1?",
                                       user("What is 1 + 1?"), "One and one.", "\\boxed{2}", reference="2")],
    }
    everything = []
    for fmt, path in files.items():
        capsys.readouterr()
        got = run_import(path, tmp_path / f"{fmt}.traces.jsonl")
        assert f"format {fmt} (" in capsys.readouterr().out  # auto chose it and says why
        assert got == want[fmt], fmt
        assert run_import(path, tmp_path / f"{fmt}.explicit.jsonl", "--format", fmt) == got
        everything += got

    traces = tmp_path / "all.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in everything))
    out = tmp_path / "student"
    assert main(["train", "--method", "sft", "--student", str(tiny_llama), "--traces", str(traces),
                 "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0",
                 "--save-steps", "1000", "--logging-steps", "1", "--no-gradient-checkpointing",
                 "--report-to", "none"]) == 0
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert len(everything) == 6 and summary["train_examples"] == 5  # train skips OpenR1's incorrect generation


def test_report_counts_rows_skips_and_markers_and_a_rerun_is_idempotent(tmp_path, capsys):
    rows = [MESSAGES,
            {"messages": [{"role": "user", "content": "Q?"}]},  # no answer to learn
            {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                          {"role": "user", "content": "C"}, {"role": "assistant", "content": "<think>x</think>D"}]},
            {"messages": [{"role": "user", "content": "Think?"},
                          {"role": "assistant", "content": "<think>hmm</think>yes"}]},
            {"messages": [{"role": "user", "content": "Think?"},  # the same prompt again: the next sample
                          {"role": "assistant", "content": "", "reasoning_content": "hmm"}]},
            {"messages": [{"role": "user", "content": "Empty?"}, {"role": "assistant", "content": " "}]}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "traces.jsonl"
    got = run_import(path, out)
    report = capsys.readouterr().out
    for label, n in [("rows read", 6), ("records written", 3), ("skipped: no assistant turn", 1),
                     ("skipped: multi-turn", 1), ("skipped: empty completion", 1),
                     ("reasoning markers: <think>", 2), ("reasoning markers: none", 1)]:
        assert re.search(re.escape(label) + rf"\W+{n}\b", report), (label, report)
    assert [(r["sample"], r["reasoning"], r["answer"], r["source"]["row"]) for r in got] == [
        (0, "", "Hi!", 0), (0, "hmm", "yes", 3), (1, "hmm", "", 4)]
    run = json.loads((tmp_path / "traces.jsonl.run.json").read_text())
    assert run["summary"]["skipped"] == {"no assistant turn": 1, "multi-turn": 1, "empty completion": 1}
    assert run["data"]["dataset"]["sha256"] == got[0]["source"]["sha256"]
    before = out.read_bytes()
    assert run_import(path, out) == got and out.read_bytes() == before
    with pytest.raises(AssertionError):  # other settings over an earlier import: refused ...
        run_import(path, out, "--limit", "1")
    assert out.read_bytes() == before
    assert len(run_import(path, out, "--limit", "1", "--overwrite")) == 1  # ... unless asked to replace it


def test_saved_dataset_directories_and_parquet_are_read(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([OPENR1])
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "openr1.parquet"))
    from_dir = run_import(str(tmp_path / "saved"), tmp_path / "a.jsonl")
    from_parquet = run_import(str(tmp_path / "openr1.parquet"), tmp_path / "b.jsonl")
    from_jsonl = run_import(write_rows(tmp_path / "openr1.jsonl", [OPENR1]), tmp_path / "c.jsonl")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("source", "teacher", "created_at")} for r in recs]  # noqa: E731
    assert strip(from_dir) == strip(from_parquet) == strip(from_jsonl)
    assert from_dir[0]["source"]["split"] == "train" and len(from_dir[0]["source"]["sha256"]) == 64


def test_unknown_shape_and_bad_rows_get_one_line_naming_the_place(tmp_path, capsys):
    def error(path, *flags):
        capsys.readouterr()
        assert main(["import", "--input", path, "--out", str(tmp_path / "t.jsonl"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    odd = write_rows(tmp_path / "odd.jsonl", [{"question": "Q", "score": 1}])
    err = error(odd)
    assert "odd.jsonl: cannot tell the format from the columns question, score" in err
    assert "known formats: messages, sharegpt, openr1, openthoughts, prompt-completion" in err
    assert error(odd, "--prompt-field", "question", "--completion-field", "score", "--format", "prompt-completion") \
        .endswith("odd.jsonl:1: field 'score' must be text, got int")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(OPENR1) + "\n{\"problem\": \n")
    assert f"{broken}:2: bad JSON" in error(str(broken))
    missing = write_rows(tmp_path / "missing.jsonl", [OPENR1, {"problem": "Q", "answer": "1"}])
    assert f"{missing}:2: field 'generations' missing" in error(missing)
    uneven = write_rows(tmp_path / "uneven.jsonl", [{**OPENR1, "correctness_math_verify": [True]}])
    assert f"{uneven}:1: field 'correctness_math_verify' has 1 verdicts for 2 generations" in error(uneven)


def test_export_reads_back_with_load_dataset_with_a_card(tmp_path):
    import datasets

    traces = tmp_path / "openr1.traces.jsonl"
    run_import(write_rows(tmp_path / "openr1.jsonl", [OPENR1, {**OPENR1, "problem": "What is 2 + 4?",
                                                               "answer": "6"}]), traces)
    kept = tmp_path / "kept.jsonl"
    assert main(["verify", "--input", str(traces), "--out", str(kept), "--keep", "all", "--no-drop-truncated", "--workers", "1"]) == 0
    records = read_jsonl(kept)
    assert [r["correct"] for r in records] == [True, False, False, False]
    out = tmp_path / "dataset"
    assert main(["export", str(kept), "--out", str(out)]) == 0
    assert main(["export", str(kept), "--out", str(out)]) == 0  # replaces the directory
    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert list(loaded) == records
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "4 chain-of-thought traces for 2 prompts" in card
    assert f'"name": "{tmp_path / "openr1.jsonl"}"' in card and '"format": "openr1"' in card
    assert "## verify report (kept.jsonl)" in card and '"kept": 4' in card
