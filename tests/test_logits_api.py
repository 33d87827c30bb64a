"""``distill logits`` without --teacher: API top_logprobs -> the offline logits cache -> offline KD.

The real llama-cpp-python server serves SmolLM2-135M-Instruct (GGUF); its traces are mapped onto
the SmolLM2 tokenizer of the converted model directory, and a tiny model of that tokenizer trains
from the cache. Refusals: traces without log-probs, a student of another tokenizer, K < 1.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from distill.options import Endpoint, Sampling
from distill.cli import main
from distill.records import read_jsonl, write_jsonl

from conftest import assert_within_bound, build_tiny
from test_generate_llamacpp import args_for, llama_server, llama_url  # noqa: F401  (the server fixtures)
from test_kd import QUIET, shard_times

K = 5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-logits")


@pytest.fixture(scope="module")
def prompts(work) -> Path:
    path = work / "q.jsonl"
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((2, 3), (7, 5), (12, 9), (4, 4))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def api_traces(llama_server, prompts, work) -> Path:  # noqa: F811
    out = work / "traces.jsonl"
    # short prompts and answers: llama-cpp-python computes log-probs for every prompt token too
    brief = ["--template", "{prompt}", "--system", "Be brief.", "--max-tokens", "16"]
    rc = main(args_for(llama_server.base_url, prompts, out, *brief, "--top-logprobs", str(K)))
    llama_server.check()
    assert rc == 0
    return out


def smollm2_rows(trace: dict, tokenizer) -> list[int]:
    """The student's assistant tokens of a trace, as training labels them."""
    from distill.rendering import render_messages, tokenize_example

    labels = tokenize_example(render_messages(trace, "think"), tokenizer)["labels"]
    return [label for label in labels if label != -100]


def error_line(capsys) -> str:
    """The refusal: one line, the last on stderr (progress bars come before it)."""
    line = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert line.startswith("distill logits: error: "), line
    return line


def one_token(tok, text: str) -> int | None:
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def test_api_logprobs_become_the_cache_and_train_kd(api_traces, work, smollm2_dir, tiny_llama, capsys):
    import torch

    from distill.models import load_tokenizer
    from distill.rendering import end_of_turn_id
    from distill.store import LogitsCache

    cache = work / "logits"
    logits = ["logits", "--traces", str(api_traces), "--student", str(smollm2_dir), "--out", str(cache),
              "--shard-size", "3"]
    assert main(logits) == 0
    assert "rows from the API's log-probs" in capsys.readouterr().out
    index = json.loads((cache / "index.json").read_text())
    assert [s["traces"] for s in index["shards"]] == [3, 1]
    header = index["header"]
    assert header["source"] == "api top_logprobs" and header["teacher"] == "vllm-local"
    assert header["top_k"] == K and header["temperature"] == 1.0

    tok = load_tokenizer(str(smollm2_dir))
    eot = end_of_turn_id(tok)
    store = LogitsCache(cache)
    exact = argmax = 0
    for trace in read_jsonl(api_traces):
        ids, lps, tails = store.get(trace["id"])
        student = smollm2_rows(trace, tok)
        assert ids.shape == (len(student), K) and tails.shape == (len(student),)
        most = lps.argmax(1)
        assert ids[-1, most[-1]] == student[-1] == eot and abs(lps[-1, most[-1]]) < 1e-6  # end of turn: one-hot
        tops = trace["top_logprobs"]
        if [one_token(tok, t["token"]) for t in tops] != student[:-1]:
            continue  # whitespace stripped or a non-canonical split: not a one-for-one trace
        exact += 1
        for row, top in enumerate(tops):
            want = [(one_token(tok, a["token"]), a["logprob"]) for a in sorted(top["top"], key=lambda a: -a["logprob"])]
            mapped = [(i, lp) for i, lp in want if i is not None]  # '' (a byte fragment) stays in the tail
            if student[row] not in [i for i, _ in mapped]:
                mapped = (mapped + [(student[row], top["logprob"])])[:K]  # the sampled token, if a slot is free
            padding = [i for i in ids[row].tolist() if i not in dict(mapped)]  # other ids at -20
            tail = 1 - math.fsum(math.exp(lp) for _, lp in mapped)
            assert_within_bound(torch.tensor([[i for i, _ in mapped] + padding]),
                                torch.tensor([[lp for _, lp in mapped] + [-20.0] * len(padding)]),
                                torch.tensor([math.log(max(tail, math.exp(-20)))]),
                                (ids[row:row + 1], lps[row:row + 1], tails[row:row + 1]))
            if top["top"][0]["token"] == top["token"]:  # the sampled token was the argmax
                assert ids[row, most[row]] == student[row]
                argmax += 1
    assert exact >= 3 and argmax > 0, (exact, argmax)

    before = shard_times(cache)
    assert main(logits) == 0  # resume: nothing left to do, shards untouched
    assert shard_times(cache) == before

    out = work / "kd"
    assert main(["train", "--method", "kd", "--student", str(tiny_llama), "--teacher-logits", str(cache),
                 "--traces", str(api_traces), "--out", str(out), "--max-steps", "3", "--batch-size", "2",
                 "--eval-fraction", "0", "--alpha", "1.0", *QUIET]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["kd"]["mode"] == "offline" and record["kd"]["teacher"] == "vllm-local"
    assert record["summary"]["global_step"] == 3


def test_traces_without_logprobs_are_refused_with_a_pointer_to_sft(llama_url, prompts, work, smollm2_dir,  # noqa: F811
                                                                  capsys):
    # a teacher preset that cannot give log-probs, as deepseek-reasoner: generate drops --top-logprobs
    preset = work / "deepseek-reasoner.yaml"
    preset.write_text(f"kind: api\nmodel: smollm2\nbase_url: {llama_url}\nlogprobs: false\n")
    traces = work / "no-logprobs.jsonl"
    args = args_for(llama_url, prompts, traces, "--template", "{prompt}", "--max-tokens", "8", "--limit", "2",
                    "--top-logprobs", str(K))
    args[args.index("vllm-local")] = str(preset)
    assert main(args) == 0
    assert all(r["top_logprobs"] is None for r in read_jsonl(traces))
    capsys.readouterr()
    assert main(["logits", "--traces", str(traces), "--student", str(smollm2_dir), "--out", str(work / "l0")]) == 2
    err = error_line(capsys)
    assert f"{traces}:1: trace '" in err
    assert "no top_logprobs" in err and "deepseek-reasoner" in err and "--method sft" in err


def test_k_below_one_is_refused_and_no_student_keeps_the_teachers_tokens(api_traces, work, smollm2_dir, capsys):
    records = read_jsonl(api_traces)
    for r in records:
        for t in r["top_logprobs"]:
            t["top"] = []
    empty = work / "k0.jsonl"
    write_jsonl(empty, records)
    assert main(["logits", "--traces", str(empty), "--student", str(smollm2_dir), "--out", str(work / "l1")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}:1: trace '{records[0]['id']}'" in err and "K = 0" in err and "--top-logprobs" in err
    assert main(["logits", "--traces", str(api_traces), "--student", str(smollm2_dir), "--top-k", "0",
                 "--out", str(work / "l2")]) == 2
    assert "--top-logprobs: a cache keeps at least 1 per token" in capsys.readouterr().err
    assert main(["logits", "--traces", str(api_traces), "--out", str(work / "l3")]) == 0  # no --student: any student's
    assert json.loads((work / "l3" / "index.json").read_text())["header"]["teacher_vocab"] == "strings"


@pytest.fixture(scope="module")
def other_tokenizer_student(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny model whose tokenizer is a small byte-level BPE of its own (SmolLM2's chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["What is the sum of two numbers? The answer is seven plus five equals twelve."] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=smol.all_special_tokens,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=smol.bos_token, eos_token=smol.eos_token,
                                  pad_token=smol.pad_token, unk_token=smol.unk_token)
    tok.chat_template = smol.chat_template
    src = tmp_path_factory.mktemp("other-bpe")
    tok.save_pretrained(src)
    return build_tiny("qwen2", src, tmp_path_factory.mktemp("other-student"))


def test_a_student_of_another_tokenizer_is_refused(api_traces, work, other_tokenizer_student, capsys):
    first = read_jsonl(api_traces)[0]
    assert main(["logits", "--traces", str(api_traces), "--student", str(other_tokenizer_student),
                 "--out", str(work / "l4")]) == 2
    err = error_line(capsys)
    assert f"{api_traces}:1: trace '{first['id']}'" in err
    assert "is not one token of student" in err and str(other_tokenizer_student) in err
    assert "307 tokens" in err and "teacher 'vllm-local' (model 'smollm2')" in err and "leave out --student" in err


# ---------------------------------------------------------------- mapping details, no server


@pytest.fixture(scope="module")
def smol_vocab(smollm2_dir):
    from distill.models import load_tokenizer
    from distill.teachers.api_mapping import StudentVocab

    tok = load_tokenizer(str(smollm2_dir))
    return tok, StudentVocab(tok, "smollm2")


def api_tops(tok, vocab, ids: list[int], printed: str = "ignore") -> list[dict]:
    """top_logprobs as a server prints them for these sampled ids: the token, then two alternatives."""
    def show(i):
        return vocab.bytes[i].decode("utf-8", printed)

    return [{"token": show(i), "logprob": -0.25, "top": [{"token": show(i), "logprob": -0.25},
                                                          {"token": ",", "logprob": -2.0}]}
            for i in ids]


@pytest.mark.parametrize("printed", ["ignore", "replace"])  # llama.cpp prints fragments as '', vLLM as '\ufffd'
def test_seams_and_fragments_map_onto_the_rendered_turn(smol_vocab, printed):
    """Reasoning inline with other whitespace, an emoji split over byte tokens, a non-canonical split."""
    from distill.teachers.api_mapping import trace_rows

    tok, vocab = smol_vocab
    generated = "<think>\n\nOkay 🎉 so 2 plus 3.\n\n</think>\n\n The answer is 5. \n"
    ids = tok.encode(generated, add_special_tokens=False)
    okay = tok.convert_tokens_to_ids("Okay")
    split = [tok.convert_tokens_to_ids("Ok"), tok.convert_tokens_to_ids("ay")]
    assert okay in ids and None not in split
    ids[ids.index(okay):ids.index(okay) + 1] = split  # the teacher sampled "Ok" + "ay"
    trace = {"messages": [{"role": "user", "content": "2 + 3?"}], "reasoning": "Okay 🎉 so 2 plus 3.",
             "answer": "The answer is 5.", "top_logprobs": api_tops(tok, vocab, ids, printed)}
    student = smollm2_rows(trace, tok)
    counts = Counter()
    rows, lps, tails = trace_rows(trace, student, vocab, 3, "'t'", counts)
    text = [tok.convert_ids_to_tokens(i) for i in student]
    from_api = [j for j, lp in enumerate(lps) if lp[0] == -0.25]
    one_hot = [text[j] for j, lp in enumerate(lps) if lp[0] == 0.0]
    # the non-canonical split; the seam before the answer ("\n\n The" was generated, "\n\nThe" is
    # rendered: GPT-2 pre-tokenisation cuts that whitespace differently); the end of turn
    assert one_hot == ["Okay", "Ċ", "Ċ", "The", "<|im_end|>"]
    assert len(from_api) == len(student) - 5 == counts["api_rows"]
    emoji = [j for j, t in enumerate(text) if t in ("ĠðŁ", "İ", "ī")]
    assert emoji and all(rows[j][0] == student[j] for j in emoji)  # fragments: from the API, right ids
    assert all(rows[j][0] == student[j] and lps[j][1] == -2.0 for j in from_api)
    assert all(t == pytest.approx(math.log(1 - math.exp(-0.25) - math.exp(-2.0))) for j, t in enumerate(tails)
               if j in from_api)


def test_text_the_logprobs_are_not_for_is_refused(smol_vocab):
    from distill.teachers.api_mapping import Refusal, trace_rows

    tok, vocab = smol_vocab
    ids = tok.encode("The answer is 5.", add_special_tokens=False)
    trace = {"messages": [{"role": "user", "content": "2 + 3?"}], "answer": "The answer is 6.",
             "top_logprobs": api_tops(tok, vocab, ids)}
    with pytest.raises(Refusal, match=r"at generated position 4 the teacher has '5' where student 'smollm2' .* "
                                      r"has assistant token 4 '6'"):
        trace_rows(trace, smollm2_rows(trace, tok), vocab, 3, "t", Counter())


def test_api_bytes_are_kept_where_the_string_is_lossy():
    from distill.teachers.api import ApiTeacher

    api = ApiTeacher(base_url="http://x/v1", model="m", api_key="k", api_key_env=None,
                     sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=4), endpoint=Endpoint(), top_logprobs=2)
    choice = {"logprobs": {"content": [
        {"token": "\ufffd", "logprob": -0.1, "bytes": [240, 159],
         "top_logprobs": [{"token": "\ufffd", "logprob": -0.1, "bytes": [240, 159]},
                          {"token": " a", "logprob": -3.0, "bytes": [32, 97]}]}]}}
    (entry,) = api._logprobs(choice)
    assert entry == {"token": "\ufffd", "logprob": -0.1, "bytes": [240, 159],
                     "top": [{"token": "\ufffd", "logprob": -0.1, "bytes": [240, 159]},
                             {"token": " a", "logprob": -3.0}]}
