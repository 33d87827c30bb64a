"""Several teachers, one per example: multi-teacher on-policy distillation (MOPD: TRL #6705, verl
#6051, NeMo-RL #2780), where each prompt is taught by the teacher of its domain.

An example's teacher is the one its record's ``--route-field`` value names (``--route-default`` for a
value that names none), decided once for every example before training (:func:`routes`), so a bad
value fails before anything loads, naming its file and line. Per batch :class:`RoutedTeacher` splits
the rows by teacher, asks each teacher for its rows (each in its own way: a local model, a served
one, a cache, the self-teacher; a teacher of another tokenizer aligned as it would be alone), and
hands the loss a ``kd_losses.TeacherParts``: each teacher's rows, in the batch's target order. A
rollout (no ``example_index``) is routed by its prompt's tokens, as its prompt's example is.
"""

from __future__ import annotations

from distill.errors import DistillError


def routes(examples: list[dict], origins: dict, field: str, teachers: list[str], default: str | None) -> dict[int, str]:
    """Each example's teacher (by ``example_index``); a value naming no teacher goes to ``default``, or
    fails with one line naming its file, line and value."""
    out = {}
    for ex in examples:
        origin = origins[ex["example_index"]]
        value = origin.fields.get(field)
        name = str(value) if value is not None else None
        if name not in teachers:
            if default is None:
                shown = f"value {value!r}" if value is not None else "no value"
                raise DistillError(f"{origin.where}: field '{field}' has {shown}, which names none of the teachers "
                                   f"({', '.join(teachers)}); add it to --teacher or pass --route-default NAME")
            name = default
        out[ex["example_index"]] = name
    return out


def prompt_routes(examples: list[dict], by_example: dict[int, str], origins: dict) -> dict[str, str]:
    """Each distinct prompt's teacher (by its tokens' fingerprint), for the rollouts; a prompt whose
    examples name two teachers fails (a rollout of it would have two)."""
    from distill.rendering import prompt_ids
    from distill.store import token_sha

    out: dict[str, tuple[str, int]] = {}
    for ex in examples:
        key, name = token_sha(prompt_ids(ex)), by_example[ex["example_index"]]
        first = out.setdefault(key, (name, ex["example_index"]))
        if first[0] != name:
            raise DistillError(f"{origins[ex['example_index']].where}: its prompt is also at "
                               f"{origins[first[1]].where}, routed to '{first[0]}' there and to '{name}' here: one "
                               "prompt's rollouts need one teacher")
    return {key: name for key, (name, _) in out.items()}


class RoutedTeacher:
    def __init__(self, teachers: dict, by_example: dict[int, str], by_prompt: dict[str, str]):
        self.teachers, self.by_example, self.by_prompt = teachers, by_example, by_prompt

    def _names(self, inputs: dict, mask, example_index) -> list[str]:
        """Each batch row's teacher: by its example, else (a rollout) by its prompt."""
        from distill.store import token_sha

        if example_index is not None:
            return [self.by_example[int(i)] for i in example_index.tolist()]
        ids, mask = inputs["input_ids"].cpu(), mask.cpu()
        names = []
        for b in range(ids.shape[0]):
            first = int(mask[b].nonzero()[0]) if mask[b].any() else ids.shape[1] - 1
            name = self.by_prompt.get(token_sha(ids[b, :first + 1].tolist()))
            if name is None:
                raise DistillError("a rollout's prompt is not among the prompts the teachers were routed by")
            names.append(name)
        return names

    def _split(self, inputs: dict, mask, example_index, index) -> list[tuple]:
        """Per teacher: (name, its rows in the batch's target order or None for all, its sub-batch's
        inputs, mask, example_index and target index)."""
        import torch

        names = self._names(inputs, mask, example_index)
        if len(set(names)) == 1:
            return [(names[0], None, inputs, mask, example_index, index)]
        counts = mask.sum(1).cpu()
        starts = torch.cumsum(counts, 0) - counts
        parts = []
        for name in dict.fromkeys(names):
            batch_rows = torch.tensor([b for b, n in enumerate(names) if n == name])
            rows = torch.cat([torch.arange(int(starts[b]), int(starts[b] + counts[b])) for b in batch_rows])
            sub_mask = mask[batch_rows.to(mask.device)]
            sub = {k: v[batch_rows.to(v.device)] if torch.is_tensor(v) else v for k, v in inputs.items()}
            sub_index = torch.nn.functional.pad(sub_mask, (0, 1)).flatten().nonzero().flatten()
            parts.append((name, rows, sub, sub_mask,
                          None if example_index is None else example_index[batch_rows.to(example_index.device)],
                          sub_index))
        return parts

    def submit(self, inputs: dict, mask, example_index=None):
        """Each teacher that can start early (``submit``) starts on its rows; None where none can."""
        parts = self._split(inputs, mask, example_index, None)
        started = [self.teachers[name].submit(sub, sub_mask, sub_example) if hasattr(self.teachers[name], "submit")
                   else None for name, _, sub, sub_mask, sub_example, _ in parts]
        return (parts, started) if any(s is not None for s in started) else None

    def scores(self, inputs: dict, mask, example_index=None, index=None, scored=None):
        from distill.kd_losses import TeacherParts

        parts, started = scored if scored is not None else (self._split(inputs, mask, example_index, index), None)
        out = []
        for i, (name, rows, sub, sub_mask, sub_example, sub_index) in enumerate(parts):
            teacher, pending = self.teachers[name], started[i] if started else None
            if rows is None and index is not None:
                sub_index = index
            kwargs = {"scored": pending} if pending is not None else {}
            out.append((name, rows, teacher.scores(sub, sub_mask, sub_example, index=sub_index, **kwargs)))
        return TeacherParts(out)

    def close(self) -> None:
        for teacher in self.teachers.values():
            if hasattr(teacher, "close"):
                teacher.close()
