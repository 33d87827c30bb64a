"""The student as it started, frozen: a teacher shown privileged context (``--teacher self``) and the
anchor that holds on-policy training near where it began (``--anchor-weight``).

Self-distillation with privileged context (OPSD, arXiv 2601.18734; SDFT, Shenfeld et al. 2026;
TRL's privileged GKD): the student answers the plain prompt; its teacher is the same model whose
prompt also holds what the student cannot see at inference (a reference solution, the verified
answer, a teacher trace), and the loss pulls the student's distribution towards that better-informed
one on every token.

Which model teaches: the frozen *starting* student, not the live one with its gradients stopped.
A live teacher moves with every update, so the target drifts with the student and both can slide
together (into repetition, the collapse reverse KL invites); a frozen one is a fixed target, the
same role the KL anchor of RL fine-tuning gives its reference policy. It costs nothing with LoRA
(the base model with the adapter disabled *is* the starting student, the adapter starting at zero)
and a copy of the weights otherwise (bf16 on a GPU). The frozen model runs in eval mode (no
dropout) without gradient, so nothing reaches the live weights through the teacher's side.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

from distill.errors import DistillError


class FrozenStudent:
    """The starting student: a frozen copy of a fully trained student, or, for a LoRA student, the
    live model with its adapter disabled (:meth:`forward`); its output embedding is the base's."""

    def __init__(self, model):
        self.live = model
        self.shares_weights = hasattr(model, "disable_adapter")  # peft: the base is frozen already
        if self.shares_weights:
            self.model = model
        else:
            self.model = copy.deepcopy(model).eval()
            self.model.requires_grad_(False)
        self.placement = ("the student's own base weights, its LoRA adapter disabled" if self.shares_weights
                          else "a frozen copy of the starting student")

    def _device(self):
        return self.live.get_input_embeddings().weight.device

    @contextmanager
    def _as_started(self):
        """The model as the student started, in eval mode, without gradient."""
        import torch

        model = self.model
        if not self.shares_weights and model.get_input_embeddings().weight.device != self._device():
            device = self._device()  # the Trainer moved the student after the copy was made
            model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (model.disable_adapter() if self.shares_weights else nullcontext()):
                yield model
        finally:
            model.train(was_training)

    def hidden(self, inputs: dict):
        """Final hidden states of a batch (``input_ids``, ``attention_mask``) on the student's device."""
        import torch

        from distill.teachers.sources import final_hidden_states

        device = self._device()
        with self._as_started() as model:
            return final_hidden_states(model, model.get_decoder(),
                                       {k: v.to(device) for k, v in inputs.items() if torch.is_tensor(v)})

    def teacher(self, hidden):
        """A ``DenseTeacher`` of these hidden-state rows (the base's output embedding)."""
        from distill.kd_losses import DenseTeacher

        weight = self.model.get_output_embeddings().weight
        return DenseTeacher(hidden, weight.detach(), vocab_size=weight.shape[0])

    def scores(self, inputs: dict, mask, example_index=None, index=None):
        """The starting student on the batch as it is (the anchor's side of the loss)."""
        hidden = self.hidden({k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs})
        rows = hidden.flatten(0, 1)[index.to(hidden.device)] if index is not None else hidden[:, :-1][mask.to(hidden.device)]
        return self.teacher(rows)


def context_prompt(messages: list[dict], context: str, template: str, where: str) -> list[dict]:
    """The prompt turns with the privileged context written into the last user turn by ``template``
    (``{prompt}``: that turn as the student sees it, ``{context}``: the context)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        raise DistillError(f"{where}: no user turn to add the teacher's context to")
    try:
        content = template.format(prompt=messages[last]["content"], context=context)
    except (KeyError, IndexError, ValueError) as e:
        raise DistillError(f"--teacher-context-template {template!r:.80}: {e!r}: it takes {{prompt}} and {{context}} "
                           "(literal braces doubled)") from None
    return [*messages[:last], {**messages[last], "content": content}, *messages[last + 1:]]


class SelfTeacher:
    """``--teacher self``: the frozen starting student (:class:`FrozenStudent`) reads each example's
    completion after its prompt *with* the privileged context, and its final hidden states at the
    completion's tokens are the teacher's rows, in the student's target order.

    An example's teacher prompt is found by ``example_index`` (a trace or prompt); a rollout's, which
    has none, by its prompt's tokens (as ``align.TeacherSide`` finds a rollout's): the first example
    with that prompt gives the context."""

    def __init__(self, frozen: FrozenStudent, prompts: dict[int, list[int]], by_prompt: dict[str, list[int]]):
        self.frozen, self.prompts, self.by_prompt = frozen, prompts, by_prompt
        self.placement = frozen.placement

    @classmethod
    def build(cls, frozen: FrozenStudent, tokenizer, examples: list[dict], origins: dict, field: str,
              template: str) -> "SelfTeacher":
        """Each example's prompt with its record's ``field`` as context, in the student's chat template."""
        from distill.rendering import prompt_ids, render_prompt
        from distill.store import token_sha

        prompts, by_prompt = {}, {}
        for ex in examples:
            origin = origins[ex["example_index"]]
            messages = context_prompt(origin.messages, origin.text(field, "--teacher-context"), template, origin.where)
            prompts[ex["example_index"]] = render_prompt(messages, tokenizer)
            by_prompt.setdefault(token_sha(prompt_ids(ex)), prompts[ex["example_index"]])
        return cls(frozen, prompts, by_prompt)

    def scores(self, inputs: dict, mask, example_index=None, index=None):
        import torch

        ids, mask = inputs["input_ids"].cpu(), mask.cpu()
        sequences, positions = [], []
        for b in range(ids.shape[0]):
            targets = mask[b].nonzero().flatten()
            completion = ids[b, targets + 1].tolist()
            prompt = self._prompt(ids[b, :int(targets[0]) + 1].tolist() if len(targets) else ids[b].tolist(),
                                  None if example_index is None else int(example_index[b]))
            sequences.append(prompt + completion)
            positions.append(torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion)))
        width = max(map(len, sequences))
        batch = torch.zeros(len(sequences), width, dtype=torch.long)
        attention = torch.zeros_like(batch)
        for b, sequence in enumerate(sequences):
            batch[b, :len(sequence)] = torch.tensor(sequence)
            attention[b, :len(sequence)] = 1
        hidden = self.frozen.hidden({"input_ids": batch, "attention_mask": attention})
        at = torch.cat([b * width + p for b, p in enumerate(positions)])
        return self.frozen.teacher(hidden.flatten(0, 1)[at.to(hidden.device)])

    def _prompt(self, prompt: list[int], example: int | None) -> list[int]:
        from distill.store import token_sha

        if example is not None:
            return self.prompts[example]
        found = self.by_prompt.get(token_sha(prompt))
        if found is None:
            raise DistillError("a rollout's prompt is not among the prompts the self-teacher was built from")
        return found
