"""Batching: tokenized examples into the tensors a step sees, padded or packed.

- :class:`ExampleDataset` - a list of examples as the map-style dataset the Trainer samples.
- :func:`pack_examples` - best-fit-decreasing packing of examples into rows of at most N tokens.
- :class:`Collator` - padded batches, or padding-free packed rows with restarting ``position_ids``.
- :func:`batch_sequences` - a batch back into its sequences and their target positions (for teachers
  that score sequence by sequence).
"""

from __future__ import annotations

from distill.errors import DistillError
from distill.rendering import IGNORE_INDEX, target_index


class ExampleDataset:
    """A list of tokenized examples as a map-style dataset (the Trainer's sampler indexes it)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Pack examples into rows of at most ``capacity`` tokens (best-fit decreasing, as TRL's 'bfd').

    A row keeps its sequences separate: ``position_ids`` restart at 0 for each, and
    ``example_index`` lists the examples it holds, in order.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        fits = [b for b, free in enumerate(space) if free >= n]
        if fits:
            b = min(fits, key=space.__getitem__)
            bins[b].append(i)
            space[b] -= n
        else:
            bins.append([i])
            space.append(capacity - n)
    rows = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "example_index": []}
        for i in members:
            ex = examples[i]
            row["input_ids"] += ex["input_ids"]
            row["labels"] += ex["labels"]
            row["position_ids"] += range(len(ex["input_ids"]))
            row["example_index"].append(ex.get("example_index", i))
        rows.append(row)
    return rows


class Collator:
    """Examples (or packed rows) -> a batch of tensors.

    ``packing=False``: right-padded ``input_ids`` / ``labels`` (-100) / ``attention_mask``.
    ``packing=True``: padding-free - the whole batch becomes one row with ``position_ids`` that
    restart at 0 per sequence and no ``attention_mask``, so transformers keeps attention inside
    each sequence (flash-attention varlen on GPU; a block-diagonal mask built from the position
    ids with sdpa/eager). The sequences' bounds come along as transformers' flash-attention kwargs
    (``cu_seq_lens_q/k`` int32, ``max_length_q/k`` ints), found here on the CPU so that the GPU
    step does not stop to count them (:func:`sequence_bounds`). The model must run with
    ``use_cache=False`` (training sets it; a teacher forward must pass it too): with a KV cache
    transformers skips the packed-sequence detection and the sequences would attend to each other.
    The first label of every sequence is -100 so no sequence learns to predict the next one's first
    token.
    Either way ``target_index`` lists the outputs the loss trains (``rendering.target_index``),
    and an ``example_index`` tensor (one entry per sequence, in batch order) is kept when the
    examples carry it, for trainers that look up per-example data such as cached logits.
    """

    def __init__(self, pad_token_id: int, packing: bool = False):
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, features: list[dict]) -> dict:
        import torch

        index = _example_indices(features)
        batch = self._packed(features) if self.packing else self._padded(features)
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        batch["target_index"] = target_index(batch["labels"])
        if self.packing:
            cu, longest = sequence_bounds(batch["position_ids"], *batch["position_ids"].shape)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if index is not None:
            batch["example_index"] = torch.tensor(index, dtype=torch.long)
        return batch

    def _padded(self, features: list[dict]) -> dict:
        if any("position_ids" in f for f in features):
            raise DistillError("packed rows need Collator(packing=True)")
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return batch

    def _packed(self, features: list[dict]) -> dict:
        input_ids, labels, position_ids = [], [], []
        for f in features:
            positions = list(f.get("position_ids") or range(len(f["input_ids"])))
            row_labels = list(f["labels"])
            for t, pos in enumerate(positions):
                if pos == 0:
                    row_labels[t] = IGNORE_INDEX
            input_ids += f["input_ids"]
            labels += row_labels
            position_ids += positions
        return {"input_ids": [input_ids], "labels": [labels], "position_ids": [position_ids]}


def _example_indices(features: list[dict]) -> list[int] | None:
    if not all("example_index" in f for f in features):
        return None
    out: list[int] = []
    for f in features:
        value = f["example_index"]
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def sequence_bounds(position_ids, batch: int, length: int, device=None) -> tuple:
    """Cumulative sequence starts (int32, sequences + 1, on ``device``) and the longest sequence of a
    (batch, length) forward: a sequence starts at every position 0 and at every row's start. On a GPU
    this syncs with the host (the count of sequences and the longest are data); the packing collator
    calls it on the CPU and hands the result to the model as transformers' flash-attention kwargs."""
    import torch

    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if position_ids is not None:
        starts |= position_ids.expand(batch, length).to(starts.device) == 0
    starts[:, 0] = True
    total = torch.tensor([batch * length], device=starts.device)
    cu = torch.cat([starts.flatten().nonzero().flatten(), total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def batch_sequences(inputs: dict, mask) -> list[tuple[list[int], list[int]]]:
    """(token ids, target positions in them) of each sequence of a padded or packed batch, in batch order.

    Padded rows: the tokens under ``attention_mask``. Packed rows (``position_ids``, no mask):
    sequences start where the position ids restart at 0. ``mask`` is ``rendering.target_mask``.
    """
    input_ids = inputs["input_ids"]
    out, counted = [], 0
    for b in range(input_ids.shape[0]):
        if inputs.get("attention_mask") is not None:
            where = inputs["attention_mask"][b].nonzero().flatten().tolist() or [0]
            spans = [(where[0], where[-1] + 1)]
        elif inputs.get("position_ids") is not None:
            starts = (inputs["position_ids"][b] == 0).nonzero().flatten().tolist()
            spans = list(zip(starts, starts[1:] + [input_ids.shape[1]]))
        else:
            spans = [(0, input_ids.shape[1])]
        for start, end in spans:
            positions = mask[b, start:end - 1].nonzero().flatten().tolist()
            counted += len(positions)
            out.append((input_ids[b, start:end].tolist(), positions))
    if counted != int(mask.sum()):
        raise DistillError(f"{int(mask.sum()) - counted} target positions of the batch lie outside its sequences")
    return out
