"""Property-based tests (hypothesis) of the two readers every user input goes through (issue 39).

- The trace reader (``records.iter_traces``): whatever bytes a traces file holds, it yields traces
  that can be written back as UTF-8 JSON lines, or stops with one DistillError naming the file and
  the first bad line (every line before it reads), never another exception.
- The option parser (``config.build``): whatever a recipe section holds (known and unknown keys,
  former names, values of the wrong type, out of range, nested wrongly), it gives a config whose
  every value lies in its declared range, or one DistillError on one line.
"""

from __future__ import annotations

import importlib
import json
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.cli import COMMANDS
from distill.config import Range, build, leaves
from distill.errors import DistillError
from distill.records import iter_traces, trace_problem


def _whole(tail: bytes) -> bool:
    """A last line without its newline that is whole JSON (read), not a torn write (skipped)."""
    try:
        json.loads(tail)
    except (ValueError, RecursionError):
        return False
    return True

# ---------------------------------------------------------------- the trace reader

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
TURN = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": st.text(max_size=20)})
TRACE = st.fixed_dictionaries(
    {"prompt_id": st.text(max_size=4) | st.integers(0, 3), "messages": st.lists(TURN, min_size=1, max_size=2),
     "answer": st.text(max_size=20)},
    optional={"id": st.text(max_size=4), "sample": st.integers(0, 2), "reasoning": st.text(max_size=20) | st.none(),
              "extra": JSON_VALUES})


def _damaged(trace: dict, drop: str, value) -> dict:
    """A trace with a field gone or of another type (``messages: "oops"``, ``answer: null`` ...)."""
    return {k: v for k, v in trace.items() if k != drop} | ({} if value is None else {drop: value})


LINE = st.one_of(
    TRACE.map(json.dumps),                                                    # a good trace
    TRACE.map(lambda t: json.dumps(t, ensure_ascii=False)),                   # ... with raw UTF-8
    st.builds(_damaged, TRACE, st.sampled_from(["messages", "answer", "prompt_id", "reasoning"]),
              JSON_VALUES).map(json.dumps),                                   # a field missing or mistyped
    JSON_VALUES.map(json.dumps),                                              # any JSON value
    st.text(max_size=30),                                                     # any text
    st.integers(2, 3000).map(lambda n: "[" * n + "]" * n),                    # nested deeper than json can
    st.integers(4000, 6000).map(lambda n: '{"prompt_id": ' + "7" * n + "}"),  # an integer too long to read
    st.sampled_from(['{"a": "\\ud800"}', '{"prompt_id": "p", "messages": [{"role": "user", "content": '
                     '"\\udc00"}], "answer": "x"}', '"\\ud83d\\ude00"']),    # lone (and paired) surrogates
).map(lambda text: text.encode("utf-8", "surrogatepass")) | st.binary(max_size=30)


@pytest.fixture(scope="module")
def traces_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "traces.jsonl"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, max_size=6), ends=st.lists(st.sampled_from([b"\n", b"\r\n", b""]), min_size=6,
                                                       max_size=6))
def test_any_bytes_give_writable_traces_or_one_error_naming_the_first_bad_line(traces_file, lines, ends):
    data = [line.replace(b"\n", b" ") + end for line, end in zip(lines, ends)]
    traces_file.write_bytes(b"".join(data))
    try:
        records = [rec for _, rec in iter_traces(traces_file)]
    except DistillError as e:
        message = str(e)
        where = re.match(rf"{re.escape(str(traces_file))}:(\d+): \S", message)
        assert where and "\n" not in message, message
        line = int(where.group(1))
        assert 1 <= line <= len(data)
        traces_file.write_bytes(b"".join(data[: line - 1]))  # every line before the one named reads
        list(iter_traces(traces_file))
    else:
        *lines, tail = b"".join(data).split(b"\n")
        assert len(records) == sum(1 for raw in lines if raw.strip()) + _whole(tail)  # a tail that is no JSON is torn
        for rec in records:
            assert trace_problem(rec) is None
            json.dumps(rec, ensure_ascii=False).encode("utf-8")  # what verify/export write back


# ---------------------------------------------------------------- the option parser

CONFIGS = [getattr(importlib.import_module(module), cls) for module, cls, _, _ in COMMANDS.values()]


def _keys(cls) -> list[str]:
    """Every name a recipe may use for ``cls``'s options (flags, former names, group sections)."""
    names = [leaf.key for leaf in leaves(cls)] + [old for leaf in leaves(cls) for old in leaf.meta["aliases"]]
    names += list({leaf.path[0] for leaf in leaves(cls) if len(leaf.path) == 2})
    return names + list(getattr(cls, "RESHAPED", {}))


ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(string.printable, max_size=10)
    | st.sampled_from(["0", "-1", "1e3", "nan", "inf", "true", "kd", "sft", "on-policy", "fkl", "a,b", "1.5"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def recipe_sections(draw):
    cls = draw(st.sampled_from(CONFIGS))
    known = _keys(cls)
    names = st.sampled_from(known) | st.text(string.ascii_lowercase + "_-", max_size=12)
    values = ANY_VALUE | st.dictionaries(st.sampled_from(known) | st.text(max_size=6), ANY_VALUE, max_size=3)
    return cls, draw(st.dictionaries(names, values, max_size=6))


def _in_range(check: Range, value) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(check.error(v) is None for v in values)


@settings(max_examples=600, deadline=None)
@given(section=recipe_sections())
def test_any_recipe_section_gives_a_checked_config_or_one_error(section):
    cls, mapping = section
    try:
        cfg = build(cls, ("recipe.yaml [step]", mapping))
    except DistillError as e:
        assert str(e) and "\n" not in str(e), str(e)
        return
    assert isinstance(cfg, cls)
    for leaf in leaves(cls):
        holder = getattr(cfg, leaf.path[0]) if len(leaf.path) == 2 else cfg
        value = getattr(holder, leaf.path[-1])
        if leaf.meta["check"] is not None and value is not None:
            assert _in_range(leaf.meta["check"], value), (leaf.flag, value)
