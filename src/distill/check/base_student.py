"""A Base student sent on-policy before it has learned to end a turn: the runaway-length failure.

On-policy distillation trains on the student's own rollouts. A Base model never learned the chat
template's end-of-turn token (Qwen3-8B-Base stops on ``<|endoftext|>``, its Instruct teacher ends
turns with ``<|im_end|>``), so its rollouts run to the token limit, the teacher grades endless text,
and lengths explode (ms-swift #9526, on its own Base-student example). Thinking Machines and Qwen3
run SFT on the teacher's traces first; so does ``configs/opd-qwen2.5-7b-to-1.5b.yaml``.

A student looks Base when its tokenizer has no chat template, when the template writes no
end-of-turn token of its own, or when its generation config does not stop on that token.
"""

from __future__ import annotations

from distill.check.templates import token_name
from distill.check.verdicts import Verdict, error, ok, warning
from distill.rendering import end_of_turn_id, template_ends_turn

CHECK = "base-student"


def base_signs(tokenizer, stop_ids: list[int] | None) -> list[str]:
    """Why the student looks like a Base model (empty: it ends its turns as an Instruct model does)."""
    eot = end_of_turn_id(tokenizer)
    signs = []
    if not template_ends_turn(tokenizer):
        signs.append(f"its chat template writes no end-of-turn token (distill appends EOS "
                     f"{token_name(tokenizer, eot)})")
    if stop_ids is not None and eot not in stop_ids:
        stops = ", ".join(token_name(tokenizer, i) for i in stop_ids) or "nothing"
        signs.append(f"its generation config stops on {stops}, not on the template's end-of-turn "
                     f"{token_name(tokenizer, eot)}: it was not trained to end a turn")
    return signs


def check_base_student(tokenizer, *, student: str, stop_ids: list[int] | None, on_policy: float,
                       sft_before: bool, teacher_tokenizer=None) -> list[Verdict]:
    """``stop_ids``: the student's generation-config EOS ids (None: unknown); ``sft_before``: the recipe
    trains it on traces (SFT or off-policy KD) before the on-policy step."""
    if not tokenizer.chat_template:
        return [error(CHECK, f"student '{student}' has no chat template (a Base model's tokenizer): training "
                             f"refuses it and it would not know where a turn ends",
                      "give it the teacher's chat template (chat_template in its tokenizer_config.json), then SFT "
                      "on the teacher's traces before any on-policy step")]
    signs = base_signs(tokenizer, stop_ids)
    eot = token_name(tokenizer, end_of_turn_id(tokenizer))
    if not signs:
        return [ok(CHECK, f"student '{student}' ends its turns with {eot}, as its template and generation config "
                          f"agree: an Instruct-style student")]
    why = "; ".join(signs)
    if on_policy > 0 and not sft_before:
        teacher = ""
        if teacher_tokenizer is not None and teacher_tokenizer.chat_template:
            teacher_eot = end_of_turn_id(teacher_tokenizer)
            teacher = f" (the teacher ends its turns with {token_name(teacher_tokenizer, teacher_eot)})"
        return [warning(CHECK, f"Base-style student '{student}': {why}{teacher}. Sent on-policy with no SFT step "
                               f"first, its rollouts will not end their turn and run to --max-tokens: the "
                               f"runaway-length failure (ms-swift #9526)",
                        "train it on the teacher's traces first (SFT or off-policy KD) and start on-policy from that "
                        "checkpoint, as Thinking Machines and Qwen3 do (configs/opd-qwen2.5-7b-to-1.5b.yaml)")]
    return [ok(CHECK, f"Base-style student '{student}' ({why}): training on the traces teaches it to end its turns "
                      f"with {eot}, and distill adds it to the saved model's stop tokens")]
