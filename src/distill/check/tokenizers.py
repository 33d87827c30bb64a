"""Teacher and student tokenizers: the same, the same family with other row counts, or different.

Logit KD compares distributions token by token: with one tokenizer on both sides exactly; with two,
distill aligns the two tokenizations of the same text (``teachers.align``: exact where a student
token is whole teacher tokens, ULD elsewhere), which needs the teacher's chat template. SFT trains on
the traces' text and takes any teacher.
Two models of one tokenizer may still differ in output rows: Qwen2.5 pads its embedding to 151,936
rows up to 3B and to 152,064 from 7B on, which breaks trainers that compare whole rows (TRL
#2215, #3028; TRL now refuses it at start, TRL #6252). distill cuts both sides to the shared rows
(``kd_losses.DenseTeacher``, ``OnlineTeacher``), which is right only while every token id of the
tokenizer lies below them.
"""

from __future__ import annotations

from distill.check.verdicts import Verdict, error, ok, warning
from distill.store import tokenizer_sha

CHECK = "tokenizers"
#: Two vocabularies are one family when this share of the smaller one's tokens have the same id in both
#: (DeepSeek-R1-Distill-Qwen renames a few of Qwen2.5's special tokens; other families share almost none).
FAMILY = 0.99


def _family_share(a: dict[str, int], b: dict[str, int]) -> float:
    small, large = sorted((a, b), key=len)
    return sum(large.get(token) == i for token, i in small.items()) / max(1, len(small))


def _first_difference(a: dict[str, int], b: dict[str, int]) -> str:
    """The lowest id whose token differs between the two vocabularies, for the message."""
    by_id_a, by_id_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
    for i in sorted(set(by_id_a) | set(by_id_b)):
        if by_id_a.get(i) != by_id_b.get(i):
            return f"id {i} is {by_id_a.get(i)!r} for the student, {by_id_b.get(i)!r} for the teacher"
    return "the same ids, other settings"


def check_tokenizers(student_tok, teacher_tok, *, student: str, teacher: str, student_rows: int | None,
                     teacher_rows: int | None, logit_kd: bool) -> list[Verdict]:
    """Which distillation paths this pair allows; ``logit_kd``: the run distills logits (KD, on-policy)."""
    if tokenizer_sha(student_tok) == tokenizer_sha(teacher_tok):
        return [_rows(len(student_tok), student_rows, teacher_rows, student, teacher, logit_kd)]
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    share = _family_share(a, b)
    if share >= FAMILY:
        what = (f"student '{student}' ({len(a):,} tokens) and teacher '{teacher}' ({len(b):,}) are one tokenizer "
                f"family with different tokens ({_first_difference(a, b)})")
    else:
        what = (f"student '{student}' ({type(student_tok).__name__}, {len(a):,} tokens) and teacher '{teacher}' "
                f"({type(teacher_tok).__name__}, {len(b):,}) use different tokenizers ({share:.0%} of ids agree)")
    if logit_kd and not teacher_tok.chat_template:
        return [error(CHECK, f"{what}, and the teacher's has no chat template: logit KD across tokenizers renders "
                             f"each conversation in the teacher's own template",
                      "use the teacher's -Instruct model (or add a chat template to its tokenizer), or --method sft")]
    if logit_kd:
        return [ok(CHECK, f"{what}: logit KD runs aligned across the two (exact where a student token is whole "
                          f"teacher tokens, ULD elsewhere; README 'Teacher and student with different tokenizers')")]
    return [ok(CHECK, f"{what}: SFT on the teacher's traces applies (logit KD would align the two)")]


def _rows(tokens: int, student_rows: int | None, teacher_rows: int | None, student: str, teacher: str,
          logit_kd: bool) -> Verdict:
    same = f"student '{student}' and teacher '{teacher}' share one tokenizer ({tokens:,} tokens)"
    if student_rows is None or teacher_rows is None or student_rows == teacher_rows:
        rows = f", {student_rows:,} output rows each" if student_rows and student_rows == teacher_rows else ""
        return ok(CHECK, f"{same}{rows}: SFT and logit KD (online, offline, served, on-policy) all apply")
    shared = min(student_rows, teacher_rows)
    rows = f"but their output rows differ (student {student_rows:,}, teacher {teacher_rows:,})"
    if tokens > shared:
        return error(CHECK, f"{same} {rows}: token ids up to {tokens - 1:,} lie past the smaller model's "
                            f"{shared:,} rows, which cannot score them",
                     "use a student and teacher whose output rows cover the whole tokenizer")
    if not logit_kd:
        return ok(CHECK, f"{same} {rows}: SFT does not compare rows; logit KD would use the first {shared:,}")
    return warning(CHECK, f"{same} {rows}, padding rows that no token uses: distill's KD compares the first "
                          f"{shared:,} of each; trainers that compare whole rows fail here (TRL #2215, #3028)",
                   f"nothing to do in distill; elsewhere cut the teacher's logits to [..., :{shared}]")
