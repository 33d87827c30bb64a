"""Every command x every fault a user meets (issue 39): exit 2, one line naming the option, file or
line, no traceback, and nothing on disk changed but the documented outputs.

Each case runs ``python -m distill.cli`` in a fresh workspace (its inputs under ``in/``) and
compares the workspace's tree, contents hashed, before and after. The faults: an input that is
missing, empty, not UTF-8 or torn (a record cut mid-way); an output that is a directory where a
file is meant or the reverse, that holds someone else's files, that cannot be written, that lies
under a file, or that is the command's own input; each out-of-range value the issue found; and
SIGINT / SIGTERM to a running ``generate``. Every case but one (a failure after a teacher loaded)
fails before a model loads, so the table stays fast. The data-loss cases of the issue follow as
regression tests of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal

import pytest

from test_compare import result, task
from test_generate import FaultServer, _as_from_a_terminal, wait_for_lines
from test_train_sft_data import make_trace

# ---------------------------------------------------------------- the workspace and its inputs

PROMPTS = [{"question": f"What is {i} times 7?", "gold": str(7 * i)} for i in range(3)]
DATASET = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"<think>{i} and {i}.</think>\\boxed{{{2 * i}}}"}]}
           for i in range(3)]
GSM8K = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(3)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_workspace(root: Path) -> None:
    """The inputs every command reads, under ``root/in``, and a folder of the user's own beside them."""
    inputs = root / "in"
    (inputs / "data").mkdir(parents=True)
    (inputs / "prompts.jsonl").write_text(jsonl(PROMPTS))
    (inputs / "traces.jsonl").write_text(jsonl([make_trace(i, reference=str(2 * i)) for i in range(3)]))
    (inputs / "dataset.jsonl").write_text(jsonl(DATASET))
    (inputs / "data" / "gsm8k_test.jsonl").write_text(jsonl(GSM8K))
    (inputs / "results.json").write_text(json.dumps(result("a", {"distill_gsm8k": task(0.5, 0.1, 0.5, 1.0)}),
                                                    indent=1))
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own notes\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: 'dir', its symlink target, or the sha256 of its contents and its mode."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            tree[rel] = f"dir {path.stat().st_mode:o}"
        else:
            tree[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
    return tree


def cli(args: list[str], cwd: Path, wrap: list[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*wrap, sys.executable, "-m", "distill.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_line(run: subprocess.CompletedProcess, command: str, *named: str, code: int = 2) -> str:
    """Exit ``code``, and stderr one line, no traceback, naming each of ``named``."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code and len(lines) == 1, f"exit {run.returncode}, stderr:\n{run.stderr}"
    line = lines[0]
    assert line.startswith(f"distill {command}: error: "), line
    assert "internal error" not in line and "Traceback" not in run.stderr, line
    for name in named:
        assert name in line, f"{name!r} not in: {line}"
    return line


# ---------------------------------------------------------------- the commands


@dataclass(frozen=True)
class Command:
    name: str
    kind: Literal["file", "dir"]      # what --out is
    input: str                        # the input the input faults damage (relative to the workspace)
    argv: Callable[[SimpleNamespace, str], list[str]]  # (context, out) -> arguments; out relative too
    own_input: str                    # an --out that is (or holds) the command's input


def _run_argv(ctx, out: str) -> list[str]:
    """``distill run`` on a one-step recipe (flow style, so a cut one is invalid YAML)."""
    (ctx.ws / "recipe.yaml").write_text(
        "pipeline:\n"
        f"  - verify: {{traces: in/traces.jsonl, out: {out}, keep: all, workers: 1}}\n"
        "  - export: {traces: [in/traces.jsonl], out: never}\n")
    return ["run", "recipe.yaml"]


def _eval_argv(ctx, out: str) -> list[str]:
    parent, name = os.path.split(out)
    return ["eval", "--model", str(ctx.model), "--tasks", "distill_gsm8k", "--data-dir", "in/data", "--limit", "1",
            "--n", "1", "--max-tokens", "8", "--out", parent or ".", "--run-name", name]


COMMANDS = {c.name: c for c in [
    Command("generate", "file", "in/prompts.jsonl", lambda ctx, out: [
        "generate", "--teacher", "vllm-local", "--teacher-url", ctx.url, "--teacher-model", ctx.served, "--prompts",
        "in/prompts.jsonl", "--prompt-field", "question", "--answer-field", "gold", "--out", out,
        "--max-retries", "0", "--max-tokens", "64"], "in/prompts.jsonl"),
    Command("import", "file", "in/dataset.jsonl", lambda ctx, out: [
        "import", "--dataset", "in/dataset.jsonl", "--out", out], "in/dataset.jsonl"),
    Command("verify", "file", "in/traces.jsonl", lambda ctx, out: [
        "verify", "--traces", "in/traces.jsonl", "--out", out, "--keep", "all", "--workers", "1"],
        "in/traces.jsonl"),
    Command("logits", "dir", "in/traces.jsonl", lambda ctx, out: [
        "logits", "--teacher", str(ctx.model), "--traces", "in/traces.jsonl", "--out", out], "in"),
    Command("train", "dir", "in/traces.jsonl", lambda ctx, out: [
        "train", "--student", str(ctx.model), "--traces", "in/traces.jsonl", "--out", out, "--max-steps", "1",
        "--report-to", "none"], "in"),
    Command("eval", "dir", "in/data/gsm8k_test.jsonl", _eval_argv, "in/data"),
    Command("compare", "dir", "in/results.json", lambda ctx, out: [
        "compare", "in/results.json", "--out", out], "in"),
    Command("export", "dir", "in/traces.jsonl", lambda ctx, out: [
        "export", "in/traces.jsonl", "--out", out], "in"),
    Command("run", "file", "recipe.yaml", _run_argv, "in/traces.jsonl"),
]}


@pytest.fixture(scope="module")
def server():
    srv = FaultServer(schedules=[[]]).start()
    yield srv
    srv.stop()


@pytest.fixture
def ctx(tmp_path, tiny_llama, server):
    ws = tmp_path / "ws"
    make_workspace(ws)
    return SimpleNamespace(ws=ws, model=tiny_llama, url=server.base_url, served=server.model)


# ---------------------------------------------------------------- input faults


def damage(path: Path, fault: str) -> None:
    """Make ``path`` missing, empty, not UTF-8 (a byte in its second line) or torn (its second line cut)."""
    if fault == "missing":
        path.unlink()
        return
    if fault == "empty":
        path.write_bytes(b"")
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) < 3:  # a one-line file: the damage goes mid-way
        text = path.read_bytes()
        lines = [text[: len(text) // 2], text[len(text) // 2:]]
    if fault == "not-utf8":
        lines[1] = lines[1].replace(b"\"", b"\"\xff", 1) if b"\"" in lines[1] else b"\xff" + lines[1]
    elif fault == "torn":
        lines[1] = lines[1][: len(lines[1]) // 2].rstrip(b"\n") + b"\n"
        if not path.name.endswith(".jsonl"):  # JSON or YAML: the rest of the file is gone too
            lines = lines[:2]
    path.write_bytes(b"".join(lines))


INPUT_FAULTS = ["missing", "empty", "not-utf8", "torn"]


@pytest.mark.parametrize("fault", INPUT_FAULTS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_input_fails_in_one_line_naming_it_and_changes_nothing(ctx, command, fault):
    cmd = COMMANDS[command]
    out = "new/sub/out" + (".jsonl" if cmd.kind == "file" else "")  # a failed start leaves no folders
    args = cmd.argv(ctx, out)
    damage(ctx.ws / cmd.input, fault)
    before = snapshot(ctx.ws)
    run = cli(args, ctx.ws)
    named = [cmd.input]
    if cmd.input.endswith(".jsonl") and fault in ("not-utf8", "torn"):
        named = [f"{cmd.input}:2"]
    assert_one_line(run, command, *named)
    assert snapshot(ctx.ws) == before


# ---------------------------------------------------------------- output faults


def _read_only(folder: Path, private_mounts: bool) -> list[str]:
    """Make ``folder`` unwritable to the command: chmod for a user; for root (whom chmod does not stop)
    a read-only bind mount in a mount namespace of the command's own. Returns the wrapper to run in."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if not private_mounts:
        pytest.skip("running as root without mount namespaces: nothing makes a folder read-only to root")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" "{folder}" && exec "$@"',
            "sh"]


@pytest.fixture(scope="module")
def private_mounts() -> bool:
    """Whether this process may bind-mount inside a mount namespace of its own (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp /tmp"], capture_output=True)
    return probe.returncode == 0


OUTPUT_FAULTS = ["directory-for-a-file", "file-for-a-directory", "foreign", "unwritable", "under-a-file",
                 "own-input"]


def place_output(ctx, cmd: Command, fault: str, private_mounts: bool) -> tuple[str, list[str], list[str]]:
    """(--out, the wrapper to run in, what the error line must name) for an output fault."""
    wrap = []
    if fault == "directory-for-a-file":
        out = "mine"
        named = ["mine", "is a directory"]
    elif fault == "file-for-a-directory":
        out = "mine/notes.txt"
        named = ["mine/notes.txt", "is a file"]
    elif fault == "foreign":  # the user's files where the output goes: never replaced without --overwrite
        out = "mine/notes.txt" if cmd.kind == "file" else "mine"
        named = [out, "--overwrite"]
    elif fault == "unwritable":
        wrap = _read_only(ctx.ws / "locked", private_mounts)
        out = "locked/out"
        named = ["locked"]
    elif fault == "under-a-file":
        out = "mine/notes.txt/out"
        named = ["mine/notes.txt", "is a file"]
    else:
        out = cmd.own_input
        named = [out]
    return out, wrap, named


@pytest.mark.parametrize("fault", OUTPUT_FAULTS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_that_cannot_or_may_not_be_written_is_refused_and_left_as_it_was(ctx, private_mounts, command,
                                                                                   fault):
    cmd = COMMANDS[command]
    if (fault == "directory-for-a-file" and cmd.kind == "dir") or (fault == "file-for-a-directory"
                                                                   and cmd.kind == "file"):
        pytest.skip(f"{command} writes a {cmd.kind}")
    out, wrap, named = place_output(ctx, cmd, fault, private_mounts)
    args = cmd.argv(ctx, out)
    before = snapshot(ctx.ws)
    assert_one_line(cli(args, ctx.ws, wrap), command, *named)
    assert snapshot(ctx.ws) == before


# ---------------------------------------------------------------- values out of range, inputs that parse but are wrong


def _results(**metrics) -> str:
    res = result("a", {"distill_gsm8k": task(0.5, 0.1, 0.5, 1.0)})
    res["tasks"]["distill_gsm8k"]["metrics"].update(metrics)
    return json.dumps(res)


LM_EVAL_RESULTS = json.dumps({"results": {"gsm8k": {"exact_match,strict-match": 0.5}}, "configs": {},
                              "versions": {"gsm8k": 3}, "n-shot": {"gsm8k": 5}})

VALUES = [  # (command, extra flags, {input: new contents}, what the line names)
    ("generate", ["--temperature", "-1"], {}, ["--temperature", ">= 0"]),
    ("generate", ["--top-p", "2"], {}, ["--top-p", "between 0 and 1"]),
    ("generate", ["--max-retries", "-1"], {}, ["--max-retries"]),
    ("generate", ["--request-timeout", "0"], {}, ["--request-timeout", "> 0"]),
    ("generate", ["--n", "0"], {}, ["--n"]),
    ("generate", ["--top-logprobs", "21"], {}, ["--top-logprobs", "20"]),
    ("verify", ["--timeout", "-1"], {}, ["--timeout", "> 0"]),
    ("verify", ["--max-per-prompt", "0"], {}, ["--max-per-prompt"]),
    ("eval", ["--batch-size", "0"], {}, ["--batch-size", ">= 1"]),
    ("eval", ["--limit", "0"], {}, ["--limit", ">= 1"]),
    ("eval", ["--max-tokens", "-1"], {}, ["--max-tokens", ">= 1"]),
    ("eval", ["--tasks", "nosuch"], {}, ["nosuch", "distill_gsm8k"]),
    ("logits", ["--kd-temperature", "0"], {}, ["--kd-temperature", "> 0"]),
    ("logits", ["--batch-size", "0"], {}, ["--batch-size", ">= 1"]),
    ("logits", ["--shard-size", "0"], {}, ["--shard-size", ">= 1"]),
    ("logits", ["--top-logprobs", "0"], {}, ["--top-logprobs"]),
    ("logits", ["--max-length", "2"], {}, ["in/traces.jsonl", "--max-length"]),  # fails after it began writing
    ("train", ["--method", "sft", "--loss", "rkl", "--kd-weight", "0.3", "--kd-temperature", "2", "--max-tokens", "5",
               "--top-logprobs", "3"], {},
     ["--loss", "--kd-weight", "--kd-temperature", "--max-tokens", "--top-logprobs", "--method kd or on-policy"]),
    ("train", ["--lr", "-1"], {}, ["--lr", "> 0"]),
    ("train", ["--batch-size", "0"], {}, ["--batch-size", ">= 1"]),
    ("train", ["--lora-r", "8"], {}, ["--lora-r", "--lora"]),
    ("train", ["--eval-fraction", "1"], {}, ["--eval-fraction"]),
    ("train", ["--method", "kd"], {}, ["--method kd", "--teacher"]),
    ("train", ["--epochs", "nan"], {}, ["--epochs"]),
    ("run", ["--only", "nosuchstep"], {}, ["--only nosuchstep", "verify", "export"]),
    ("compare", [], {"in/results.json": _results(**{"pass@1": "high"})}, ["in/results.json", "pass@1"]),
    ("compare", [], {"in/results.json": LM_EVAL_RESULTS}, ["in/results.json", "not a distill eval results file",
                                                           "lm-eval"]),
    ("compare", ["--csv", "mine"], {}, ["--csv mine", "directory"]),
    ("export", ["--name", "x", "--traces", "in/nosuch.jsonl"], {}, ["in/nosuch.jsonl"]),
    ("import", ["--format", "openr1"], {}, ["in/dataset.jsonl:1", "problem"]),
    # traces that are JSON but no traces
    ("verify", [], {"in/traces.jsonl": jsonl([make_trace(0), {**make_trace(1), "messages": "oops"}])},
     ["in/traces.jsonl:2", "field 'messages'"]),
    ("export", [], {"in/traces.jsonl": jsonl([make_trace(0), make_trace(1), make_trace(0)])},
     ["in/traces.jsonl:3", "duplicate trace id 'p0#0'", "line 1"]),
    ("train", [], {"in/traces.jsonl": jsonl([make_trace(0), {**make_trace(1), "answer": None}])},
     ["in/traces.jsonl:2", "field 'answer'"]),
    ("verify", [], {"in/traces.jsonl": jsonl([make_trace(0), {k: v for k, v in make_trace(1).items()
                                                              if k != "answer"}])},
     ["in/traces.jsonl:2", "missing field 'answer'"]),
    ("logits", [], {"in/traces.jsonl": jsonl([make_trace(0)]) + '{"prompt_id": "p", "messages": [{"role": "user", '
                                                                 '"content": "\\udc00"}], "answer": "x"}\n'},
     ["in/traces.jsonl:2", "surrogate"]),
    # a recipe's every step is checked before the first runs
    ("run", [], {"recipe.yaml": "pipeline:\n  - verify: {traces: in/traces.jsonl, out: v.jsonl, keep: all}\n"
                                "  - train: {student: s, traces: v.jsonl, out: m, lr: -1}\n"},
     ["recipe.yaml [pipeline step 2: train]", "--lr must be > 0"]),
]


@pytest.mark.parametrize("command,extra,contents,named", VALUES,
                         ids=[f"{c}{' '.join(e)[:40] and ' ' + ' '.join(e)[:40]}{'+data' if d else ''}"
                              for c, e, d, _ in VALUES])
def test_a_value_out_of_range_fails_in_one_line_naming_the_option(ctx, command, extra, contents, named):
    cmd = COMMANDS[command]
    args = cmd.argv(ctx, "new/sub/out" + (".jsonl" if cmd.kind == "file" else "")) + extra
    for name, text in contents.items():
        (ctx.ws / name).write_text(text)
    before = snapshot(ctx.ws)
    assert_one_line(cli(args, ctx.ws), command, *named)
    assert snapshot(ctx.ws) == before


# ---------------------------------------------------------------- what a good run may change

DOCUMENTED = {  # the outputs a good run adds, and nothing else
    "generate": {"new", "new/sub", "new/sub/out.jsonl", "new/sub/out.jsonl.run.json"},
    "import": {"new", "new/sub", "new/sub/out.jsonl", "new/sub/out.jsonl.run.json"},
    "verify": {"new", "new/sub", "new/sub/out.jsonl", "new/sub/out.jsonl.run.json"},
    "export": {"new", "new/sub", "new/sub/out", "new/sub/out/data", "new/sub/out/data/train-00000-of-00001.parquet",
               "new/sub/out/README.md", "new/sub/out/run.json"},
    "compare": {"new", "new/sub", "new/sub/out", "new/sub/out/compare.md", "new/sub/out/compare.csv",
                "new/sub/out/compare.html", "new/sub/out/compare.png", "new/sub/out/run.json"},
}


@pytest.mark.parametrize("command", list(DOCUMENTED))
def test_a_good_run_adds_its_documented_outputs_and_nothing_else(ctx, command):
    cmd = COMMANDS[command]
    before = snapshot(ctx.ws)
    run = cli(cmd.argv(ctx, "new/sub/out" + (".jsonl" if cmd.kind == "file" else "")), ctx.ws)
    assert run.returncode == 0, run.stderr
    after = snapshot(ctx.ws)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == DOCUMENTED[command]


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_generate_with_its_work_saved_and_its_record_saying_so(tmp_path, sig):
    srv = FaultServer(schedules=[[]], latency=0.2).start()
    ws = tmp_path / "ws"
    make_workspace(ws)
    rows = [{"question": f"What is {i} times 7?", "gold": str(7 * i)} for i in range(12)]
    (ws / "in" / "prompts.jsonl").write_text(jsonl(rows))
    ctx = SimpleNamespace(ws=ws, url=srv.base_url, served=srv.model)
    out = ws / "new" / "out.jsonl"
    args = COMMANDS["generate"].argv(ctx, "new/out.jsonl") + ["--n", "2", "--concurrency", "2"]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], cwd=ws, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_as_from_a_terminal,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for_lines(out, proc, at_least=2)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        srv.stop()
    assert proc.returncode == 128 + sig, stderr
    last = stderr.strip().splitlines()[-1]
    said = {signal.SIGINT: "interrupted", signal.SIGTERM: "SIGTERM"}[sig]
    assert last.startswith(f"distill generate: {said}; finished work is saved, rerun"), stderr
    assert "Traceback" not in stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines())  # no torn line
    record = json.loads(Path(f"{out}.run.json").read_text())
    assert record["status"] == "interrupted" and record["summary"]["done"] == data.count(b"\n")
    assert not Path(f"{out}.lock").exists()


def test_sigterm_inside_an_event_loop_cancels_its_task_as_ctrl_c_does():
    """generate's API teacher runs in ``asyncio.run``: SIGTERM there cancels the task at its next await,
    as Ctrl-C does, and the loop raises KeyboardInterrupt after it unwound. An exception raised at the
    line the signal lands on tore the HTTP client's cancel scopes now and then (CI: "internal error:
    Attempted to exit a cancel scope" instead of the saved stop)."""
    from distill.cli import _interrupt

    seen = []

    async def work():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
            seen.append("went on to the next await")
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(work())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["went on to the next await", "cancelled"]


# ---------------------------------------------------------------- the data-loss cases, one by one


def test_export_into_a_folder_of_the_users_files_is_refused_and_overwrite_replaces_it_whole(tmp_path):
    make_workspace(tmp_path)
    mine = tmp_path / "mine"
    (mine / "data").mkdir()
    (mine / "data" / "mine.parquet").write_bytes(b"PAR1 the user's table")
    (mine / "README.md").write_text("# my dataset\n")
    args = ["export", "in/traces.jsonl", "--out", "mine"]
    before = snapshot(tmp_path)
    assert_one_line(cli(args, tmp_path), "export", "mine holds README.md, data, notes.txt", "--overwrite")
    (mine / "notes.txt").unlink()  # only names export writes itself: still the user's, not an export
    before = snapshot(tmp_path)
    assert_one_line(cli(args, tmp_path), "export", "mine holds README.md, data", "not written by distill")
    assert snapshot(tmp_path) == before
    assert cli([*args, "--overwrite"], tmp_path).returncode == 0
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        "README.md", "data", "data/train-00000-of-00001.parquet", "run.json"]
    assert cli(args, tmp_path).returncode == 0  # the same export again: its own output, rewritten


def test_verify_onto_its_own_input_is_refused_and_the_input_kept(tmp_path):
    make_workspace(tmp_path)
    traces = tmp_path / "in" / "traces.jsonl"
    (tmp_path / "link.jsonl").symlink_to(traces)
    before = snapshot(tmp_path)
    for out, overwrite in (("in/traces.jsonl", []), ("link.jsonl", []), ("in/traces.jsonl", ["--overwrite"])):
        args = ["verify", "--traces", "in/traces.jsonl", "--out", out, "--keep", "all", *overwrite]
        assert_one_line(cli(args, tmp_path), "verify", f"--out {out} is also this command's input")
    assert snapshot(tmp_path) == before


def _generate(ctx, *extra: str) -> list[str]:
    return COMMANDS["generate"].argv(ctx, "traces.jsonl") + list(extra)


def test_generate_rerun_with_other_settings_is_refused_and_a_higher_n_adds_samples(ctx, capsys, monkeypatch):
    from distill.cli import main
    from distill.records import read_jsonl

    monkeypatch.chdir(ctx.ws)
    assert main(_generate(ctx, "--temperature", "0.6")) == 0
    capsys.readouterr()
    before = snapshot(ctx.ws)
    for changed, said in ((["--temperature", "1.0"], "temperature: 0.6 -> 1.0"),
                          (["--temperature", "0.6", "--max-tokens", "16"], "max_tokens: 64 -> 16")):
        assert main(_generate(ctx, *changed)) == 2
        err = capsys.readouterr().err.strip()
        assert "traces.jsonl exists" in err and said in err and "--overwrite" in err and "\n" not in err, err
        assert snapshot(ctx.ws) == before  # traces and their run record intact
    assert main(_generate(ctx, "--temperature", "0.6", "--n", "3")) == 0
    assert "written with --n 1; now --n 3: adding samples" in capsys.readouterr().err
    samples = sorted((r["prompt_id"], r["sample"]) for r in read_jsonl(ctx.ws / "traces.jsonl"))
    assert len(samples) == len(set(samples)) == 3 * len(PROMPTS)
    assert json.loads((ctx.ws / "traces.jsonl.run.json").read_text())["config"]["sampling"]["n"] == 3


def test_run_records_keep_every_setting_and_drop_a_key_wherever_it_is(ctx, capsys, monkeypatch):
    """max_tokens is a setting (the word 'token' is no secret); an sk-... key is one in any field."""
    from distill.cli import main

    monkeypatch.chdir(ctx.ws)
    key = "sk-" + "a1B2c3D4" * 4
    args = _generate(ctx, "--system", f"Be brief. (proxy key {key})", "--max-tokens", "48", "--limit", "2")
    assert main(args) == 0
    text = (ctx.ws / "traces.jsonl.run.json").read_text()
    record = json.loads(text)
    assert key not in text and "<redacted>" in text
    assert record["config"]["sampling"]["max_tokens"] == record["settings"]["max_tokens"] == 48
    assert main(args) == 0  # the same run again: resumed, not refused over the redacted setting
    assert "2 already in" in capsys.readouterr().err


def test_train_over_a_finished_run_is_refused_resume_continues_and_overwrite_leaves_no_old_checkpoint(
        tmp_path, tiny_llama, capsys, monkeypatch):
    from distill.cli import main

    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model"
    args = ["train", "--student", str(tiny_llama), "--traces", "in/traces.jsonl", "--out", "model", "--batch-size",
            "1", "--eval-fraction", "0", "--save-steps", "1", "--save-total-limit", "5", "--report-to", "none",
            "--no-gradient-checkpointing"]
    assert main([*args, "--max-steps", "2"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main([*args, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model holds" in err and "from 'distill train" in err and "--resume" in err and "--overwrite" in err, err
    assert snapshot(tmp_path) == before

    assert main([*args, "--max-steps", "3", "--resume"]) == 0  # logged at steps 1 and 3 (logging every 10)
    record = json.loads((out / "run.json").read_text())
    assert [p["step"] for p in record["loss_curve"] if "loss" in p][-1] == 3
    assert record["summary"]["final_train_loss"] == record["loss_curve"][-1]["loss"]
    assert f"final loss {record['summary']['final_train_loss']}" in capsys.readouterr().out

    assert main([*args, "--max-steps", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "run.json").read_text())["summary"]["global_step"] == 1


def test_a_folder_of_the_users_files_is_no_training_run(tmp_path, tiny_llama):
    make_workspace(tmp_path)
    (tmp_path / "mine" / "config.json").write_text("{}\n")  # names a training run writes too
    before = snapshot(tmp_path)
    run = cli(["train", "--student", str(tiny_llama), "--traces", "in/traces.jsonl", "--out", "mine", "--resume"],
              tmp_path)
    assert_one_line(run, "train", "mine holds config.json, notes.txt, not written by distill", "--overwrite")
    assert snapshot(tmp_path) == before


def test_export_without_traces_asks_for_them_by_the_names_it_takes(tmp_path):
    make_workspace(tmp_path)
    assert_one_line(cli(["export", "--out", "ds"], tmp_path), "export", "missing --traces")
    assert cli(["export", "--traces", "in/traces.jsonl", "--out", "ds"], tmp_path).returncode == 0


@pytest.mark.parametrize("command,other", [("verify", ["--keep", "correct"]), ("import", ["--limit", "2"]),
                                           ("export", ["--name", "other"]), ("compare", None)])
def test_the_same_run_again_rewrites_its_result_and_other_settings_are_refused(ctx, command, other):
    cmd = COMMANDS[command]
    out = "new/out" + (".jsonl" if cmd.kind == "file" else "")
    args = cmd.argv(ctx, out)
    assert cli(args, ctx.ws).returncode == 0
    first = snapshot(ctx.ws)
    assert cli(args, ctx.ws).returncode == 0
    assert set(snapshot(ctx.ws)) == set(first)
    if other is not None:  # compare has no settings: its table is its inputs'
        assert_one_line(cli(args + other, ctx.ws), command, f"{out}", "written with other settings", "--overwrite")


def test_an_unexpected_error_is_one_line_and_its_traceback_comes_with_v(tmp_path, monkeypatch, capsys):
    """A bug (injected here) still ends in one line, exit 2; -v shows where it came from."""
    from distill import verify
    from distill.cli import main

    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(verify, "pass_rates", lambda records: 1 / 0)
    args = ["verify", "--traces", "in/traces.jsonl", "--out", "v.jsonl", "--keep", "all", "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("distill verify: error: internal error: ZeroDivisionError: division by zero (rerun with -v for "
                   "the traceback; please report it)")
    assert main([*args, "--overwrite", "-v"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in <lambda>" in err and err.strip().endswith("please report it)")


def test_an_option_foreign_to_the_method_from_a_recipe_is_a_note(tmp_path):
    """Steps may share settings through YAML anchors: from a recipe, a foreign option is a note, not an error."""
    make_workspace(tmp_path)
    (tmp_path / "recipe.yaml").write_text(
        "shared: &sampling {max_tokens: 64}\n"
        "pipeline:\n"
        "  - train: {student: nosuch, traces: in/traces.jsonl, out: m, <<: *sampling}\n")
    run = cli(["run", "recipe.yaml"], tmp_path)
    note, *rest = run.stderr.strip().splitlines()
    assert note == ("distill: recipe.yaml [pipeline step 1: train]: 'max_tokens' is ignored (they apply to "
                    "--method kd or on-policy)")
    assert_one_line(subprocess.CompletedProcess(run.args, run.returncode, "", "\n".join(rest)), "run", "nosuch")


def test_eval_says_nothing_of_git_outside_a_repository_and_reruns_only_the_same_evaluation(tmp_path, shared_data):
    """lm-eval asks git for a commit; outside a repository git's 'fatal: not a git repository' is noise."""
    sys.path.insert(0, str(Path(__file__).parent / "servers"))
    from eval_server import EvalServer

    first = json.loads((shared_data / "aime24.jsonl").read_text().splitlines()[0])
    srv = EvalServer({"base_seed": 0, "model": "scripted", "max_model_len": 4096,
                      "problems": {first["problem"]: [str(first["answer"])]}}).start()
    args = ["eval", "--tasks", "distill_aime24", "--model-url", srv.base_url, "--n", "1", "--limit", "1", "--seed", "0",
            "--data-dir", str(shared_data), "--out", "evals", "--run-name", "r"]
    try:
        run = cli(args, tmp_path)
        again = cli(args, tmp_path)
        other = cli([*args, "--temperature", "0.7"], tmp_path)
    finally:
        srv.stop()
    assert run.returncode == 0 and again.returncode == 0, run.stderr + again.stderr
    assert_one_line(other, "eval", "evals/r holds", "written with other settings (temperature: 0.6 -> 0.7)")
    assert subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode != 0
    assert "fatal" not in run.stderr and "git" not in run.stderr, run.stderr
    assert sorted(p.name for p in (tmp_path / "evals" / "r").iterdir()) == ["generations.jsonl", "results.json",
                                                                             "run.json"]


def test_an_interrupted_whole_file_write_leaves_the_previous_version_and_no_temp_file(tmp_path):
    """verify, import and eval write their outputs whole (temp file, then rename): Ctrl-C mid-way keeps the old."""
    from distill.records import read_jsonl, write_jsonl

    out = tmp_path / "kept.jsonl"
    write_jsonl(out, [{"n": 1}])

    def interrupted():
        yield {"n": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(out, interrupted())
    assert read_jsonl(out) == [{"n": 1}] and sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl"]


def test_redact_drops_secrets_by_exact_key_and_by_value_and_keeps_every_setting():
    from distill.runinfo import redact

    hf = "hf_" + "x" * 24
    record = {"api_key": "anything", "api_key_env": "OPENAI_API_KEY", "max_tokens": 64, "rollout_max_tokens": 8,
              "top_logprobs": 5, "token": "abc", "HF_TOKEN": hf, "tokenizer_sha": "0123abcd",
              "headers": [{"Authorization": "Bearer abcdefgh12345"}, "see Bearer abcdefgh12345"],
              "system": f"use {hf} or sk-{'k' * 20}", "empty": {"password": ""}}
    assert redact(record) == {
        "api_key": "<redacted>", "api_key_env": "OPENAI_API_KEY", "max_tokens": 64, "rollout_max_tokens": 8,
        "top_logprobs": 5, "token": "<redacted>", "HF_TOKEN": "<redacted>", "tokenizer_sha": "0123abcd",
        "headers": [{"Authorization": "<redacted>"}, "see Bearer <redacted>"],
        "system": "use <redacted> or <redacted>", "empty": {"password": ""}}


def test_a_shipped_preset_finds_its_files_from_any_folder(tmp_path, monkeypatch, smollm2_gguf):
    """The quickstart's presets name ./paths of the repository, wherever distill runs from."""
    from distill.models import load_preset

    monkeypatch.chdir(tmp_path)
    assert load_preset("teachers", "smollm2-135m-instruct")["model"] == str(smollm2_gguf)


def test_a_file_without_its_final_newline_loses_no_record_and_a_torn_last_line_is_cut(tmp_path):
    """Editors and '\\n'.join(...) leave the last line without its newline: that record is read (and an
    append to the file keeps it); a line cut mid-way by a crash is skipped, then cut by the next append."""
    from distill.records import JsonlAppender, read_jsonl, read_traces

    make_workspace(tmp_path)
    traces = tmp_path / "in" / "traces.jsonl"
    traces.write_text(traces.read_text().rstrip("\n"))
    assert len(read_traces(traces)) == 3
    assert cli(["verify", "--traces", "in/traces.jsonl", "--out", "v.jsonl", "--keep", "all", "--workers", "1"],
               tmp_path).returncode == 0
    assert len(read_jsonl(tmp_path / "v.jsonl")) == 3
    for text, kept in (('{"n": 1}\n{"n": 2}', [1, 2]), ('{"n": 1}\n{"n": 2, "cut', [1])):
        path = tmp_path / "appended.jsonl"
        path.write_text(text)
        assert [r["n"] for r in read_jsonl(path)] == kept
        with JsonlAppender(path) as out:
            out.write({"n": 3})
        assert [r["n"] for r in read_jsonl(path)] == [*kept, 3]


def _a_valid_value(leaf):
    """A value of the option's type inside its range (its default where it has one)."""
    import typing

    if leaf.default not in (None, [], ""):
        return leaf.default
    if typing.get_origin(leaf.type) is typing.Literal:
        return typing.get_args(leaf.type)[0]
    return {bool: True, int: 1, float: 0.5, str: "x"}.get(leaf.type, ["x"])


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_every_option_foreign_to_the_method_fails_from_flags_naming_it(method):
    from distill.config import build, leaves
    from distill.errors import DistillError
    from distill.train.command import NOT_FOR, TrainConfig

    sections, why = NOT_FOR[method]
    foreign = [leaf for leaf in leaves(TrainConfig) if leaf.path[0] in sections and leaf.key != "seed"]
    assert len(foreign) > 10
    for leaf in foreign:
        options = {"method": method, "student": "s", "traces": "t.jsonl", "out": "o", leaf.key: _a_valid_value(leaf)}
        with pytest.raises(DistillError) as refused:
            build(TrainConfig, ("flags", options))
        assert str(refused.value) == f"{leaf.flag}: {why}; leave it out"
