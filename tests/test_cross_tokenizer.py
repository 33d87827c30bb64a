"""KD between tokenizers (``teachers/align.py``): the alignment on the real tokenizers of six families,
the aligned loss equal to today's with one tokenizer and to a hand computation with two, and bad input.

Tiny random models of real architectures carry the real tokenizers (a Qwen2 teacher, a Llama 3
student, as in the issue); the learning tests are in tests/test_cross_tokenizer_learning.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.options import Endpoint
from distill.batching import Collator
from distill.kd_losses import DenseTeacher, KDSettings, SparseTeacher, chunked_kd_loss
from distill.rendering import RenderOptions, load_examples, render_prompt, target_mask
from distill.teachers.align import (KINDS, MANY_TO_ONE, ONE_TO_MANY, ONE_TO_ONE, UNMAPPED, TeacherSide, TokenText,
                                    align, describe, vocabulary_map)

from conftest import build_tiny
from test_train_sft_data import make_trace, write_traces

FAMILY_NAMES = ("qwen2", "llama3", "deepseek", "phi3", "gpt2", "smollm2")
#: text two tokenizers cut differently: digits, runs of spaces and newlines, accents, CJK, an emoji, LaTeX, code
TEXT = ("<think>\nFirst, 1024 = 2^{10}; naïve café 東京 🙂.\n\n  x  =  3;\tprint(x)\n</think>\n\n"
        "The answer is $\\boxed{1031}$.")


@pytest.fixture(scope="module")
def tokenizers(family_tokenizers):
    from distill.models import load_tokenizer

    return {name: load_tokenizer(str(family_tokenizers(name)), require_chat_template=False) for name in FAMILY_NAMES}


@pytest.mark.parametrize("student,teacher", list(itertools.permutations(FAMILY_NAMES, 2)))
def test_every_student_token_is_placed_on_the_teacher_text(tokenizers, student, teacher):
    """Same text, two tokenizers: every byte found on the other side; an exact token is exactly the bytes of
    its teacher tokens; a one-to-many token lies inside the teacher token its row is for."""
    s_text, t_text = TokenText.of(tokenizers[student]), TokenText.of(tokenizers[teacher])
    s_ids = tokenizers[student](TEXT, add_special_tokens=False)["input_ids"]
    t_ids = tokenizers[teacher](TEXT, add_special_tokens=False)["input_ids"]
    alignment = align(s_ids, t_ids, s_text, t_text)
    assert alignment.matched == alignment.total == len(TEXT.encode())
    s_bytes, s_ends = s_text.stream(s_ids)
    t_bytes, t_ends = t_text.stream(t_ids)
    assert s_bytes == t_bytes == TEXT.encode()  # sentencepiece's dummy prefix dropped, byte fallback joined
    s_starts, t_starts = [0, *s_ends[:-1]], [0, *t_ends[:-1]]
    for i, kind in enumerate(alignment.kind.tolist()):
        first, end = int(alignment.first[i]), int(alignment.end[i])
        if kind in (ONE_TO_ONE, MANY_TO_ONE):
            assert (s_starts[i], s_ends[i]) == (t_starts[first], t_ends[end - 1])
            assert (end - first == 1) == (kind == ONE_TO_ONE)
        else:
            assert kind == ONE_TO_MANY
            assert t_starts[first] <= s_starts[i] < t_ends[first]
    counts = alignment.counts()
    assert sum(counts[name] for name in KINDS.values()) == len(s_ids)
    assert counts["one_to_one"] > len(s_ids) / 3
    assert "% one-to-one" in describe(counts)


def test_template_seams_are_skipped_and_the_turns_ends_pair_up(tokenizers, family_tokenizers, tmp_path):
    """A teacher whose template drops the reasoning of an assistant turn (as DeepSeek-R1's does): the
    student's reasoning tokens are unmapped, the answer aligns, and the student's end of turn meets the
    teacher's (ChatML's <|im_end|>)."""
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(family_tokenizers("qwen2"))
    qwen.chat_template = qwen.chat_template.replace("message['content']", "message['content'].split('</think>')[-1]")
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(7)])
    (ex,), _, _ = load_examples(traces, tokenizers["llama3"], RenderOptions(), teacher_tokenizer=qwen)
    assert "plus" not in qwen.decode(ex["teacher_input_ids"])
    side = TeacherSide([ex], tokenizers["llama3"], qwen, "llama3", "qwen2")
    alignment = side.by_example[ex["example_index"]].alignment
    student = tokenizers["llama3"]
    targets = [t for t in ex["labels"] if t != -100]
    unmapped = [student.decode([t]) for t, k in zip(targets, alignment.kind) if k == UNMAPPED]
    assert "".join(unmapped).startswith("<think>\n7 plus 7 makes 14.\n</think>")
    assert student.decode([t for t, k in zip(targets, alignment.kind) if k != UNMAPPED]).endswith(
        "The answer is \\boxed{14}.<|eot_id|>")
    assert alignment.kind[-1] == ONE_TO_ONE and targets[-1] == student.convert_tokens_to_ids("<|eot_id|>")
    assert side.counts["unmapped"] == len(unmapped) and side.counts["one_to_one"] > 5


def test_the_vocabulary_map_pairs_tokens_of_the_same_bytes(tokenizers):
    qwen, llama, phi = tokenizers["qwen2"], tokenizers["llama3"], tokenizers["phi3"]
    qwen_to_llama = vocabulary_map(TokenText.of(qwen), TokenText.of(llama), rows=len(qwen) + 128)
    assert len(qwen_to_llama) == len(qwen) + 128 and (qwen_to_llama[len(qwen):] == -1).all()
    for word in (" the", "Hello", " café", "\n\n"):
        (t,), (s,) = qwen.encode(word, add_special_tokens=False), llama.encode(word, add_special_tokens=False)
        assert qwen_to_llama[t] == s
    assert qwen_to_llama[qwen.convert_tokens_to_ids("<|im_end|>")] == llama.convert_tokens_to_ids("<|eot_id|>")
    # sentencepiece: '▁the' is ' the'; a byte-fallback piece maps where the other side has that byte alone
    phi_to_llama = vocabulary_map(TokenText.of(phi), TokenText.of(llama))
    (t,), (s,) = phi.encode("a the", add_special_tokens=False)[1:], llama.encode(" the", add_special_tokens=False)
    assert phi_to_llama[t] == s
    assert phi_to_llama[phi.convert_tokens_to_ids("<0x0A>")] == llama.encode("\n", add_special_tokens=False)[0]
    mapped = phi_to_llama[phi_to_llama >= 0]
    assert len(set(mapped.tolist())) == len(mapped)  # one-to-one


# ---------------------------------------------------------------- the loss


def student_loss(student, batch: dict, teacher, settings: KDSettings):
    """The student's chunked KD loss on a batch, its (KD, CE) sums and the gradients of the loss with respect
    to the hidden states and the output embedding."""
    features = {k: batch[k] for k in ("input_ids", "attention_mask")}
    index = batch["target_index"]
    hidden = student.get_decoder()(**features).last_hidden_state.flatten(0, 1)[index].detach().requires_grad_()
    weight = student.get_output_embeddings().weight
    total, sums = chunked_kd_loss(hidden, weight, batch["labels"].flatten()[index + 1], teacher, settings)
    return (total, sums, *torch.autograd.grad(total, (hidden, weight)))


def scores(teacher, batch: dict):
    features = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return teacher.scores(features, target_mask(batch["labels"]), batch["example_index"], index=batch["target_index"])


@pytest.fixture(scope="module")
def smol_pair(smollm2_dir, tmp_path_factory):
    """A tiny teacher and a tiny student of one tokenizer (SmolLM2's) and four rendered traces."""
    from distill.models import load_model, load_tokenizer

    work = tmp_path_factory.mktemp("identity")
    teacher = load_model(str(build_tiny("llama", smollm2_dir, work / "teacher", seed=1)), "cpu")
    student = load_model(str(build_tiny("qwen2", smollm2_dir, work / "student", seed=2)), "cpu")
    tok = load_tokenizer(str(smollm2_dir))
    traces = write_traces(work / "traces.jsonl", [make_trace(i) for i in (3, 14, 159)])
    examples, _, _ = load_examples(traces, tok, RenderOptions(), teacher_tokenizer=tok)
    return teacher, student, tok, examples, traces, work


def assert_same_loss(a, b, grads: bool = True):
    (total_a, sums_a, gh_a, gw_a), (total_b, sums_b, gh_b, gw_b) = a, b
    torch.testing.assert_close(total_a, total_b, rtol=2e-6, atol=0)
    torch.testing.assert_close(sums_a, sums_b, rtol=1e-4, atol=1e-6)
    if grads:
        for ga, gb in ((gh_a, gh_b), (gw_a, gw_b)):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6 * float(ga.abs().max()))


def test_one_tokenizer_through_the_aligned_path_gives_todays_online_loss(smol_pair):
    """The aligned online teacher, with the whole vocabulary as its top-k, against today's dense teacher:
    the same loss and gradients to fp32 rounding, for every divergence (tvd's gradient is sign(p - q), which
    rounding flips where a random teacher and student agree: its loss only)."""
    from distill.kd_losses import LOSSES
    from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher

    teacher, student, tok, examples, _, _ = smol_pair
    batch = Collator(tok.pad_token_id)(examples)
    online = OnlineTeacher(teacher, len(tok))
    aligned = AlignedOnlineTeacher(online, TeacherSide(examples, tok, tok, "s", "t"), len(tok), top_k=len(tok),
                                   temperature=2.0)
    dense, rows = scores(online, batch), scores(aligned, batch)
    assert isinstance(dense, DenseTeacher) and bool(rows.sparse_rows.all())
    for loss in LOSSES:
        settings = KDSettings(loss=loss, beta=0.3, alpha=0.7, temperature=2.0, chunk_size=16)
        assert_same_loss(student_loss(student, batch, dense, settings), student_loss(student, batch, rows, settings),
                         grads=loss != "tvd")
    with pytest.raises(ValueError, match="temperature"):
        student_loss(student, batch, rows, KDSettings(temperature=1.0))


def teacher_token_cache(out, teacher, tokenizer, examples, top_k: int, temperature: float = 1.0):
    """A cache of the teacher's own tokens, as ``distill logits`` writes one for students of any tokenizer."""
    from distill.store import CacheWriter, save_teacher_tokenizer, token_sha, tokenizer_sha
    from distill.teachers.sources import teacher_top_k

    header = {"teacher": "tiny-teacher", "tokens": "teacher", "teacher_vocab": "tokenizer",
              "tokenizer_sha": tokenizer_sha(tokenizer), "vocab_size": len(tokenizer), "top_k": top_k,
              "temperature": temperature, "max_length": 16384, "overlong": "drop", "think_style": "think"}
    rows = teacher_top_k(teacher, examples, top_k, temperature, len(tokenizer), 64, realized=True)
    CacheWriter(out, header).add_shard([{"id": e["id"], "sha": token_sha(e["input_ids"]), "ids": ids, "logprobs": lps,
                                         "log_tail": tail, "targets": targets}
                                        for e, (ids, lps, tail, targets) in zip(examples, rows)])
    save_teacher_tokenizer(out, tokenizer)
    return out


def test_one_tokenizer_through_the_aligned_path_gives_todays_cached_loss(smol_pair):
    """A cache of the teacher's own tokens read by a student of the same tokenizer and template: today's
    sparse teacher, bit for bit; forced through the alignment, the same loss and gradients."""
    from distill.store import LogitsCache
    from distill.teachers.sources import AlignedCachedTeacher, CachedTeacher

    teacher, student, tok, examples, traces, work = smol_pair
    cache = teacher_token_cache(work / "cache", teacher, tok, examples, top_k=16)
    opened = CachedTeacher.open(str(cache), tok, examples, student="s", traces=traces, kd_temperature=1.0,
                                student_rows=len(tok))
    assert isinstance(opened, CachedTeacher)
    aligned = AlignedCachedTeacher.open(LogitsCache(cache), tok, examples, student="s", traces=traces,
                                        student_rows=len(tok))
    assert aligned.counts["one_to_one"] == sum(len(t) for t in aligned.targets.values())
    batch = Collator(tok.pad_token_id)(examples)
    today = scores(opened, batch)
    assert isinstance(today, SparseTeacher)
    for loss in ("fkl", "rkl", "jsd"):
        settings = KDSettings(loss=loss, alpha=0.5, chunk_size=16)
        assert_same_loss(student_loss(student, batch, today, settings),
                         student_loss(student, batch, scores(aligned, batch), settings))


@pytest.fixture(scope="module")
def qwen_llama(family_tokenizers, tmp_path_factory):
    """Tiny random models: one of Qwen2's tokenizer and architecture, one of Llama 3's."""
    from distill.models import load_model, load_tokenizer

    work = tmp_path_factory.mktemp("qwen-llama")
    models, tokenizers = {}, {}
    for family, kind, seed in (("qwen2", "qwen2", 3), ("llama3", "llama", 4)):
        path = build_tiny(kind, family_tokenizers(family), work / family, seed=seed)
        models[family], tokenizers[family] = load_model(str(path), "cpu"), load_tokenizer(str(path))
    return models, tokenizers, work


def by_hand(teacher, student, ex: dict, t_tok, s_tok) -> float:
    """Forward KL (temperature 1) summed over the student's targets, straight from the two models'
    log-softmax, for an ASCII text (a character is a byte) in two byte-level BPE vocabularies whose end of
    turn and EOS are two tokens each (Qwen2's, Llama 3's). A target that is whole teacher tokens gets
    p(first) x p(second | first) x ... (chain rule) and the first teacher token keeps the rest of its mass;
    every other teacher token counts for the student token of the same text, and the mass of those with
    none is one bucket. A target inside a teacher token gets ULD against the row of that teacher token:
    the L1 distance of the two sorted distributions."""
    t_logp = torch.log_softmax(teacher(torch.tensor([ex["teacher_input_ids"]])).logits[0].double(), -1)
    s_logp = torch.log_softmax(student(torch.tensor([ex["input_ids"]])).logits[0].double(), -1)
    t_ids, s_ids = ex["teacher_input_ids"], ex["input_ids"]
    t_pos = [t for t, on in enumerate(target_mask(ex["teacher_labels"])) if on]
    s_pos = [t for t, on in enumerate(target_mask(ex["labels"])) if on]
    eot = lambda tok: tok.convert_tokens_to_ids("<|im_end|>" if "<|im_end|>" in tok.get_vocab() else "<|eot_id|>")  # noqa: E731
    ends = {t_tok.eos_token_id, eot(t_tok), s_tok.eos_token_id, eot(s_tok)}

    def spans(tok, ids):  # (start, end) of each token in the text, an end of turn as 5 characters
        out, at = [], 0
        for i in ids:
            n = 5 if i in ends else len(tok.decode([i]))
            out.append((at, at + n))
            at += n
        return out

    t_spans, s_spans = spans(t_tok, [t_ids[t + 1] for t in t_pos]), spans(s_tok, [s_ids[t + 1] for t in s_pos])
    same_text = [-1] * len(t_tok)  # teacher id -> student id of the same token (one printable alphabet)
    s_vocab = s_tok.get_vocab()
    for piece, t in t_tok.get_vocab().items():
        if not piece.startswith("<|") and piece in s_vocab:
            same_text[t] = s_vocab[piece]
    same_text[eot(t_tok)], same_text[t_tok.eos_token_id] = eot(s_tok), s_tok.eos_token_id  # end of turn, EOS
    same_text = torch.tensor(same_text)
    mapped = same_text >= 0
    total = 0.0
    for pos, (a, b) in zip(s_pos, s_spans):
        covered = [j for j, (c, d) in enumerate(t_spans) if a <= c < b]
        q = s_logp[pos].exp()
        if not covered or t_spans[covered[0]][0] != a or t_spans[covered[-1]][1] != b:
            j = max(j for j, (c, _) in enumerate(t_spans) if c <= a)
            q_sorted, p_sorted = q.sort(descending=True).values, t_logp[t_pos[j]].exp().sort(descending=True).values
            n = min(len(p_sorted), len(q_sorted))
            total += float((q_sorted[:n] - p_sorted[:n]).abs().sum())
            continue
        target, first = s_ids[pos + 1], t_pos[covered[0]]
        chain = math.exp(sum(float(t_logp[t_pos[j], t_ids[t_pos[j] + 1]]) for j in covered))
        prob = t_logp[first].exp()
        if len(covered) > 1:
            prob[t_ids[first + 1]] -= chain
        p = torch.zeros(len(s_tok), dtype=torch.float64).index_add_(0, same_text[mapped], prob[mapped])
        support = torch.zeros(len(s_tok), dtype=torch.bool)
        support[same_text[mapped]] = True
        if len(covered) > 1:
            p[target] += chain
            support[target] = True
        tail, q_tail = float(prob[~mapped].sum()), 1.0 - float(q[support].sum())
        kl = torch.where(p > 0, p * (p / q).log(), 0.0).sum()
        total += float(kl) + tail * math.log(tail / q_tail)
    return total


@pytest.mark.parametrize("teacher_family,student_family,kind", [("qwen2", "llama3", MANY_TO_ONE),
                                                                   ("llama3", "qwen2", ONE_TO_MANY)])
def test_the_aligned_loss_is_the_hand_computed_one(qwen_llama, teacher_family, student_family, kind):
    """A text Qwen2 and Llama 3 cut differently (Llama 3 writes 1024 as '102' '4', Qwen2 digit by digit): the
    aligned online loss is the hand computation, with the chain rule where a Llama 3 student token is several
    Qwen2 teacher tokens, and ULD where a Qwen2 student token is part of a Llama 3 teacher token."""
    from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher

    models, toks, work = qwen_llama
    trace = {"id": "p#0", "prompt_id": "p", "messages": [{"role": "user", "content": "What is 1024 + 7?"}],
             "reasoning": "Add: 1024 + 7 = 1031.", "answer": "The sum is 1031."}
    traces = write_traces(work / "hand.jsonl", [trace])
    t_tok, s_tok = toks[teacher_family], toks[student_family]
    (ex,), _, _ = load_examples(traces, s_tok, RenderOptions(), teacher_tokenizer=t_tok)
    side = TeacherSide([ex], s_tok, t_tok, student_family, teacher_family)
    alignment = side.by_example[0].alignment
    assert (alignment.kind == kind).sum() >= 3 and (alignment.kind != UNMAPPED).all()
    teacher = AlignedOnlineTeacher(OnlineTeacher(models[teacher_family], len(s_tok)), side, len(s_tok),
                                   top_k=len(t_tok))
    batch = Collator(s_tok.pad_token_id)([ex])
    total, (kd, _), _, _ = student_loss(models[student_family], batch, scores(teacher, batch),
                                        KDSettings(loss="fkl", alpha=1.0))
    with torch.no_grad():
        want = by_hand(models[teacher_family], models[student_family], ex, t_tok, s_tok)
    assert float(kd) == pytest.approx(want, rel=2e-5)
    assert total.item() == pytest.approx(want, rel=2e-5)


# ---------------------------------------------------------------- a served teacher, rollouts


def test_a_served_teacher_of_another_tokenizer_scores_its_own_tokens(tokenizers, tmp_path):
    """vLLM-shaped server with a made-up Qwen2 teacher whose log-probs are known: each one-to-one student row
    is the teacher's top-k (the actual token in it) mapped onto Llama 3 ids; a rollout batch is scored as the
    teacher's own tokens of the sampled text (prompt_logprobs), the same tokens its template gives."""
    import sys
    from pathlib import Path

    from distill.kd_losses import PAD
    from distill.teachers.served import AlignedServedTeacher

    sys.path.insert(0, str(Path(__file__).parent / "servers"))
    from scoring_server import ScoringServer, teacher_logprob, teacher_top

    qwen, llama = tokenizers["qwen2"], tokenizers["llama3"]
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in (3, 1024)])
    examples, _, _ = load_examples(traces, llama, RenderOptions(), teacher_tokenizer=qwen)
    side = TeacherSide(examples, llama, qwen, "llama3", "qwen2")
    server = ScoringServer(qwen, model="teacher-7b", schedules=[[]]).start()
    k, vocab = 8, len(qwen)
    teacher = AlignedServedTeacher.connect(side=side, student_rows=len(llama), base_url=server.base_url,
                                           model="teacher-7b", top_k=k, endpoint=Endpoint(retry_backoff=0.05))
    try:
        batch = Collator(llama.pad_token_id)(examples)
        rows = scores(teacher, batch)
        to_student = vocabulary_map(side.teacher, side.student, vocab)
        r, checked = 0, 0
        for ex in examples:
            sequence = side.by_example[ex["example_index"]]
            for i, kind in enumerate(sequence.alignment.kind.tolist()):
                if kind == ONE_TO_ONE:
                    position = sequence.positions[sequence.alignment.first[i]]
                    prev, actual = sequence.ids[position], sequence.ids[position + 1]
                    top, lps, _ = teacher_top(prev, k, vocab)
                    if actual not in top:  # the actual token takes the k-th place
                        top, lps = top[:-1] + [actual], lps[:-1] + [teacher_logprob(prev, actual, vocab)]
                    want = {int(to_student[t]): lp for t, lp in zip(top, lps) if to_student[t] >= 0}
                    got = {int(t): float(lp) for t, lp in zip(rows.ids[r], rows.logprobs[r]) if lp > PAD / 2}
                    assert got.keys() == want.keys() and sequence.targets[i] in got
                    assert [got[t] for t in want] == pytest.approx(list(want.values()), abs=1e-5)
                    checked += 1
                r += 1
        assert checked > 10
        # the same tokens as rollouts (no example_index): the teacher reads the sampled text in its own tokens
        rollouts = Collator(llama.pad_token_id)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        server.scored.clear()
        again = teacher.scores({k: rollouts[k] for k in ("input_ids", "attention_mask")}, target_mask(rollouts["labels"]),
                               None, index=rollouts["target_index"])
        assert sorted(server.scored) == sorted(side.by_example[e["example_index"]].ids.tolist() for e in examples)
        torch.testing.assert_close(again.logprobs[again.sparse_rows], rows.logprobs[rows.sparse_rows])
    finally:
        teacher.close()
        server.stop()


def test_a_rollout_in_broken_utf8_is_read_around_the_broken_bytes(tokenizers):
    """A student may sample a byte that is not text (half a character): the teacher reads U+FFFD there, the
    student tokens of those bytes get no teacher term on-policy, the rest aligns."""
    qwen, llama = tokenizers["qwen2"], tokenizers["llama3"]
    messages = [{"role": "user", "content": "Say it."}]
    prompt, teacher_prompt = render_prompt(messages, llama), render_prompt(messages, qwen)
    example = {"example_index": 0, "input_ids": prompt, "labels": [-100] * len(prompt),
               "teacher_input_ids": teacher_prompt, "teacher_labels": [-100] * len(teacher_prompt)}
    side = TeacherSide([example], llama, qwen, "llama3", "qwen2")
    half = next(i for i, p in enumerate(side.student.pieces) if p == "東".encode()[:1])  # a lone lead byte
    completion = llama.encode("Tokyo is", add_special_tokens=False) + [half] + llama.encode(" big.", add_special_tokens=False)
    completion.append(llama.convert_tokens_to_ids("<|eot_id|>"))
    ids = example["input_ids"] + completion
    sequence = side.rollout(ids, list(range(len(example["input_ids"]) - 1, len(ids) - 1)))
    assert qwen.decode(sequence.ids[len(example["teacher_input_ids"]):].tolist()) == "Tokyo is\ufffd big.<|im_end|>"
    kinds = sequence.alignment.kind.tolist()
    assert kinds[completion.index(half)] == UNMAPPED
    assert all(kind != UNMAPPED for i, kind in enumerate(kinds) if completion[i] != half)
    plan = TeacherSide.plan([sequence], one_hot=False)
    assert plan.one_hot is False


# ---------------------------------------------------------------- bad input


def test_a_cache_whose_teacher_tokenizer_cannot_be_loaded_is_refused(smol_pair, tokenizers, tmp_path):
    from distill.errors import DistillError
    from distill.teachers.sources import CachedTeacher

    teacher, _, tok, examples, traces, _ = smol_pair
    cache = teacher_token_cache(tmp_path / "cache", teacher, tok, examples, top_k=4)
    (cache / "teacher-tokenizer" / "tokenizer.json").write_text("{not json")
    llama = tokenizers["llama3"]
    student_examples, _, _ = load_examples(traces, llama, RenderOptions())
    with pytest.raises(DistillError) as refused:
        CachedTeacher.open(str(cache), llama, student_examples, student="llama3", traces=traces, kd_temperature=1.0,
                           student_rows=len(llama))
    message = str(refused.value)
    assert "\n" not in message and "teacher-tokenizer" in message and "cannot load the teacher's vocabulary" in message


def test_a_teacher_without_a_chat_template_is_refused(smollm2_dir, without_chat_template, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    from distill.errors import DistillError

    base = AutoTokenizer.from_pretrained(without_chat_template(smollm2_dir))
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(1)])
    with pytest.raises(DistillError) as refused:
        load_examples(traces, tokenizers["llama3"], RenderOptions(), teacher_tokenizer=base)
    message = str(refused.value)
    assert "\n" not in message and "no chat template" in message and base.name_or_path in message


def test_api_tokens_that_are_not_utf8_text_are_refused_before_anything_is_kept():
    """Sampled bytes that do not decode (a lead byte followed by ASCII) are refused, naming the token; the
    teacher's string vocabulary is left as it was."""
    from collections import Counter

    from distill.store import STRINGS_ROWS
    from distill.teachers.api_mapping import Refusal, TeacherStrings, teacher_string_rows
    from distill.teachers.base import top_entry

    tops = [top_entry("Tok", -0.1, [("Tok", -0.1)]), top_entry("\ufffd", -0.2, [("\ufffd", -0.2, [0xE6])], [0xE6]),
            top_entry("yo", -0.3, [("yo", -0.3)])]
    strings = TeacherStrings()
    with pytest.raises(Refusal, match=r"top_logprobs.*not UTF-8 text: generated token 1 .*b'\\xe6'"):
        teacher_string_rows({"top_logprobs": tops, "finish_reason": "stop"}, strings, 2, STRINGS_ROWS, Counter())
    assert strings.pieces == [None, b""]


def test_aligned_rows_give_one_loss_whatever_the_chunks_and_compiled_or_not(monkeypatch):
    """Rows of every kind (one-to-one, many-to-one, ULD, one-hot) over small made-up vocabularies: the loss
    and its gradients do not depend on where the chunks cut (ULD rows on both sides of a cut) nor on
    torch.compile (the default on CUDA; here its graphs traced with inductor's decompositions, run eagerly)."""
    import numpy as np

    from distill import kd_losses
    from distill.teachers.align import Alignment, Plan, TeacherRows, project

    g = torch.Generator().manual_seed(3)
    kind = np.array([ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, UNMAPPED, ONE_TO_ONE, ONE_TO_MANY, MANY_TO_ONE, ONE_TO_ONE])
    first = np.array([0, 1, 3, -1, 4, 5, 6, 9], dtype=np.int32)
    end = np.array([1, 3, 0, 0, 5, 0, 9, 10], dtype=np.int32)
    teacher_vocab, student_vocab, k = 30, 50, 6
    ids = torch.stack([torch.randperm(teacher_vocab, generator=g)[:k] for _ in range(10)])
    logprobs = torch.log_softmax(torch.randn(10, k + 1, generator=g), -1)
    realized = ids[torch.arange(10), torch.randint(0, k, (10,), generator=g)]
    vocab_map = torch.full((teacher_vocab,), -1)
    vocab_map[:24] = torch.randperm(student_vocab, generator=g)[:24]
    targets = torch.randint(0, student_vocab, (8,), generator=g)
    targets[[0, 4, 7]] = vocab_map[realized[[0, 4, 9]]].clamp(min=0)  # one-to-one: the student token is the teacher's
    plan = Plan.join([(Alignment(kind.astype(np.int8), first, end, 0, 0), targets.tolist(), 10)])
    teacher = project(TeacherRows(ids, logprobs[:, :k], logprobs[:, k], realized), plan, vocab_map, student_vocab, 2.0)
    assert teacher.uld_rows.tolist() == [2, 5] and teacher.sparse_rows.tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
    hs, ws = torch.randn(8, 16, generator=g), torch.randn(student_vocab, 16, generator=g)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager_decomp_partition", **kw))
    monkeypatch.setattr(kd_losses, "_COMPILED", {})
    results = []
    for mode, chunk in (("never", 100), ("never", 3), ("always", 3)):
        monkeypatch.setattr(kd_losses, "COMPILE", mode)
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        total, sums = chunked_kd_loss(h, w, targets, teacher, KDSettings(loss="jsd", temperature=2.0, chunk_size=chunk))
        total.backward()
        results.append((total.detach(), sums, h.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
