"""The logits store: a directory of top-k teacher log-probs, one row per target token.

Offline KD reads the teacher from here instead of running it. The format knows nothing of the
commands that fill it (``distill logits`` from a local, API or served teacher):

- ``index.json`` holds the format, the settings the cache was made with (``header``: teacher,
  tokenizer fingerprint, vocab_size, top_k, temperature, rendering, ``format_version``), the bit
  layout of a row (``packing``) and the list of finished shards. Shards and the index are
  written atomically (temp file + rename), so a rerun skips every trace in a finished shard.
- in a data-parallel launch each rank lists its shards in its own ``index.part-RANK.json``;
  ``merge_parts`` folds every part index into ``index.json`` (at the end, and at the start of a
  rerun after a killed launch). The shard files stay where they are, so merging is one write.
- each shard holds, for a group of traces, one row per target token (``rendering.target_mask``,
  in order) and ``offsets`` int64 (traces + 1). Its metadata names the traces and a sha256 of
  each trace's token ids, so training can check that it renders every trace to exactly the
  tokens the teacher saw.

A row (format 2, ``rows`` uint8 (T, row_bytes)) is k (id, log-prob) entries plus the tail. At
k = 64 that is 127 B for a 49k-token vocabulary (SmolLM2), 123 B at 32k, 139 B at 128k (Llama 3)
and 141 B at 152k (Qwen2.5), where the ids alone take 105 B:

- bytes 0-1: the tail's log-odds, log(tail / top-k mass), in fp16; byte 2: the row's range R
  (its top minus its lowest log-prob) rounded up to R' = 2^(c/16 - 8), c in 0..255;
- k/2 bytes: a 4-bit code per entry, in ascending id order, high nibble first: 0 marks the
  row's top, c = 1..15 a log-prob R' (c - 1/2) / 14.5 below it (15 levels spread over (0, R']);
- then bits, most significant first: the ids (ascending) Elias-Fano coded: the low L bits of
  each id (k x L bits), then the high parts id >> L as a bit vector with a one at high_i + i
  (k + (V - 1 >> L) bits); L minimises the total (9 bits at 49k tokens).

Decoding gives the top k the mass the odds say and puts the top back from it: top = log(top-k
mass) - logsumexp(offsets below the top). The rows come back normalised (the k + 1 buckets sum
to 1, as KD uses them: ``kd_losses._sparse_teacher``), in ascending id order (format 1: most
likely first, as written; nothing downstream depends on the order). Error bound, against the
teacher's normalised row: each log-prob is within R'/14.5 + e <= 2^(1/16) R / 14.5 + e (R'/29
from rounding its offset, R'/29 at most from the top it is measured from; e = |odds| 2^-11 from
fp16, under 0.01 nats for any tail between e^-20 and 1 - e^-20), the log tail within e; ids
are exact and the top stays the unique largest. For SmolLM2-135M on GSM8K (R = 9.4 nats at the
median) that is a KL(exact || stored) of about 0.004 nats per token over the k + 1 buckets.

Format 1 (``ids`` int32 (T, k), ``logprobs`` fp16 (T, k), ``log_tail`` fp32 (T,): 4k + 2k + 4
bytes, 388 B per token at k = 64) is still read; new shards are always format 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distill.errors import DistillError
from distill.records import write_json

FORMAT = "distill-topk-logits/2"
FORMAT_VERSION = 2
OLD_FORMAT = "distill-topk-logits/1"  # read, never written
VALUE_BITS = 4  # per entry: 0 marks the top, 1..15 the offset below it
LEVELS = 2**VALUE_BITS - 1  # codes 1..15: offsets R' (c - 1/2) / 14.5 below the top
INDEX = "index.json"
PART_INDEX = "index.part-{rank}.json"


def token_sha(input_ids) -> str:
    """Fingerprint of one example's token ids (what the teacher saw)."""
    import numpy as np

    return hashlib.sha256(np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def tokenizer_sha(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary: equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def packing(vocab_size: int, top_k: int) -> dict:
    """The byte layout of a row for this vocabulary and k (recorded in the index)."""
    low = min(range(18), key=lambda bits: top_k * bits + ((vocab_size - 1) >> bits))
    high = top_k + ((vocab_size - 1) >> low)
    return {"vocab_size": vocab_size, "top_k": top_k, "low_bits": low, "high_bits": high, "value_bits": VALUE_BITS,
            "row_bytes": 3 + (top_k + 1) // 2 + (top_k * low + high + 7) // 8}


def pack_rows(ids, logprobs, log_tail, layout: dict):
    """(T, k) ids and log-probs, (T,) log tails -> (T, row_bytes) uint8 rows (format in the module doc)."""
    import torch

    k, low_bits, vocab = layout["top_k"], layout["low_bits"], layout["vocab_size"]
    ids, logprobs = ids.long(), logprobs.float()
    if ids.shape[1] != k or ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise DistillError(f"teacher rows of {ids.shape[1]} token ids up to {int(ids.max())} do not fit the "
                           f"cache's top-{k} of a {vocab}-token vocabulary")
    ids, order = ids.sort(dim=1)
    logprobs = logprobs.gather(1, order)
    below = logprobs.max(1, keepdim=True).values - logprobs
    code = torch.ceil(16 * (torch.log2(below.max(1).values.clamp(min=2**-8)) + 8)).clamp(0, 255)
    span = (2 ** (code / 16 - 8))[:, None]
    values = 1 + torch.round(torch.minimum(below, span) / span * (LEVELS - 0.5) - 0.5).clamp(min=0).long()
    values.scatter_(1, below.argmin(1, keepdim=True), 0)
    high = torch.zeros(len(ids), layout["high_bits"], dtype=torch.bool)
    high.scatter_(1, (ids >> low_bits) + torch.arange(k), True)
    odds = log_tail.float() - torch.logsumexp(logprobs, dim=1)  # log(tail / top-k mass)
    return torch.cat([odds.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2),
                      code.to(torch.uint8)[:, None], _bytes(_bits(values, VALUE_BITS)),
                      _bytes(torch.cat([_bits(ids & ((1 << low_bits) - 1), low_bits), high], dim=1))], dim=1)


def unpack_rows(rows, layout: dict):
    """(T, row_bytes) uint8 rows -> ids int64 (T, k) ascending, log-probs fp32 (T, k), log tail fp32 (T,)."""
    import torch

    k, low_bits, device = layout["top_k"], layout["low_bits"], rows.device
    odds = rows[:, :2].contiguous().view(torch.float16).float()[:, 0]
    span = (2 ** (rows[:, 2].float() / 16 - 8))[:, None]
    nibbles = rows[:, 3:3 + (k + 1) // 2]
    values = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).flatten(1)[:, :k]
    body = torch.nn.functional.pad(rows[:, 3 + (k + 1) // 2:], (0, 2)).int()
    at = low_bits * torch.arange(k, device=device)
    window = (body[:, at // 8] << 16) | (body[:, at // 8 + 1] << 8) | body[:, at // 8 + 2]
    low = (window >> (24 - low_bits - at % 8)) & ((1 << low_bits) - 1)
    first = k * low_bits // 8
    bits = (rows[:, 3 + (k + 1) // 2 + first:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8, device=device)) & 1
    ones = bits.flatten(1)[:, k * low_bits % 8:][:, :layout["high_bits"]].nonzero()[:, 1].view(-1, k)
    ids = ((ones - torch.arange(k, device=device)) << low_bits) | low
    offset = torch.where(values == 0, 0.0, -span * (values - 0.5) / (LEVELS - 0.5))
    log_mass = torch.nn.functional.logsigmoid(-odds)  # what the top k hold
    return ids, offset + (log_mass - torch.logsumexp(offset, dim=1))[:, None], torch.nn.functional.logsigmoid(odds)


def _bits(values, width: int):
    """(T, n) ints -> (T, n * width) bools, most significant bit first."""
    import torch

    return ((values[..., None] >> torch.arange(width - 1, -1, -1)) & 1).flatten(1).bool()


def _bytes(bits):
    """(T, n) bools -> (T, ceil(n / 8)) uint8, the first bit the most significant, zero-padded."""
    import torch

    bits = torch.nn.functional.pad(bits, (0, -bits.shape[1] % 8)).view(len(bits), -1, 8).to(torch.uint8)
    return (bits << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def write_shard(path: Path, entries: list[dict], layout: dict) -> None:
    """Atomically write one shard. entries: {id, sha, ids (T,k), logprobs (T,k), log_tail (T,)}."""
    import torch
    from safetensors.torch import save_file

    counts = [int(e["ids"].shape[0]) for e in entries]
    offsets = torch.zeros(len(entries) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {"rows": pack_rows(*(torch.cat([e[name] for e in entries]) for name in ("ids", "logprobs", "log_tail")),
                                 layout).contiguous(),
               "offsets": offsets}
    meta = {"trace_ids": json.dumps([e["id"] for e in entries]), "token_sha": json.dumps([e["sha"] for e in entries])}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except Exception as e:  # safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        raise DistillError(f"{path}: cannot write the shard ({e}); no partial shard is kept: free space and "
                           f"rerun to resume") from None
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class LogitsCache:
    """Reader: ``cache.get(trace_id)`` -> (ids, logprobs, log_tail) tensors, most likely first.

    Shards are memory-mapped; ``get_many`` decodes a batch's rows in one go.
    """

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise DistillError(f"{self.dir}: not a logits cache (no {INDEX}); make one with 'distill logits'")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") not in (FORMAT, OLD_FORMAT):
            raise DistillError(f"{index_path}: unknown cache format {self.index.get('format')!r} (expected {FORMAT} "
                               f"or {OLD_FORMAT}); re-cache with 'distill logits'")
        self.header, self.layout = self.index["header"], self.index.get("packing")
        self._files, self._where = [], {}
        for shard in self.index["shards"]:
            f = safe_open(str(self.dir / shard["file"]), framework="pt")
            meta = f.metadata()
            offsets = f.get_tensor("offsets").tolist()
            for i, (tid, sha) in enumerate(zip(json.loads(meta["trace_ids"]), json.loads(meta["token_sha"]))):
                self._where[tid] = (len(self._files), offsets[i], offsets[i + 1], sha)
            self._files.append(f)

    def __contains__(self, trace_id: str) -> bool:
        return trace_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def trace_ids(self) -> set[str]:
        return set(self._where)

    def token_sha(self, trace_id: str) -> str:
        return self._where[trace_id][3]

    def get(self, trace_id: str):
        return self.get_many([trace_id])

    def get_many(self, trace_ids: list[str], device=None):
        """The traces' rows, concatenated in this order, on ``device`` (decoded there: 1/3 of the bytes to move)."""
        import torch

        names = ("ids", "logprobs", "log_tail") if self.layout is None else ("rows",)
        parts = []
        for tid in trace_ids:
            shard, start, end, _ = self._where[tid]
            parts.append(tuple(self._files[shard].get_slice(name)[start:end] for name in names))
        stored = tuple(torch.cat(p).to(device) for p in zip(*parts))
        return stored if self.layout is None else unpack_rows(stored[0], self.layout)


def read_index(directory: Path) -> dict | None:
    path = directory / INDEX
    return json.loads(path.read_text()) if path.is_file() else None


class CacheWriter:
    """Appends shards to a cache directory; refuses one made with other settings (``header``).

    ``part=RANK``: a data-parallel rank's writer, listing its shards in its own part index under
    names no other rank or launch uses (``merge_parts`` folds them into ``index.json``)."""

    def __init__(self, out: str | Path, header: dict, part: int | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        header = {**header, "format_version": FORMAT_VERSION}
        self.index = read_index(self.out) or {"format": FORMAT, "header": header, "shards": [],
                                              "packing": packing(header["vocab_size"], header["top_k"])}
        if self.index.get("format") != FORMAT:
            raise DistillError(f"{self.out / INDEX}: cache is in format {self.index.get('format')!r}; this version "
                               f"writes {FORMAT}: use a new --out (training still reads the old cache)")
        changed = {k: (self.index["header"].get(k), v) for k, v in header.items() if self.index["header"].get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: cache {a!r} vs now {b!r}" for k, (a, b) in changed.items())
            raise DistillError(f"{self.out / INDEX}: cache was made with other settings ({diff}); use a new --out")
        #: ids of the traces already cached (a rerun skips them)
        self.done = LogitsCache(self.out).trace_ids() if self.index["shards"] else set()
        self.index_file, self.shard_name = INDEX, "shard-{:05d}.safetensors"
        if part is not None:  # the main index only grows, so its length tells launches apart
            self.index_file = PART_INDEX.format(rank=part)
            self.shard_name = f"shard-{len(self.index['shards']):05d}-rank{part}-{{:05d}}.safetensors"
            self.index = {"format": FORMAT, "header": header, "shards": [], "packing": self.index["packing"]}

    def add_shard(self, entries: list[dict]) -> None:
        """Write the next shard, then the index that lists it (a crash between the two loses nothing)."""
        name = self.shard_name.format(len(self.index["shards"]))
        write_shard(self.out / name, entries, self.index["packing"])
        self.index["shards"].append({"file": name, "traces": len(entries),
                                     "tokens": sum(int(e["ids"].shape[0]) for e in entries)})
        write_json(self.out / self.index_file, self.index)


def merge_parts(directory: str | Path) -> None:
    """Fold the part indexes of data-parallel ranks (of this launch or a killed one) into
    ``index.json``. Safe to repeat after a crash: a shard already listed is not listed twice,
    and a part index goes only once ``index.json`` lists its shards."""
    directory = Path(directory)
    parts = sorted(directory.glob(PART_INDEX.format(rank="*")))
    if not parts:
        return
    index = read_index(directory)
    for path in parts:
        part = json.loads(path.read_text())
        index = index or {"format": FORMAT, "header": part["header"], "shards": [], "packing": part["packing"]}
        if part["header"] != index["header"]:
            raise DistillError(f"{path}: made with other settings than {directory / INDEX}; use a new --out")
        listed = {s["file"] for s in index["shards"]}
        index["shards"] += [s for s in part["shards"] if s["file"] not in listed]
    write_json(directory / INDEX, index)
    for path in parts:
        path.unlink()


def cache_stats(directory: Path) -> dict:
    """Traces, tokens and bytes per token of a cache (shard files only)."""
    index = read_index(directory) or {"shards": []}
    size = sum((directory / s["file"]).stat().st_size for s in index["shards"])
    tokens = sum(s["tokens"] for s in index["shards"])
    return {"traces": sum(s["traces"] for s in index["shards"]), "tokens": tokens, "bytes": size,
            "bytes_per_token": size / tokens if tokens else 0.0}
