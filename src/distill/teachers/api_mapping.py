"""A trace's API top_logprobs as cache rows over the student's target tokens.

``distill generate --top-logprobs K`` stores, for every token the teacher generated (reasoning and
answer, as the server tokenised them), the sampled token and its K most likely alternatives with
their log-probs, as strings (plus the raw bytes where the server gave bytes that differ from the
string). :func:`trace_rows` turns them into the rows ``distill logits`` stores for a local teacher
(``store``), so ``distill train --method kd --teacher CACHE`` has one path whatever the teacher
was. It works only when the teacher's tokens are the student's:

1. Vocabulary. Every sampled token and every alternative must be exactly one token of the
   student's vocabulary, compared as raw bytes; the first that is not stops the run (the teacher
   uses another tokenizer, and its distribution cannot be written over the student's tokens).
   Servers print a byte fragment of a multi-byte character lossily when they give no bytes
   (llama.cpp as '', vLLM as '\\ufffd'): such an alternative cannot be identified, so its
   probability stays in the tail bucket (counted in ``run.json``).
2. Sequence. Training renders each trace with the student's chat template and labels the
   assistant tokens (``rendering``); the cache needs one row per target token. The sampled
   tokens are aligned with those tokens: where the rendered text is the text the teacher
   generated they must be the same tokens one for one, and the first difference stops the run
   (naming the position and both tokens). The rendering changes the text only in whitespace and
   think tags (reasoning and answer are stripped, ``<think>\\n...\\n</think>\\n\\n`` is written
   around the reasoning, the template adds its end-of-turn token); such seams, and the rare spots
   where the teacher sampled a non-canonical split of the same text, are stepped over, provided
   both sides agree once whitespace, think tags and special tokens are removed.
3. Rows. A labelled token matched to a sampled token gets the server's alternatives (sorted, at
   most ``--top-k``; the sampled token too if it is not among them and a slot is free) and log
   tail = log(1 - sum of their probabilities). A labelled token the API did not produce (the
   think wrapper, the end-of-turn token, a seam) gets a one-hot teacher: log-prob 0 for the token
   itself. One-hot rather than masked, because KD at ``--kd-weight 1`` has no cross-entropy: masked,
   the student would never be taught to close its reasoning or end its turn; and the teacher did
   produce these tokens (it stopped; it wrote the tags), so one-hot is close to its distribution
   there. Rows are padded to k with other token ids at log-prob -20 (p ~ 2e-9), and an empty tail
   is floored there too: a zero-probability bucket would make reverse KL infinite.

API log-probs are the model's own distribution, before the sampling temperature and top-p
(vLLM, llama.cpp and OpenAI report them so), so the cache's temperature is 1.

For a student of another tokenizer, :func:`teacher_string_rows` keeps the rows in the teacher's own
tokens instead, one per generated token, numbered by :class:`TeacherStrings` (the distinct tokens by
their bytes): a cache of the teacher's own tokens, which ``teachers.align`` lines up with any
student's rendering at training time.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from functools import lru_cache

FLOOR = -20.0           # log-prob of padding entries and of an empty tail
WINDOW = 64             # tokens searched on either side to step over a seam
THINK_TAGS = ("<think>", "</think>")
LOSSY, MISSING, SAMPLED = -1, -2, -3  # lookup results that are not token ids


# ---------------------------------------------------------------- the student's vocabulary as bytes


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "sentencepiece" if hasattr(tokenizer, "sp_model") else "decode"
    # the decoder alone: the whole tokenizer as JSON takes over a second for a 150k vocabulary
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    kinds = {d.get("type") for d in decoder.get("decoders") or [decoder]}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"ByteFallback", "Metaspace", "Replace"}:
        return "sentencepiece"
    return "decode"


def token_bytes(tokenizer) -> list[bytes]:
    """The raw bytes of every token id (added tokens: their text)."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {i: t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    kind = _decoder_kind(tokenizer)
    alphabet = _byte_level_alphabet()
    out = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif piece is None:
            out.append(b"")
        elif kind == "byte_level" and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        elif kind == "sentencepiece":
            hex_byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            out.append(bytes([int(hex_byte.group(1), 16)]) if hex_byte
                       else piece.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8"))
    return out


class StudentVocab:
    """The student's tokens as raw bytes, for exact lookups of the strings an API printed."""

    def __init__(self, tokenizer, name: str):
        self.describe = f"student '{name}' ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"
        self.bytes = token_bytes(tokenizer)
        self.ids: dict[bytes, int] = {}
        for i, b in enumerate(self.bytes):
            if b:
                self.ids.setdefault(b, i)
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
        markers = {self.text([i]) for i in special if i < len(self.bytes) and self.bytes[i]} | set(THINK_TAGS)
        self.markers = sorted(markers, key=len, reverse=True)
        self._lossy: dict[int, tuple[str, ...]] = {}

    def lookup(self, alternative: dict) -> int:
        """Student id of one API token; LOSSY for a fragment printed without bytes; MISSING if not one token."""
        raw = alternative.get("bytes")
        if raw is not None:
            key = bytes(raw)
        else:
            token = alternative["token"]
            if not token or "\ufffd" in token:
                return LOSSY
            try:
                key = token.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: a fragment too
                return LOSSY
        return self.ids.get(key, MISSING)

    def text(self, ids) -> str:
        return b"".join(self.bytes[i] for i in ids).decode("utf-8", "replace")

    def lossy_forms(self, token_id: int) -> tuple[str, ...]:
        """How servers print this token if it is a fragment of a character ('' or '\\ufffd' forms)."""
        if token_id not in self._lossy:
            raw = self.bytes[token_id]
            try:
                raw.decode("utf-8")
                forms: tuple[str, ...] = ()
            except UnicodeDecodeError:
                forms = (raw.decode("utf-8", "ignore"), raw.decode("utf-8", "replace"))
            self._lossy[token_id] = forms
        return self._lossy[token_id]

    def normalise(self, text: str) -> str:
        """The text without think tags, special tokens and whitespace: what seams may change."""
        for marker in self.markers:
            text = text.replace(marker, "")
        return "".join(text.split())


# ---------------------------------------------------------------- one trace


class Refusal(Exception):
    """A trace whose log-probs cannot be used; the caller adds where it is."""


def _shown(entry: dict) -> str:
    raw = entry.get("bytes")
    return bytes(raw).decode("utf-8", "replace") if raw is not None else entry["token"]


def _mapped_alternatives(tops: list[dict], vocab: StudentVocab, teacher: str) -> tuple[list[int], list[list]]:
    """Student ids of the sampled tokens and (id, logprob) of the alternatives; refuses unknown tokens."""
    sampled, alternatives = [], []
    for pos, entry in enumerate(tops):
        for what, alt in (("sampled token", entry), *(("alternative", a) for a in entry.get("top") or ())):
            sid = vocab.lookup(alt)
            if sid == MISSING:
                raise Refusal(
                    f"teacher {teacher} {what} {_shown(alt)!r} at generated position {pos} is not one token of "
                    f"{vocab.describe}: the teacher's tokenizer differs from the student's, so its log-probs "
                    f"cannot be mapped onto it; leave out --student (a cache in the teacher's own tokens, which "
                    f"'distill train' aligns to a student of any tokenizer)")
            if what == "sampled token":
                sampled.append(sid)
                continue
            if ("bytes" not in alt and alt["token"] == entry["token"]
                    and abs(float(alt["logprob"]) - float(entry["logprob"])) < 1e-6):
                sid = SAMPLED  # the sampled token itself: identified by the alignment even if printed lossily
            alternatives.append((pos, sid, float(alt["logprob"])))
    rows: list[list] = [[] for _ in tops]
    for pos, sid, lp in alternatives:
        rows[pos].append((sid, lp))
    return sampled, rows


def align(sampled: list[int], shown: list[str], student: list[int], vocab: StudentVocab,
          teacher: str) -> list[int | None]:
    """For each student token, the generated position that produced it (None: not produced by the API)."""
    n_api, n_student = len(sampled), len(student)

    def match(i: int, j: int) -> bool:
        return sampled[i] == student[j] or shown[i] in vocab.lossy_forms(student[j])

    def agree(i0: int, i1: int, j0: int, j1: int) -> bool:
        api, ours = "".join(shown[i0:i1]), vocab.text(student[j0:j1])
        if vocab.normalise(api) == vocab.normalise(ours):
            return True
        if any(s == LOSSY for s in sampled[i0:i1]):  # fragments printed lossily: compare the ASCII
            ascii_only = lambda t: "".join(c for c in vocab.normalise(t) if c < "\x80")  # noqa: E731
            return ascii_only(api) == ascii_only(ours)
        return False

    def resync(i: int, j: int) -> tuple[int, int] | None:
        for d in range(1, 2 * WINDOW + 1):
            for di in range(max(0, d - WINDOW), min(d, WINDOW) + 1):
                i1, j1 = i + di, j + d - di
                if i1 > n_api or j1 > n_student:
                    continue
                if (i1, j1) != (n_api, n_student) and not (i1 < n_api and j1 < n_student and match(i1, j1)):
                    continue
                if agree(i, i1, j, j1):
                    return i1, j1
        return None

    source: list[int | None] = [None] * n_student
    i = j = 0
    while i < n_api or j < n_student:
        if i < n_api and j < n_student and match(i, j):
            source[j] = i
            i, j = i + 1, j + 1
            continue
        step = resync(i, j)
        if step is None:
            theirs = repr(shown[i]) if i < n_api else "nothing more"
            ours = repr(vocab.text([student[j]])) if j < n_student else "nothing more"
            before = vocab.text(student[max(0, j - 4):j])
            raise Refusal(
                f"teacher {teacher} sampled tokens do not re-tokenise to the student's: at generated position "
                f"{i} the teacher has {theirs} where {vocab.describe} has assistant token {j} {ours} "
                f"(after {before!r}); the teacher's tokenizer differs, or the trace's text is not the text the "
                f"log-probs are for; train on these traces with 'distill train --method sft'")
        i, j = step
    return source


def trace_rows(trace: dict, student: list[int], vocab: StudentVocab, top_k: int, teacher: str,
               counts: Counter) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """(ids, log-probs, log tail) per student assistant token, from the trace's API top_logprobs."""
    tops = trace["top_logprobs"]
    sampled, alternatives = _mapped_alternatives(tops, vocab, teacher)
    source = align(sampled, [_shown(t) for t in tops], student, vocab, teacher)
    ids, logprobs, tails = [], [], []
    for token, pos in zip(student, source):
        if pos is None:
            kept = [(token, 0.0)]
            counts["one_hot_rows"] += 1
            log_tail = FLOOR
        else:
            kept, seen = [], set()
            for sid, lp in sorted(alternatives[pos], key=lambda a: -a[1]):
                sid = token if sid == SAMPLED else sid
                if sid == LOSSY:
                    counts["lossy_alternatives"] += 1
                elif sid not in seen and len(kept) < top_k:
                    kept.append((sid, lp))
                    seen.add(sid)
            if token not in seen and len(kept) < top_k:  # room left (fragments, duplicates): the sampled token
                kept.append((token, float(tops[pos]["logprob"])))
            tail = 1.0 - math.fsum(math.exp(lp) for _, lp in kept)
            log_tail = math.log(tail) if tail > math.exp(FLOOR) else FLOOR
            counts["api_rows"] += 1
        used = {sid for sid, _ in kept}
        pad = (t for t in range(len(vocab.bytes)) if t not in used)
        kept += [(next(pad), FLOOR) for _ in range(top_k - len(kept))]
        ids.append([sid for sid, _ in kept])
        logprobs.append([lp for _, lp in kept])
        tails.append(log_tail)
    return ids, logprobs, tails


# ---------------------------------------------------------------- the command


def teacher_name(trace: dict) -> str:
    teacher = trace.get("teacher") if isinstance(trace.get("teacher"), dict) else {}
    return str(teacher.get("name") or teacher.get("model") or "unknown")


def teacher_described(trace: dict) -> str:
    """'NAME' or 'NAME' (model 'MODEL'): what the messages call the teacher."""
    name = teacher_name(trace)
    model = (trace.get("teacher") or {}).get("model") if isinstance(trace.get("teacher"), dict) else None
    return f"'{name}'" + (f" (model '{model}')" if model and model != name else "")


def check_logprobs(trace: dict) -> int:
    """K of a trace's top_logprobs; refuses traces without usable ones."""
    teacher = teacher_described(trace)
    tops = trace.get("top_logprobs")
    if not tops:
        raise Refusal(
            f"has no top_logprobs (teacher {teacher}): KD needs the teacher's log-probs; generate with "
            f"'distill generate --top-logprobs K' from a teacher that returns them (a local model, vLLM, "
            f"llama.cpp; deepseek-reasoner and other hosted reasoners give none), or train on these traces "
            f"with 'distill train --method sft'")
    k = max(len(t.get("top") or ()) for t in tops)
    if k < 1:
        raise Refusal(
            f"has top_logprobs with no alternatives (K = 0, teacher {teacher}): offline KD needs K >= 1; "
            f"regenerate with 'distill generate --top-logprobs K' (1 <= K <= 20)")
    return k


# ---------------------------------------------------------------- in the teacher's own tokens


END_OF_TURN, LOSSY_ID = 0, 1  # the ids :class:`TeacherStrings` starts with


class TeacherStrings:
    """An API teacher's vocabulary as far as its log-probs show it: each distinct token it printed, by its
    raw bytes, numbered in order of first sight; 0 is the end of its turn, 1 any token printed lossily (a
    fragment of a character without bytes: its bytes are unknown, so it maps to nothing). A cache of these
    ids (``store``: ``teacher_vocab: strings``) serves students of any tokenizer (``teachers.align``)."""

    def __init__(self, pieces: list[bytes | None] | None = None):
        self.pieces = pieces or [None, b""]
        self.ids = {p: i for i, p in enumerate(self.pieces) if p}

    @staticmethod
    def raw(alternative: dict) -> bytes | None:
        """The token's bytes; None for a fragment printed lossily."""
        if alternative.get("bytes") is not None:
            return bytes(alternative["bytes"])
        token = alternative["token"]
        if not token or "\ufffd" in token:
            return None
        try:
            return token.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: a fragment too
            return None

    def id(self, alternative: dict) -> int:
        raw = self.raw(alternative)
        if raw is None:
            return LOSSY_ID
        if raw not in self.ids:
            self.ids[raw] = len(self.pieces)
            self.pieces.append(raw)
        return self.ids[raw]


def teacher_string_rows(trace: dict, strings: TeacherStrings, top_k: int, universe: int,
                        counts: Counter) -> tuple[list[list[int]], list[list[float]], list[float], list[int]]:
    """(ids, log-probs, log tail, realised token) per token the teacher generated, in its own tokens
    (``strings``), and a last row for the end of its turn when it stopped (one-hot: it did stop there).

    Each row: the alternatives, most likely first, at most ``top_k``, with the sampled token always among
    them (in place of the k-th where it is not); lossy alternatives stay in the tail; padded with ids from
    the top of the ``universe`` (no token) at ``FLOOR``. Refuses bytes that are not UTF-8 text."""
    tops = trace["top_logprobs"]
    check_utf8(tops)
    rows: list[tuple[dict[int, float], int]] = []
    for entry in tops:
        sampled, kept = strings.id(entry), {}
        for alt in sorted(entry.get("top") or (), key=lambda a: -float(a["logprob"])):
            sid = sampled if _is_sampled(alt, entry) else strings.id(alt)
            if sid == LOSSY_ID and sid != sampled:
                counts["lossy_alternatives"] += 1
            elif sid not in kept and len(kept) < top_k:
                kept[sid] = float(alt["logprob"])
        if sampled not in kept:
            if len(kept) == top_k:
                kept.pop(next(reversed(kept)))
            kept[sampled] = float(entry["logprob"])
        rows.append((kept, sampled))
    if trace.get("finish_reason") == "stop":
        rows.append(({END_OF_TURN: 0.0}, END_OF_TURN))
    ids, logprobs, tails = [], [], []
    for kept, _ in rows:
        tail = 1.0 - math.fsum(math.exp(lp) for lp in kept.values())
        pad = [universe - 1 - j for j in range(top_k - len(kept))]
        ids.append(list(kept) + pad)
        logprobs.append(list(kept.values()) + [FLOOR] * len(pad))
        tails.append(math.log(tail) if tail > math.exp(FLOOR) else FLOOR)
    counts["api_rows"] += len(rows)
    return ids, logprobs, tails, [sampled for _, sampled in rows]


def _is_sampled(alternative: dict, entry: dict) -> bool:
    """The sampled token among the alternatives, even where both are printed lossily."""
    return (alternative["token"] == entry["token"] and alternative.get("bytes") == entry.get("bytes")
            and abs(float(alternative["logprob"]) - float(entry["logprob"])) < 1e-6)


def check_utf8(tops: list[dict]) -> None:
    """The sampled tokens' bytes must make UTF-8 text (unless some were printed lossily: bytes unknown)."""
    pieces = [TeacherStrings.raw(entry) for entry in tops]
    if any(p is None for p in pieces):
        return
    data = b"".join(pieces)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        ends = list(itertools.accumulate(len(p) for p in pieces))
        at = next(i for i, end in enumerate(ends) if end > e.start)
        raise Refusal(f"field 'top_logprobs': the teacher's sampled tokens are not UTF-8 text: generated token {at} "
                      f"({_shown(tops[at])!r}, bytes {data[e.start:e.end]!r}) does not decode, so its text cannot be "
                      f"lined up with a student's tokens") from None
