"""The traces rendered with the student's chat template, exactly as training will render them.

``rendering.tokenize_example`` labels the assistant's tokens through the end-of-turn token. Three
things go wrong there without an error: a template that strips the reasoning from assistant turns
(DeepSeek-R1-Distill's keeps only what follows ``</think>``, which open-r1 overrides; issue #38
cites ms-swift's think_model.sh and OPSD #18 too), so the student learns answers without reasoning;
sequences over ``max_length``, dropped (fewer, shorter examples) or truncated (their end-of-turn
cut off, so the student is taught not to stop); and a template whose turns end in no token of
their own. This reports each, with counts, from the first ``sample`` traces.
"""

from __future__ import annotations

from distill.check.verdicts import Verdict, error, ok, warning
from distill.errors import DistillError
from distill.records import REQUIRED, iter_jsonl
from distill.rendering import IGNORE_INDEX, end_of_turn_id, render_messages, template_ends_turn, tokenize_example

#: Truncating more than this share of the traces is an error: too many examples that never end their turn.
TRUNCATE_LIMIT = 0.05
#: Words of a trace's reasoning looked for in its rendered target.
PROBE_WORDS = 8


def _words(text: str) -> str:
    return " ".join(text.split())


def check_rendering(tokenizer, traces: str, *, think_style: str, max_length: int, overlong: str,
                    sample: int | None = None) -> list[Verdict]:
    """Render the traces (``correct: false`` skipped, as training does) and report template, think tags, length."""
    try:
        eot = end_of_turn_id(tokenizer)
    except DistillError as e:
        return [error("template", str(e),
                      "use a chat template that renders the assistant turn (the -Instruct model's)")]
    lengths, dropped_reasoning, with_reasoning, without_eot, sampled = [], [], 0, 0, False
    try:
        for index, trace in enumerate(iter_jsonl(traces, required=REQUIRED)):
            if sample is not None and index >= sample:
                sampled = True
                break
            if trace.get("correct") is False:
                continue
            try:
                messages = render_messages(trace, think_style)
            except (KeyError, TypeError, AttributeError) as e:
                return [error("traces", f"{traces}:{index + 1}: field 'messages' is not a prompt or a list of "
                                        f"{{role, content}} messages ({type(e).__name__}: {e})",
                              "fix the trace (distill generate and import write valid ones)")]
            try:
                example = tokenize_example(messages, tokenizer)
            except DistillError as e:
                return [error("template", f"{traces}:{index + 1}: {e}",
                              "use a chat template whose generation prompt is a prefix of the rendered conversation "
                              "(one that adds '<think>' to the generation prompt is not)")]
            targets = [t for t in example["labels"] if t != IGNORE_INDEX]
            without_eot += targets[-1:] != [eot]
            lengths.append(len(example["input_ids"]))
            reasoning = (trace.get("reasoning") or "").strip()
            if think_style == "think" and reasoning:
                with_reasoning += 1
                text = _words(tokenizer.decode(targets))
                if "<think>" not in text or "</think>" not in text or _words(
                        " ".join(reasoning.split()[:PROBE_WORDS])) not in text:
                    dropped_reasoning.append(index + 1)
    except DistillError as e:
        return [error("traces", str(e), "fix the traces file (distill verify writes valid ones)")]
    if not lengths:
        return [error("traces", f"{traces}: no trace to train on (all missing or marked correct: false)",
                      "run distill verify with --keep all, or check the file")]
    read = f"{len(lengths):,} traces" + (" (the file's first)" if sampled else "")
    return [_template(tokenizer, eot, read, without_eot),
            *_think(think_style, with_reasoning, dropped_reasoning, traces),
            _length(lengths, max_length, overlong, read)]


def token_name(tokenizer, token_id: int) -> str:
    return f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})"


def _template(tokenizer, eot: int, read: str, without_eot: int) -> Verdict:
    if without_eot:  # tokenize_example labels the end-of-turn token itself: this is a template it misreads
        return error("template", f"{without_eot} of {read} do not end their target in {token_name(tokenizer, eot)}",
                     "report it: rendering.tokenize_example should label the end-of-turn token")
    how = ("which the template writes" if template_ends_turn(tokenizer)
           else "which distill appends: the template writes no end-of-turn token of its own")
    stop = "" if eot == tokenizer.eos_token_id else (
        f"; EOS is {token_name(tokenizer, tokenizer.eos_token_id)}, and distill adds the end-of-turn token to the "
        f"saved model's stop tokens")
    return ok("template", f"{read} rendered; every assistant target ends in {token_name(tokenizer, eot)}, {how}{stop}")


def _think(think_style: str, with_reasoning: int, dropped: list[int], traces: str) -> list[Verdict]:
    if think_style != "think":
        return [ok("think", f"think style '{think_style}': only answers are trained, the traces' reasoning is not")]
    if not with_reasoning:
        return [ok("think", "no trace carries reasoning: answers only")]
    if dropped:
        return [error("think", f"the chat template drops the reasoning (<think>...</think>) from {len(dropped):,} of "
                               f"{with_reasoning:,} assistant turns (first: {traces}:{dropped[0]}): the student would "
                               f"learn answers without their reasoning",
                      "use a template that keeps the assistant's content whole (DeepSeek-R1-Distill's keeps only "
                      "what follows </think>: override it, as open-r1 does), or --think-style none on purpose")]
    return [ok("think", f"<think>...</think> and the reasoning are kept in all {with_reasoning:,} turns that have one")]


def _length(lengths: list[int], max_length: int, overlong: str, read: str) -> Verdict:
    over = sum(n > max_length for n in lengths)
    longest = max(lengths)
    p95 = sorted(lengths)[int(0.95 * (len(lengths) - 1))]
    if not over:
        return ok("length", f"all {read} fit in --max-length {max_length:,} (longest {longest:,} tokens)")
    share = over / len(lengths)
    counted = f"{over:,} of {read} ({share:.0%}) are longer than --max-length {max_length:,} (longest {longest:,})"
    fix = f"--max-length {longest:,} keeps them all ({p95:,} keeps 95%)"
    if overlong == "drop":
        if over == len(lengths):
            return error("length", f"{counted}: all would be dropped and training refuses to start", fix)
        return warning("length", f"{counted}: they will be dropped, so training loses {share:.0%} of its examples, "
                                 f"the longest ones (often the hardest problems)", fix)
    cut = (f"{counted}: they will be truncated, their end-of-turn and answer cut off, which teaches the student "
           f"not to stop")
    if share > TRUNCATE_LIMIT:
        return error("length", cut, f"{fix}, or --overlong drop")
    return warning("length", cut, f"{fix}, or --overlong drop")
