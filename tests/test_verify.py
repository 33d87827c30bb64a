"""The grader: extraction, gold normalisation, a hand-written verdict table, every MATH-500 gold,
the hard timeout on an input that hangs math-verify, and the ``distill verify`` command."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.decontaminate import Decontaminator
from distill.grading import Grader, extract_answer, grade, normalize_gold

TABLE = yaml.safe_load((Path(__file__).parent / "grading_cases.yaml").read_text())
CASES = TABLE["cases"]
FORMS = TABLE["forms"]  # several boxes, decimal commas, space separators (issue 22)
HANGS = r"9^{9^{9^{9}}}"  # sympy grinds on this for minutes; math-verify's SIGALRM only works on the main thread


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout=5.0) as g:
        yield g


def test_final_answer_comes_after_thinking():
    assert extract_answer(r"<think>maybe \boxed{3}</think>So the answer is \boxed{4}.") == "4"
    assert extract_answer(r"<think>I think \boxed{3} but I ran out of tok") is None
    assert extract_answer(r"\boxed{\frac{1}{\sqrt{2}}} and then \fbox{7}") == "7"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer("The final answer is $42$.") == "42"
    assert extract_answer("no answer here") is None


def test_boxes_joined_only_by_separators_are_one_answer():
    assert extract_answer(r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}") == "(2, 2), (6, 2)"
    assert extract_answer(r"$x_1 = \boxed{2}$ and $x_2 = \boxed{5}$.") == "2, 5"
    assert extract_answer(r"\boxed{\boxed{6}}, \boxed{7}") == "6, 7"
    assert extract_answer(r"\boxed{5}.\n\n\boxed{5}") == "5"
    assert extract_answer(r"The area is \boxed{12}, so the perimeter is \boxed{14}.") == "14"
    assert extract_answer(r"\boxed{1}" + " ," * 50 + r"\boxed{2}") == "2"  # too far apart to be one answer


def test_numbers_with_spaces_and_decimal_commas():
    assert extract_answer(r"\boxed{1\,000\,000}") == "1000000"
    assert extract_answer("The answer is 12 345,5.") == "12345.5"
    assert normalize_gold("0,111") == "0,111"  # a decimal, not 111
    assert normalize_gold("#### 1,234") == "1234"


def test_equivalent_answers_with_a_decimal_comma(grader):
    assert grader.equivalent("1000,99", "1000.99")
    assert grader.equivalent("2, 1", "1,2")
    assert not grader.equivalent("1,2", "1.3")


def test_gold_normalisation():
    assert normalize_gold("007") == "7"
    assert normalize_gold("0") == "0"
    assert normalize_gold(27.0) == "27"
    assert normalize_gold(2.5) == "2.5"
    assert normalize_gold("She pays 2 * 617 = <<2*617=1234>>1234\n#### 1,234") == "1234"
    assert normalize_gold(r"\frac{1}{2}") == r"\frac{1}{2}"


def test_table_has_enough_cases():
    assert len(CASES) >= 60
    assert sum(c["expect"] for c in CASES) >= 25 and sum(not c["expect"] for c in CASES) >= 25


def ids(cases: list[dict]) -> list[str]:
    return [f"{i}:{c['response'][:40]}" for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_hand_written_verdicts(grader, case):
    assert grader.grade(case["response"], case["gold"]) is case["expect"], case.get("note", "")


def test_forms_table_covers_each_kind():
    assert len(FORMS) >= 30
    assert sum(c["expect"] for c in FORMS) >= 15 and sum(not c["expect"] for c in FORMS) >= 10


@pytest.mark.parametrize("case", FORMS, ids=ids(FORMS))
def test_answers_in_several_boxes_and_other_number_forms(grader, case):
    assert grader.grade(case["response"], case["gold"]) is case["expect"], case.get("note", "")


# Shifted-by-one MATH-500 golds that really are the same answer: identical strings, and "x=5"
# (the problem asks for x) against 5.
GENUINELY_EQUAL = {("5", "x=5"), ("7", "7"), ("3", "3")}


def test_every_math500_gold(grader, shared_data):
    golds = [json.loads(line)["answer"] for line in (shared_data / "math500.jsonl").open()]
    assert len(golds) == 500
    same = grader.grade_many([(f"The answer is $\\boxed{{{g}}}$.", g) for g in golds])
    assert [g for g, ok in zip(golds, same) if not ok] == []

    shifted = [golds[(i + 1) % len(golds)] for i in range(len(golds))]
    wrong = grader.grade_many([(f"\\boxed{{{s}}}", g) for s, g in zip(shifted, golds)])
    equal = {(g, s) for g, s, ok in zip(golds, shifted, wrong) if ok}
    assert equal == GENUINELY_EQUAL


def test_equivalent_answers_for_voting(grader):
    assert grader.equivalent(r"\frac{1}{2}", "0.5")
    assert grader.equivalent(r"(-\infty,3]", r"(-\infty, 3]")
    assert not grader.equivalent("2", "3")


def test_counts_extraction_failures():
    with Grader(workers=1) as g:
        assert g.grade("I could not finish", "3") is False
        assert g.grade("<think>still thinking", "3") is False
        assert g.extraction_failures == 2 and g.comparisons == 0


def test_grade_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(grade(r"so \boxed{0.5}", r"\frac{1}{2}")))
    t.start()
    t.join()
    assert out == [True]


def test_the_hanging_input_really_hangs_math_verify():
    """Without a killable process (math-verify's timeouts off, as they must be off the main thread)."""
    code = ("from math_verify import parse, verify;"
            f"verify(parse('$1$'), parse(r'${HANGS}$', parsing_timeout=None), timeout_seconds=None)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=6)
    finally:
        proc.kill()
        proc.wait()


def test_hanging_comparison_times_out_and_grading_goes_on():
    with Grader(timeout=1.5, workers=1) as g:
        assert g.grade(r"\boxed{2}", "2") is True  # the worker has started: time only the comparison
        start = time.monotonic()
        assert g.grade(rf"\boxed{{{HANGS}}}", "1") is False
        assert time.monotonic() - start < 1.5 + 1.0
        assert g.timeouts == 1
        assert g.grade(r"\boxed{\frac{1}{2}}", "0.5") is True  # on a fresh worker
        assert g.grade(r"\boxed{3}", "4") is False
        assert g.timeouts == 1


# --- distill verify ------------------------------------------------------------------------------


def trace(prompt_id, sample, problem, answer, reference="4", finish="stop", tokens=100, reasoning="r"):
    return {"id": f"{prompt_id}#{sample}", "prompt_id": prompt_id, "sample": sample,
            "messages": [{"role": "user", "content": f"{problem}\nPlease reason step by step."}],
            "reasoning": reasoning, "answer": answer, "reference": reference, "finish_reason": finish,
            "usage": {"completion_tokens": tokens}, "teacher": "t", "created_at": "2025-01-01T00:00:00Z"}


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def traces(tmp_path, shared_data):
    aime = json.loads((shared_data / "aime24.jsonl").open().readline())
    leaked = "  ".join(aime["problem"].split()).upper()  # reformatted, still the same problem
    return write(tmp_path / "traces.jsonl", [
        trace("p1", 0, "What is 2+2?", r"It is \boxed{4}.", tokens=300),
        trace("p1", 1, "What is 2+2?", r"It is \boxed{4}.", tokens=300),  # duplicate of sample 0
        trace("p1", 2, "What is 2+2?", r"It is \boxed{5}."),  # wrong
        trace("p1", 3, "What is 2+2?", "", finish="length", reasoning="<think>2+2 is"),  # truncated
        trace("p2", 0, "Half of one?", r"\boxed{0.5}", reference=r"\frac{1}{2}", tokens=50, reasoning="a"),
        trace("p2", 1, "Half of one?", r"\boxed{\frac12}", reference=r"\frac{1}{2}", tokens=20, reasoning="b"),
        trace("p2", 2, "Half of one?", r"\boxed{1/2}", reference=r"\frac{1}{2}", tokens=90, reasoning="c"),
        trace("p3", 0, leaked, rf"\boxed{{{aime['answer']}}}", reference=aime["answer"]),
        trace("p4", 0, "What is 3+3?", r"\boxed{5}", reference="6"),
    ])


def run_verify(*args) -> int:
    return main(["verify", *map(str, args)])


def test_verify_command_filters_and_reports(tmp_path, traces, shared_data, capsys):
    out = tmp_path / "kept.jsonl"
    assert run_verify("--input", traces, "--out", out, "--dedupe", "--max-per-prompt", 2,
                      "--decontaminate", f"{shared_data / 'aime24.jsonl'},{shared_data / 'amc23.jsonl'}") == 0
    kept = [json.loads(line) for line in out.open()]
    assert [r["id"] for r in kept] == ["p1#0", "p2#0", "p2#1"]  # p2: the two shortest
    assert all(r["correct"] is True for r in kept)
    summary = json.loads(Path(f"{out}.run.json").read_text())["summary"]
    assert summary["dropped"] == {"contaminated": 1, "truncated": 1, "incorrect": 2, "duplicate": 1,
                                  "over max-per-prompt": 1}
    assert summary["kept"] == 3 and summary["records"] == 9
    assert summary["contaminated_prompts"] == 1
    assert summary["extraction_failures"] == 1  # the truncated sample never finished thinking
    # p1: 2/4, p2: 3/3, p3: 1/1, p4: 0/1
    assert summary["pass_rate_histogram"] == {"0%": 1, "1-25%": 0, "26-50%": 1, "51-75%": 0,
                                              "76-99%": 0, "100%": 2}
    report = capsys.readouterr().out
    assert "contaminated" in report and "pass rate" in report


def test_verify_keep_all_marks_every_record(tmp_path, traces):
    out = tmp_path / "all.jsonl"
    assert run_verify("--input", traces, "--out", out, "--keep", "all", "--no-drop-truncated") == 0
    kept = [json.loads(line) for line in out.open()]
    assert len(kept) == 9
    assert [r["correct"] for r in kept] == [True, True, False, False, True, True, True, True, False]


def test_verify_random_preference_is_seeded(tmp_path, traces):
    picks = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert run_verify("--input", traces, "--out", out, "--max-per-prompt", 1, "--prefer", "random",
                          "--seed", 3) == 0
        picks.append([json.loads(line)["id"] for line in out.open()])
    assert picks[0] == picks[1] and len(picks[0]) == 3  # one per prompt with a correct sample


def test_missing_reference_names_file_and_line(tmp_path, capsys):
    path = write(tmp_path / "t.jsonl", [trace("p", 0, "q", r"\boxed{1}", reference="1"),
                                        trace("p", 1, "q", r"\boxed{1}", reference=None)])
    assert run_verify("--input", path, "--out", tmp_path / "o.jsonl") == 2
    assert f"{path}:2: field 'reference'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert run_verify("--input", path, "--out", tmp_path / "o.jsonl", "--keep", "all") == 0
    assert [json.loads(line)["correct"] for line in (tmp_path / "o.jsonl").open()] == [True, None]


def test_decontamination_ignores_formatting_but_not_content(shared_data):
    d = Decontaminator([shared_data / "math500.jsonl", shared_data / "gsm8k_test.jsonl"])
    problem = json.loads((shared_data / "gsm8k_test.jsonl").open().readline())["question"]
    assert d.contaminated("Solve this:\n" + problem.replace(" ", "\n").lower())
    assert not d.contaminated("Janet has ducks. How many eggs does a duck lay in a year if it lays one a day?")


def test_benchmark_file_without_problem_field_is_named(tmp_path):
    bad = write(tmp_path / "bench.jsonl", [{"text": "x"}])
    with pytest.raises(Exception, match=r"bench.jsonl:1: no 'problem' or 'question'"):
        Decontaminator([bad])
