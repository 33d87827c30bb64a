"""``distill compare`` on hand-made results files: the exact table, refusals, CSV, HTML + PNG."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from distill.cli import main
from distill.errors import DistillError
from distill.report import CompareConfig, compare, load_result

GEN = {"temperature": 0.6, "top_p": 0.95, "max_gen_tokens": 256, "seed": 1234,
       "chat_template": True, "system_prompt": None}


def result(label, tasks, training=None, teacher=None, **gen):
    return {
        "schema_version": 1, "run_name": label, "label": label, "created_at": "2025-01-01T00:00:00Z",
        "model": {"name_or_path": f"runs/{label}/model", "base": None, "teacher": teacher, "training": training},
        "backend": "hf",
        "generation": {**GEN, **gen},
        "versions": {"distill": "0.1.0"},
        "tasks": tasks,
    }


def task(pass1, stderr, cons, finished, k=4, n=16, sha="a" * 64):
    return {"k": k, "n_problems": n, "max_gen_tokens": 256, "data": {"path": "data/gsm8k.jsonl", "sha256": sha},
            "metrics": {"pass@1": pass1, "pass@1_stderr": stderr, "pass@k": None, "cons@k": cons,
                        "cons@k_stderr": 0.1, "finished_rate": finished, "boxed_rate": 0.9,
                        "mean_gen_tokens": 120.5, "timeouts": 0},
            "per_problem": []}


SFT = {"method": "sft", "base_model": "students/half", "teacher": "smollm2-135m-instruct",
       "train_examples": 32, "tokens_seen": 12345, "lora": False}
KD = {**SFT, "method": "kd", "train_examples": 1200, "tokens_seen": 4_560_000, "lora": {"r": 16}}


def write(tmp_path, name, res):
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))
    return d / "results.json"


@pytest.fixture
def three_runs(tmp_path):
    """Teacher (two tasks), an SFT student and a LoRA KD student (gsm8k only), all comparable."""
    runs = tmp_path / "runs"
    write(runs, "a-teacher", result("teacher", {
        "distill_gsm8k": task(0.125, 0.0625, 0.1875, 0.9375),
        "distill_math500": task(0.05, 0.02, 0.1, 0.5, n=500, sha="b" * 64)}))
    write(runs, "b-sft", result("student-sft", {"distill_gsm8k": task(0.0625, 0.03125, 0.0, 1.0)},
                                training=SFT))
    write(runs, "c-kd", result("student-kd", {"distill_gsm8k": task(0.09375, 0.05, 0.125, 0.8125)},
                               training=KD))
    return runs


EXPECTED = """\
| model       | method  | teacher               | train examples | train tokens | distill_gsm8k pass@1 | distill_gsm8k cons@4 | distill_gsm8k finished | distill_math500 pass@1 | distill_math500 cons@4 | distill_math500 finished |
| ----------- | ------- | --------------------- | -------------- | ------------ | -------------------- | -------------------- | ---------------------- | ---------------------- | ---------------------- | ------------------------ |
| teacher     | —       | —                     | —              | —            | 12.5 ± 6.2           | 18.8                 | 94                     | 5.0 ± 2.0              | 10.0                   | 50                       |
| student-sft | sft     | smollm2-135m-instruct | 32             | 12.3k        | 6.2 ± 3.1            | 0.0                  | 100                    | —                      | —                      | —                        |
| student-kd  | kd+lora | smollm2-135m-instruct | 1.2k           | 4.6M         | 9.4 ± 5.0            | 12.5                 | 81                     | —                      | —                      | —                        |

Scores in %: pass@1 ± standard error over k samples per problem, cons@k = majority vote of k; \
finished = answers that ended before the token limit (distill_gsm8k n=16, distill_math500 n=500).
"""


def test_markdown_table_from_a_directory(three_runs, capsys):
    assert compare(CompareConfig(results=[str(three_runs)])) == 0
    assert capsys.readouterr().out == EXPECTED


def test_files_keep_the_order_given(three_runs, capsys):
    files = [three_runs / "c-kd" / "results.json", three_runs / "a-teacher" / "results.json"]
    assert main(["compare", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["student-kd", "teacher"]


def test_one_sample_per_problem_has_no_cons_column(tmp_path, capsys):
    """cons@1 is pass@1: with k = 1 in every row the column would only repeat it."""
    write(tmp_path, "a", result("teacher", {"distill_gsm8k": task(0.125, 0.0625, 0.125, 0.9, k=1)}))
    write(tmp_path, "b", result("student", {"distill_gsm8k": task(0.0625, 0.03, 0.0625, 1.0, k=1)}, training=SFT))
    assert compare(CompareConfig(results=[str(tmp_path)])) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "distill_gsm8k pass@1" in header and "distill_gsm8k finished" in header and "cons@" not in out


@pytest.mark.parametrize("change, named", [
    ({"generation": {"temperature": 0.0}}, "temperature 0.0 vs 0.6"),
    ({"generation": {"system_prompt": "Be brief."}}, "system_prompt 'Be brief.' vs null"),
    ({"k": 8}, "distill_gsm8k k 8 vs 4"),
    ({"sha": "c" * 64}, "distill_gsm8k data sha256"),
])
def test_refuses_rows_with_different_settings(three_runs, capsys, change, named):
    path = three_runs / "b-sft" / "results.json"
    res = json.loads(path.read_text())
    res["generation"].update(change.get("generation", {}))
    if "k" in change:
        res["tasks"]["distill_gsm8k"]["k"] = change["k"]
    if "sha" in change:
        res["tasks"]["distill_gsm8k"]["data"]["sha256"] = change["sha"]
    path.write_text(json.dumps(res))

    assert main(["compare", str(three_runs)]) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "'student-sft'" in err and "'teacher'" in err and named in err
    assert "--force" in err and "student-kd" not in err

    assert main(["compare", str(three_runs), "--force"]) == 0
    out = capsys.readouterr().out
    assert "| student-sft ⚠ NOT COMPARABLE |" in out
    assert f"⚠ NOT COMPARABLE: 'student-sft' differs from 'teacher' in {named}" in out
    assert "student-kd ⚠" not in out


def test_csv_html_and_png_written(three_runs, tmp_path, capsys):
    out_csv, out_html = tmp_path / "out" / "table.csv", tmp_path / "out" / "table.html"
    assert main(["compare", str(three_runs), "--csv", str(out_csv), "--html", str(out_html)]) == 0

    rows = list(csv.DictReader(out_csv.open()))
    assert [r["label"] for r in rows] == ["teacher", "student-sft", "student-kd"]
    assert rows[2]["method"] == "kd+lora" and rows[2]["tokens_seen"] == "4560000"
    assert float(rows[1]["distill_gsm8k pass@1"]) == 0.0625 and rows[1]["distill_math500 pass@1"] == ""

    page = out_html.read_text()
    assert "<td>student-kd</td>" in page and "<td>9.4 ± 5.0</td>" in page
    assert "data:image/png;base64," in page and "http" not in page  # nothing fetched from elsewhere
    png = out_html.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_bad_results_files_are_named(tmp_path):
    bad = tmp_path / "results.json"
    res = result("x", {"distill_gsm8k": task(0.1, 0.1, 0.1, 1.0)})
    broken = copy.deepcopy(res)
    del broken["tasks"]["distill_gsm8k"]["metrics"]["pass@1"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(DistillError, match=r"results.json: missing field 'tasks.distill_gsm8k.metrics.pass@1'"):
        load_result(bad)
    bad.write_text(json.dumps({**res, "schema_version": 4}))
    with pytest.raises(DistillError, match="schema_version.*expected one of 1, 2, 3, got 4"):
        load_result(bad)
    bad.write_text("{\n  oops")
    with pytest.raises(DistillError, match=r"results.json:2: bad JSON"):
        load_result(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="empty: no results.json found"):
        compare(CompareConfig(results=[str(tmp_path / "empty")]))


# ---------------------------------------------------------------- fidelity, the base row, compute and cost

HALF = "/models/smollm2-half"  # the students' base model, as training records it (absolute)
GENERATED = {"traces": "runs/q/traces.jsonl", "teacher": "deepseek-reasoner", "samples": 32,
             "tokens_in": 1_200_000, "tokens_out": 3_400_000, "cost": {"amount": 1.764, "currency": "USD"}}


def fidelity(nll, kl, top1, examples="e" * 64):
    return {"traces": {"path": "runs/q/traces.kept.jsonl", "sha256": "d" * 64},
            "held_out_from": "runs/q/student-sft/run.json", "prompts": 5, "examples": 5,
            "examples_sha256": examples, "target_tokens": 812,
            "render": {"think_style": "none", "max_length": 512, "overlong": "drop"}, "tokenizer_sha": "f" * 16,
            "teacher": {"name": "smollm2-135m-instruct", "kind": "online"},
            "metrics": {"nll": nll, "kl": kl, "top1_agreement": top1}}


def zero_run(label, fid, training=None, path=None):
    res = result(label, {"distill_gsm8k": task(0.0, 0.0, 0.0, 0.0, k=2)}, training=training)
    res["model"].update(path=path, base=training and training["base_model"],
                        data=training and {"traces": {"path": "runs/q/traces.kept.jsonl", "sha256": "d" * 64},
                                           "generation": GENERATED})
    res["fidelity"] = fid
    return res


def trained(method, wall, tokens):
    return {"method": method, "base_model": HALF, "teacher": "deepseek-reasoner", "train_examples": 21,
            "tokens_seen": tokens, "lora": False, "wall_time_s": wall, "device": {"type": "cpu", "count": 2}}


@pytest.fixture
def zero_runs(tmp_path):
    """The quickstart's shape: every pass@1 is 0; the untrained base, SFT and KD students with fidelity."""
    runs = tmp_path / "eval"
    files = {
        "teacher": write(runs, "teacher", zero_run("teacher", fidelity(1.1, 0.0, 1.0))),
        "base": write(runs, "student-base", zero_run("untrained", fidelity(3.2501, 2.0504, 0.41), path=HALF)),
        "sft": write(runs, "student-sft", zero_run("SFT", fidelity(2.1, 0.95, 0.5812), trained("sft", 56.3, 6512))),
        "kd": write(runs, "student-kd", zero_run("KD", fidelity(1.9, 0.62, 0.66), trained("kd", 93.1, 6512))),
    }
    return files


ZERO_EXPECTED = """\
| model     | method | teacher           | train examples | train tokens | distill_gsm8k pass@1 | distill_gsm8k cons@2 | distill_gsm8k finished | NLL/token | KL to teacher | top-1 agree | train time | CPU-hours | teacher tokens | teacher cost |
| --------- | ------ | ----------------- | -------------- | ------------ | -------------------- | -------------------- | ---------------------- | --------- | ------------- | ----------- | ---------- | --------- | -------------- | ------------ |
| teacher   | —      | —                 | —              | —            | 0.0 ± 0.0            | 0.0                  | 0                      | 1.100     | 0.000         | 100.0       | —          | —         | —              | —            |
| untrained | base   | —                 | —              | —            | 0.0 ± 0.0            | 0.0                  | 0                      | 3.250     | 2.050         | 41.0        | —          | —         | —              | —            |
| SFT       | sft    | deepseek-reasoner | 21             | 6.5k         | 0.0 ± 0.0            | 0.0                  | 0                      | 2.100     | 0.950         | 58.1        | 56 s       | 0.031     | 4.6M           | 1.76 USD     |
| KD        | kd     | deepseek-reasoner | 21             | 6.5k         | 0.0 ± 0.0            | 0.0                  | 0                      | 1.900     | 0.620         | 66.0        | 93 s       | 0.052     | 4.6M           | 1.76 USD     |

Scores in %: pass@1 ± standard error over k samples per problem, cons@k = majority vote of k; \
finished = answers that ended before the token limit (distill_gsm8k n=16).
Fidelity on 5 held-out teacher traces (812 tokens), per token: NLL = the model's negative log-likelihood \
of the teacher's tokens, KL = KL(teacher || model) in nats, top-1 agree = % of tokens where model and teacher \
rank the same token first; closer to the teacher = lower NLL and KL, higher agreement.
base = the untrained model the students started from.
train time and device-hours: the training run (wall time x GPUs, or x CPU threads); teacher tokens and cost: \
generating the traces the student learned from, rejected ones included.
"""


def test_fidelity_compute_and_the_base_row_found_beside_the_students(zero_runs, capsys):
    """The base model's results were not named, but sit in the same eval directory: its row comes in."""
    files = [zero_runs[name] for name in ("teacher", "sft", "kd")]
    assert main(["compare", *map(str, files)]) == 0
    assert capsys.readouterr().out == ZERO_EXPECTED


def test_fidelity_and_compute_in_the_csv(zero_runs, tmp_path, capsys):
    out_csv = tmp_path / "table.csv"
    assert main(["compare", str(zero_runs["base"].parent.parent), "--csv", str(out_csv)]) == 0
    rows = {r["label"]: r for r in csv.DictReader(out_csv.open())}
    assert rows["untrained"]["method"] == "base" and rows["teacher"]["method"] == ""
    assert float(rows["untrained"]["fidelity_kl"]) == 2.0504 and float(rows["SFT"]["fidelity_top1_agreement"]) == 0.5812
    assert rows["KD"]["fidelity_teacher"] == "smollm2-135m-instruct" and rows["KD"]["fidelity_target_tokens"] == "812"
    assert rows["KD"]["device"] == "CPU" and float(rows["KD"]["device_hours"]) == round(93.1 * 2 / 3600, 6)
    assert rows["KD"]["train_wall_time_s"] == "93.1" and rows["KD"]["teacher_tokens_out"] == "3400000"
    assert float(rows["SFT"]["teacher_cost"]) == 1.764 and rows["SFT"]["teacher_cost_currency"] == "USD"
    assert rows["teacher"]["teacher_cost"] == "" and rows["teacher"]["device_hours"] == ""


def test_the_chart_shows_fidelity_when_every_pass1_is_zero(zero_runs):
    import matplotlib.pyplot as plt

    from distill.report import add_base_rows, bar_chart_png, chart, load_rows

    rows = add_base_rows(load_rows([zero_runs[n] for n in ("teacher", "base", "sft", "kd")]))
    fig = chart(rows)
    (ax,) = fig.axes
    heights = [round(bar.get_height(), 4) for bar in ax.patches]
    assert heights == [0.0, 2.0504, 0.95, 0.62] and "KL" in ax.get_ylabel()
    plt.close(fig)
    assert bar_chart_png(rows).startswith(b"\x89PNG")


def test_rows_scored_on_other_held_out_traces_are_not_comparable(zero_runs, capsys):
    res = json.loads(zero_runs["kd"].read_text())
    res["fidelity"]["examples_sha256"] = "0" * 64
    zero_runs["kd"].write_text(json.dumps(res))
    assert main(["compare", *map(str, zero_runs.values())]) == 2
    err = capsys.readouterr().err
    assert "not comparable: 'KD'" in err and "fidelity examples '000000000000…' vs 'eeeeeeeeeeee…'" in err


def test_on_an_80_column_terminal_the_table_fits_and_the_files_keep_it_whole(three_runs, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["compare", str(three_runs), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert max(map(len, table)) <= 80
    assert [row.split("|")[1].strip() for row in table[2:]] == ["teacher", "student-sft", "student-kd"]
    assert "distill_gsm8k pass@1" in table[0] and "more columns in" in out
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith(EXPECTED.split("\n\n")[0])
