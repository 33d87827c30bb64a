"""Teacher and student of different tokenizers: which student tokens the teacher's tokens pin down.

KD compares two next-token distributions position by position. With one tokenizer the positions
and the ids are the same on both sides; with two, the same text is cut into other tokens. This
module finds, for every student target token, what the teacher says about it, once per example on
the CPU (pure Python and numpy), and :func:`project` turns the teacher's rows into rows over the
student's vocabulary on the training device (``kd_losses.AlignedTeacher``).

Alignment (as TRL's GOLD, ``trl/experimental/gold``: spans between byte offsets where both sides
have a token boundary). Each side's target tokens become their bytes (:class:`TokenText`: byte-level
BPE, sentencepiece pieces and byte fallback, added tokens as their text; both sides' end-of-turn
and EOS tokens become one shared marker, byte 0xFF, which UTF-8 text never holds), and the two byte
streams are matched: equal runs, and where they differ (the templates' seams: a think tag one side
writes in the prompt, sentencepiece's dummy-prefix spaces, a character only one side normalises)
the shortest skip after which they agree again. Each student target token is then

- ``one_to_one``: exactly one teacher token (same bytes, same boundaries);
- ``many_to_one``: exactly several whole teacher tokens (Qwen2 writes 1024 as four digits, Llama 3
  as "102" "4");
- ``one_to_many``: part of a teacher token, or across a teacher boundary (no exact mapping);
- ``unmapped``: bytes the teacher's text does not have (a seam).

The teacher's distribution over the student's vocabulary, where it maps exactly (the first two):
a vocabulary map, teacher id -> the student id of the same bytes (:func:`vocabulary_map`, once per
tokenizer pair), applied to the teacher's top-k at the first teacher token of the span; the realised
student token gets the chain rule over the teacher tokens it covers (log p(t1) + log p(t2 | t1) + ...,
GOLD's "merged probabilities", here only for the token that was written), and the first teacher
token keeps the rest of its mass, p(t1) - p(t1 t2 ...) (it starts other continuations too); teacher
tokens with no student twin go to the tail bucket. Exact: the probability of the text the student
token stands for, written as the teacher writes it (the realised token, by the chain rule). An
approximation: each alternative gets the teacher's probability of its twin as the teacher's next
token (the teacher's other ways to write those bytes, and continuations the student would write as
one longer token, are not counted; at k below the vocabulary, the rest is one bucket). With one
tokenizer on both sides every row is one-to-one and the map is the identity: today's loss.

Elsewhere (``one_to_many``) the universal logit distillation term (ULD, Boizard et al. 2024,
"Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"): the L1 distance
between the student's and the teacher's probabilities sorted in decreasing order, each over its
own vocabulary, at the teacher row of the teacher token that holds the student token's first byte.
Top-k of each side is enough: the ranks past k differ by at most both tails' mass. ``unmapped``
tokens (template seams: the think tags, spaces) get a one-hot teacher on the token itself, as
``api_mapping`` does for the tokens an API did not produce (KD at alpha 1 must still learn to open
and close its reasoning), or, for a student's own rollouts (on-policy), nothing: a one-hot teacher
there would only reinforce the sample.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from distill.errors import DistillError
from distill.teachers.api_mapping import FLOOR, token_bytes

END = b"\xff"  # both sides' end-of-turn and EOS; never a byte of UTF-8 text
WINDOW = 64    # bytes searched on either side to step over a seam
CONFIRM = 4    # bytes that must agree after a skip
ANCHOR = 32    # a longer seam: the next this many bytes of one side are looked for in the other
ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, UNMAPPED = 1, 2, 3, 0
KINDS = {ONE_TO_ONE: "one_to_one", MANY_TO_ONE: "many_to_one", ONE_TO_MANY: "one_to_many", UNMAPPED: "unmapped"}


# ---------------------------------------------------------------- tokens as bytes


class TokenText:
    """A vocabulary as the bytes of text each token stands for, and which tokens end a turn.

    ``ends``: the end-of-turn and EOS ids (written as ``END``; ``end_of_turn`` the one a turn ends
    with, what the other side's ends map to); ``control``: other special tokens;
    ``dummy_prefix``: the tokenizer puts a space before the first word of each text segment
    (sentencepiece's dummy prefix, Phi-3 and Llama 2), which is not in the text and is dropped.
    """

    def __init__(self, pieces: list[bytes], ends: set[int], control: set[int], name: str,
                 dummy_prefix: bool = False, end_of_turn: int | None = None):
        self.pieces, self.ends, self.control, self.name = pieces, ends, control, name
        self.dummy_prefix = dummy_prefix
        self.end_of_turn = end_of_turn if end_of_turn is not None else min(ends, default=-1)

    @classmethod
    def of(cls, tokenizer, name: str | None = None) -> "TokenText":
        """The tokenizer's tokens (made once per tokenizer object: 1-2 s for a 150k vocabulary)."""
        return _token_text(tokenizer, name or tokenizer.name_or_path)

    @classmethod
    def of_strings(cls, strings: list[bytes | None], name: str) -> "TokenText":
        """A vocabulary known only by its tokens' bytes (API log-probs); None is the end of the turn."""
        return cls([s if s is not None else END for s in strings], {i for i, s in enumerate(strings) if s is None},
                   set(), name)

    def stream(self, ids) -> tuple[bytes, np.ndarray]:
        """The tokens' bytes back to back, and where each token ends in them."""
        parts, special = [], self.ends | self.control
        follows_special = True  # a dummy prefix starts every text segment, the first one too
        for i in ids:
            i = int(i)
            if i in self.ends:
                piece = END
            else:
                piece = self.pieces[i] if 0 <= i < len(self.pieces) else b""
                if self.dummy_prefix and follows_special and piece.startswith(b" "):
                    piece = piece[1:]
            parts.append(piece)
            follows_special = i in special
        return b"".join(parts), np.cumsum([len(p) for p in parts], dtype=np.int64)

    def text(self, ids) -> str:
        """What a tokenizer's ``decode`` would give, without the end markers (invalid bytes replaced)."""
        data, _ = self.stream([i for i in ids if int(i) not in self.ends])
        return data.decode("utf-8", "replace")


@functools.lru_cache(maxsize=8)
def _token_text(tokenizer, name: str) -> TokenText:
    from distill.rendering import end_of_turn_id

    eot = end_of_turn_id(tokenizer) if tokenizer.chat_template else tokenizer.eos_token_id
    ends = {tokenizer.eos_token_id, eot} - {None}
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
    pieces = token_bytes(tokenizer)
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    dummy_prefix = bool(probe) and pieces[probe[0]] == b" a"
    return TokenText(pieces, ends, special - ends, name, dummy_prefix, eot)


def vocabulary_map(teacher: TokenText, student: TokenText, rows: int | None = None) -> np.ndarray:
    """Teacher id -> the student id with the same bytes, or -1, over ``rows`` teacher ids (its output
    rows, which may exceed its tokenizer). One-to-one: where several ids share bytes only the first
    ordinary one maps (sentencepiece's byte-fallback twins of single characters; the others' mass
    goes to the tail). End of turn maps to end of turn, EOS to EOS (where either side has both),
    other control tokens to the student's control token of the same text (``<|im_start|>`` in two
    ChatML families) or none.
    Made once per tokenizer pair."""
    known = _vocabulary_map(teacher, student)
    rows = len(known) if rows is None else rows
    return np.concatenate([known, np.full(rows - len(known), -1, dtype=np.int64)]) if rows > len(known) \
        else known[:rows]


@functools.lru_cache(maxsize=8)
def _vocabulary_map(teacher: TokenText, student: TokenText) -> np.ndarray:
    out = np.full(len(teacher.pieces), -1, dtype=np.int64)
    for control in (False, True):  # ordinary tokens by their bytes, control tokens by their text
        student_ids = _first_ids(student, control)
        for piece, i in _first_ids(teacher, control).items():
            out[i] = student_ids.get(piece, -1)
    if teacher.ends:
        out[teacher.end_of_turn] = student.end_of_turn
    for i in teacher.ends - {teacher.end_of_turn}:  # EOS where a template ends turns otherwise
        out[i] = next(iter(student.ends - {student.end_of_turn}), -1)
    return out


def _first_ids(text: TokenText, control: bool) -> dict[bytes, int]:
    """bytes -> the first ordinary (or control) id that stands for them; the end tokens map apart."""
    ids: dict[bytes, int] = {}
    for i, piece in enumerate(text.pieces):
        if piece and (i in text.control) == control and i not in text.ends:
            ids.setdefault(piece, i)
    return ids


# ---------------------------------------------------------------- the alignment


@dataclass
class Alignment:
    """Per student target token: its kind, the teacher row whose distribution is at its first byte
    (``first``, -1: none) and, for the exact kinds, the end of the teacher rows it covers (``end``);
    ``matched`` of the student's ``total`` target bytes were found in the teacher's text."""

    kind: np.ndarray
    first: np.ndarray
    end: np.ndarray
    matched: int
    total: int

    @property
    def teacher_rows(self) -> int:
        """The teacher rows this alignment uses (a teacher sequence can be cut after them)."""
        return int(max(self.end.max(initial=0), self.first.max(initial=-1) + 1))

    def counts(self) -> Counter:
        kinds = Counter(self.kind.tolist())
        return Counter({name: kinds.get(k, 0) for k, name in KINDS.items()} | {"matched_bytes": self.matched,
                                                                              "bytes": self.total})


def align(student_ids, teacher_ids, student: TokenText, teacher: TokenText) -> Alignment:
    """Align two tokenizations of (nearly) the same text: the student's and the teacher's target tokens."""
    s_bytes, s_ends = student.stream(student_ids)
    t_bytes, t_ends = teacher.stream(teacher_ids)
    runs = np.array(_matched_runs(s_bytes, t_bytes), dtype=np.int64).reshape(-1, 3)  # (start, its twin, length)
    s_starts, t_starts = s_ends - _lengths(s_ends), t_ends - _lengths(t_ends)
    # the matched run each student token starts in, and whether the whole token lies in it
    r = np.searchsorted(runs[:, 0], s_starts, "right") - 1
    run = runs[r.clip(min=0)]
    inside = (r >= 0) & (s_ends > s_starts) & (s_ends <= run[:, 0] + run[:, 2])
    a = s_starts - run[:, 0] + run[:, 1]  # the token's bytes in the teacher's text: [a, b)
    b = a + s_ends - s_starts
    j0 = np.searchsorted(t_starts, a, "left")  # the first teacher token starting at a, if one does
    j1 = np.searchsorted(t_starts, b, "left") - 1  # the last teacher token starting before b
    n_t = len(t_starts)
    exact = (inside & (j0 < n_t) & (j1 >= j0) & (t_starts[j0.clip(max=n_t - 1)] == a)
             & (t_ends[j1.clip(0, n_t - 1)] == b)) if n_t else np.zeros_like(inside)
    kind = np.where(exact, np.where(j1 == j0, ONE_TO_ONE, MANY_TO_ONE), np.where(inside, ONE_TO_MANY, UNMAPPED))
    holding = np.searchsorted(t_starts, a, "right") - 1  # the teacher token that holds byte a
    first = np.where(exact, j0, np.where(inside, holding, -1))
    return Alignment(kind.astype(np.int8), first.astype(np.int32), np.where(exact, j1 + 1, 0).astype(np.int32),
                     int(runs[:, 2].sum()), len(s_bytes))


def _lengths(ends: np.ndarray) -> np.ndarray:
    return np.diff(ends, prepend=0)


def _matched_runs(a: bytes, b: bytes) -> list[tuple[int, int, int]]:
    """(start in a, start in b, length) of the runs where the two byte strings agree, in order."""
    runs, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        n = _common_prefix(a, b, i, j)
        if n:
            runs.append((i, j, n))
            i, j = i + n, j + n
            continue
        step = _resync(a, b, i, j)
        if step is None:
            break
        i, j = step
    return runs


def _common_prefix(a: bytes, b: bytes, i: int, j: int) -> int:
    """Length of the longest common prefix of a[i:] and b[j:] (slices compared in C, galloping)."""
    limit = min(len(a) - i, len(b) - j)
    lo, step = 0, 64
    while lo < limit:  # a[i:i+lo] == b[j:j+lo]; grow until a block differs
        hi = min(lo + step, limit)
        if a[i + lo:i + hi] != b[j + lo:j + hi]:
            while hi - lo > 1:  # the first difference lies in [lo, hi)
                mid = (lo + hi) // 2
                if a[i + lo:i + mid] == b[j + lo:j + mid]:
                    lo = mid
                else:
                    hi = mid
            return lo
        lo, step = hi, step * 2
    return limit


def _resync(a: bytes, b: bytes, i: int, j: int) -> tuple[int, int] | None:
    """Where the two streams agree again after a difference at (i, j): the fewest skipped bytes within
    ``WINDOW`` (at least ``CONFIRM`` bytes agreeing, or both ends), else the nearer of the next
    ``ANCHOR`` bytes of one side found in the other; None when neither is found."""
    for d in range(1, 2 * WINDOW + 1):
        for di in range(max(0, d - WINDOW), min(d, WINDOW) + 1):
            i1, j1 = i + di, j + d - di
            if i1 > len(a) or j1 > len(b):
                continue
            n = min(CONFIRM, len(a) - i1, len(b) - j1)
            if (n == CONFIRM or (i1 == len(a) and j1 == len(b))) and a[i1:i1 + n] == b[j1:j1 + n]:
                return i1, j1
    found = []
    if (at := b.find(a[i:i + ANCHOR], j)) >= 0 and len(a) - i >= ANCHOR:
        found.append((at - j, i, at))
    if (at := a.find(b[j:j + ANCHOR], i)) >= 0 and len(b) - j >= ANCHOR:
        found.append((at - i, at, j))
    return min(found)[1:] if found else None


def describe(counts: Counter) -> str:
    """One line for the log: how the student's target tokens were taught."""
    tokens = sum(counts.get(name, 0) for name in KINDS.values())
    if not tokens:
        return "cross-tokenizer KD: no student tokens aligned yet"
    share = {name: 100.0 * counts.get(name, 0) / tokens for name in KINDS.values()}
    return (f"cross-tokenizer KD: {tokens:,} student tokens: {share['one_to_one']:.1f}% one-to-one and "
            f"{share['many_to_one']:.1f}% many-to-one (exact: the teacher's tokens mapped, the chain rule over "
            f"those a student token covers), {share['one_to_many']:.1f}% one-to-many (ULD), "
            f"{share['unmapped']:.1f}% unmapped (template seams); "
            f"{100.0 * counts.get('matched_bytes', 0) / max(counts.get('bytes', 0), 1):.1f}% of the text's bytes "
            f"found in the teacher's")


# ---------------------------------------------------------------- the teacher's rows onto the student's


@dataclass
class TeacherRows:
    """The teacher at its own target positions, over its own vocabulary: the top-k ids and log-probs
    (at the loss temperature) with the realised token always among them, the log of the rest, and the
    realised token (the teacher's next token in the text) per row. Any source (a local model, the
    logits store, a server, an API's top_logprobs) gives this; :func:`project` takes it from there."""

    ids: "torch.Tensor"
    logprobs: "torch.Tensor"
    log_tail: "torch.Tensor"
    realized: "torch.Tensor"


def top_k_rows(logp, k: int, realized) -> tuple:
    """From full log-probs (rows, V), which it overwrites: the top k with the ``realized`` token of each
    row put in place of the k-th where it is not among them, and the exact log of the rest (ids,
    log-probs, log tail; the rest summed from its own entries, not as 1 minus the top's mass)."""
    import torch

    top = logp.topk(k, dim=-1)
    ids, values = top.indices, top.values
    missing = (ids != realized[:, None]).all(-1)
    ids[:, -1] = torch.where(missing, realized, ids[:, -1])
    values[:, -1] = torch.where(missing, logp.gather(1, realized[:, None])[:, 0], values[:, -1])
    return ids, values, torch.logsumexp(logp.scatter_(1, ids, -torch.inf), dim=-1)  # in place: a chunk less


def with_realized(ids, logprobs, log_tail, realized, realized_logprob) -> TeacherRows:
    """Rows (top k, most likely first) that may lack the realised token: it replaces the k-th entry,
    whose mass goes to the tail (a server's top-k plus the actual token's log-prob, which it gives apart;
    where it did not say, NaN, at ``FLOOR``)."""
    import torch

    ids, logprobs, realized = ids.clone(), logprobs.clone().float(), realized.long()
    realized_logprob = torch.nan_to_num(realized_logprob.float(), nan=FLOOR)
    missing = (ids != realized[:, None]).all(-1)
    dropped = logprobs[:, -1]
    tail = log_tail.double().exp() - realized_logprob.double().exp() + dropped.double().exp()
    log_tail = torch.where(missing, tail.clamp(min=0).log().clamp(min=FLOOR).float(), log_tail.float())
    ids[:, -1] = torch.where(missing, realized, ids[:, -1])
    logprobs[:, -1] = torch.where(missing, realized_logprob.float(), dropped)
    return TeacherRows(ids.long(), logprobs, log_tail, realized)


@dataclass
class Plan:
    """The alignments of a batch's sequences, joined: per student target row (batch order) its kind,
    the teacher rows (``first``, ``end``: indices into the batch's :class:`TeacherRows`) and its
    token; per teacher row the student row whose realised token it helps make (``owner``, -1: none).
    ``one_hot``: unmapped rows get a one-hot teacher (off-policy), else no KD term."""

    kind: np.ndarray
    first: np.ndarray
    end: np.ndarray
    targets: np.ndarray
    owner: np.ndarray
    one_hot: bool = True

    @classmethod
    def join(cls, parts: list[tuple[Alignment, list[int], int]], one_hot: bool = True, index=None) -> "Plan":
        """``parts``: per sequence (its alignment, its student target ids, its teacher rows in the batch);
        ``index``: the batch's target positions, checked to be as many as the student rows."""
        if index is not None and sum(len(targets) for _, targets, _ in parts) != index.numel():
            raise DistillError(f"the teacher side has {sum(len(t) for _, t, _ in parts)} student target tokens where "
                               f"the batch has {index.numel()}; the examples were rendered otherwise than this batch")
        kinds, firsts, ends, owners, offset, rows = [], [], [], [], 0, 0
        for alignment, _, n_teacher in parts:
            exact = (alignment.kind == ONE_TO_ONE) | (alignment.kind == MANY_TO_ONE)
            owner = np.full(n_teacher, -1, dtype=np.int64)
            spans = np.flatnonzero(exact)
            lengths = alignment.end[spans] - alignment.first[spans]
            covered = np.repeat(alignment.first[spans], lengths) + _ranges(lengths)
            owner[covered] = np.repeat(spans, lengths) + rows
            kinds.append(alignment.kind)
            firsts.append(np.where(alignment.first >= 0, alignment.first + offset, -1))
            ends.append(alignment.end + offset)
            owners.append(owner)
            offset, rows = offset + n_teacher, rows + len(alignment.kind)
        targets = np.concatenate([np.asarray(targets, dtype=np.int64) for _, targets, _ in parts])
        return cls(np.concatenate(kinds), np.concatenate(firsts), np.concatenate(ends), targets,
                   np.concatenate(owners), one_hot)


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in ``lengths``, back to back."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def project(rows: TeacherRows, plan: Plan, vocab_map, student_vocab: int, temperature: float = 1.0):
    """The teacher's rows as ``kd_losses.AlignedTeacher`` rows at the student's target positions, on
    the rows' device, without a host sync (the module doc says what each kind of row gets).

    ``vocab_map``: :func:`vocabulary_map` as a tensor on that device; ``temperature``: the rows'. An
    exact row is the mapped top-k of its span's first teacher row, where the first teacher token's
    slot keeps p(t1) - p(chain) and the realised student token gets p(chain) (a 1:1 row whose token
    maps to itself stays as it is), in an extra slot when it is not among them; unmapped entries join
    the tail, floored at ``FLOOR`` when the student has tokens outside the row (reverse KL needs a
    tail that is not empty).
    """
    import torch

    from distill.kd_losses import PAD, AlignedTeacher

    device = rows.ids.device
    kind, first, end, target = (torch.as_tensor(x).to(device, non_blocking=True)
                                for x in (plan.kind, plan.first, plan.end, plan.targets))
    first, end = first.long(), end.long()
    with torch.no_grad():
        logprobs = rows.logprobs.float()
        realized_lp = logprobs.masked_fill(rows.ids != rows.realized[:, None], -torch.inf).amax(-1)
        owner = torch.as_tensor(plan.owner).to(device, non_blocking=True)
        n = len(kind)
        chain = torch.zeros(n + 1, device=device).index_add_(0, owner.where(owner >= 0, n), realized_lp)[:n]
        f = first.clamp(min=0)
        t1 = rows.realized[f]
        mapped = vocab_map[rows.ids[f]]
        mapped = mapped.where(mapped < student_vocab, -1)  # a tokenizer's ids past the student's output rows
        lp = logprobs[f]
        exact = (kind == ONE_TO_ONE) | (kind == MANY_TO_ONE)
        extra = exact & ((end - first > 1) | (vocab_map[t1] != target))
        p1 = realized_lp[f]
        rest = (p1 + torch.log1p(-torch.exp((chain - p1).clamp(max=0)))).clamp(min=FLOOR)
        lp = torch.where((rows.ids[f] == t1[:, None]) & extra[:, None], rest[:, None], lp)
        unmapped = mapped < 0
        tail = torch.logsumexp(torch.cat([rows.log_tail[f].float()[:, None], lp.masked_fill(~unmapped, -torch.inf)],
                                         dim=1), dim=1)
        hit = (mapped == target[:, None]) & ~unmapped & extra[:, None]
        lp = torch.where(hit, torch.logaddexp(lp, chain[:, None]), lp)
        add = extra & ~hit.any(1)
        pad = torch.cat([unmapped, ~add[:, None]], dim=1)
        ids = torch.where(pad, target[:, None], torch.cat([mapped, target[:, None]], dim=1))
        lps = torch.cat([lp, chain[:, None]], dim=1).masked_fill(pad, PAD)
        if ids.shape[1] < student_vocab:
            tail = tail.clamp(min=FLOOR)
        # rows without an exact mapping: a one-hot teacher on their own token (used where ``plan.one_hot``)
        one_hot = torch.full_like(lps, PAD)
        one_hot[:, 0] = 0.0
        lps = torch.where(exact[:, None], lps, one_hot)
        ids = torch.where(exact[:, None], ids, target[:, None])
        tail = torch.where(exact, tail, FLOOR)
        taught = exact | ((kind == UNMAPPED) & plan.one_hot)
        uld_rows = torch.from_numpy(np.flatnonzero(plan.kind == ONE_TO_MANY))
        # ULD compares ranks: the student has no more of them than its vocabulary
        uld_probs = logprobs[first[uld_rows.to(device)]].exp().sort(dim=-1, descending=True).values[:, :student_vocab]
        return AlignedTeacher(ids, lps, tail, taught, uld_rows, uld_probs, temperature, nll=-realized_lp.sum())


# ---------------------------------------------------------------- a batch's teacher side


@dataclass
class TeacherSequence:
    """The teacher's tokens for one student sequence: ``ids`` (cut after the last row needed), the
    ``positions`` whose rows the alignment uses (position t predicts ids[t + 1]), the student's target
    ids and the alignment between the two (numpy arrays: a dataset's worth of them stays small)."""

    ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    alignment: Alignment

    @property
    def realized(self) -> np.ndarray:
        return self.ids[self.positions + 1]


class TeacherSide:
    """The teacher's side of a student's batches: per sequence, the teacher's own tokens for the same
    text and the alignment back to the student's target tokens.

    Off-policy each example is aligned once, here, from ``teacher_input_ids`` / ``teacher_labels``
    (``rendering.load_examples(..., teacher_tokenizer=...)``; a prompt-only example, as on-policy
    ``--prompts`` makes, has all its labels -100); a batch finds its sequences by ``example_index``.
    A student's rollout (no ``example_index``) is aligned when it comes (:meth:`rollout`), its prompt
    found among the examples' by its tokens. ``counts`` adds up the kinds of student tokens taught,
    for the log and the run record (:func:`describe`).
    """

    def __init__(self, examples: list[dict], student_tokenizer, teacher_tokenizer, student_name: str,
                 teacher_name: str):
        from distill.rendering import target_mask, target_tokens
        from distill.store import token_sha

        self.student = TokenText.of(student_tokenizer, student_name)
        self.teacher = TokenText.of(teacher_tokenizer, teacher_name)
        self.teacher_tokenizer = teacher_tokenizer
        self.counts: Counter = Counter()
        self.by_example: dict[int, TeacherSequence] = {}
        self.prompts: dict[str, np.ndarray] = {}  # the student's prompt (its sha) -> the teacher's, for rollouts
        for ex in examples:
            if "teacher_input_ids" not in ex:
                raise DistillError(f"example {ex.get('id', ex['example_index'])} has no teacher tokens: render the "
                                   "examples with rendering.load_examples(..., teacher_tokenizer=...)")
            ids, labels = np.asarray(ex["teacher_input_ids"], dtype=np.int32), ex["teacher_labels"]
            positions = np.flatnonzero(target_mask(labels)).astype(np.int32)
            sequence = self._sequence(ids, positions, np.asarray(target_tokens(ex), dtype=np.int32))
            self.by_example[ex["example_index"]] = sequence
            self.counts += sequence.alignment.counts()
            self.prompts[token_sha(_prompt(ex["input_ids"], ex["labels"]))] = _prompt(ids, labels)

    def _sequence(self, ids: np.ndarray, positions: np.ndarray, targets: np.ndarray) -> TeacherSequence:
        alignment = align(targets, ids[positions + 1], self.student, self.teacher)
        positions = positions[:alignment.teacher_rows]
        return TeacherSequence(ids[:positions[-1] + 2] if len(positions) else ids, positions, targets, alignment)

    def sequences(self, inputs: dict, mask, example_index) -> list[TeacherSequence]:
        """The batch's sequences in batch order: by ``example_index``, else as the student's rollouts."""
        from distill.batching import batch_sequences

        if example_index is not None:
            return [self.by_example[int(i)] for i in example_index.tolist()]
        batch = batch_sequences({k: v.cpu() if hasattr(v, "cpu") else v for k, v in inputs.items()}, mask.cpu())
        return [self.rollout(ids, positions) for ids, positions in batch]

    def rollout(self, ids: list[int], positions: list[int]) -> TeacherSequence:
        """A student's rollout (its prompt, then the tokens it sampled at ``positions`` + 1) as the teacher
        reads it: the teacher's prompt for the same conversation, the sampled text (its invalid UTF-8, if
        any, replaced) in the teacher's tokens, and its end of turn where the student ended its turn."""
        from distill.store import token_sha

        prompt, completion = ids[:positions[0] + 1], [ids[t + 1] for t in positions]
        teacher_prompt = self.prompts.get(token_sha(prompt))
        if teacher_prompt is None:
            raise DistillError("a rollout's prompt is not among the prompts the teacher side was built from")
        text = self.teacher_tokenizer(self.student.text(completion), add_special_tokens=False)["input_ids"]
        ended = completion[-1] in self.student.ends
        end = [self.teacher.end_of_turn] if ended else []
        teacher_ids = np.concatenate([teacher_prompt, text, end]).astype(np.int32)
        positions = np.arange(len(teacher_prompt) - 1, len(teacher_ids) - 1, dtype=np.int32)
        sequence = self._sequence(teacher_ids, positions, np.asarray(completion, dtype=np.int32))
        self.counts += sequence.alignment.counts()
        return sequence

    @staticmethod
    def plan(sequences: list[TeacherSequence], one_hot: bool, index=None) -> Plan:
        return Plan.join([(s.alignment, s.targets, len(s.positions)) for s in sequences], one_hot, index)


def _prompt(ids, labels) -> np.ndarray:
    """The tokens before the first trained one (all of them when none is)."""
    from distill.rendering import target_mask

    targets = target_mask(list(labels))
    return np.asarray(ids[:targets.index(True) + 1] if any(targets) else ids, dtype=np.int32)
