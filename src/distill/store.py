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
- a cache of the teacher's own tokens (header ``tokens: teacher``, for students of any tokenizer:
  ``teachers.align``) has its rows at the teacher's target tokens, each row holding its realised
  token, which ``targets`` (int32, one per row) lists; beside the index, the teacher's vocabulary:
  its tokenizer (``teacher-tokenizer/``, header ``teacher_vocab: tokenizer``) or, for an API's
  log-probs, the bytes of the tokens it printed (``teacher-strings.json``, ``teacher_vocab:
  strings``; ids in order of first sight, 0 the end of the turn, 1 a token printed lossily, rows
  over a universe of ``STRINGS_ROWS`` ids). Caches without these keys read as before.

A row (format 3) is k (id, log-prob) entries plus the tail, its length set by how many of its ids
fall below ``split`` (4,096: a byte-pair vocabulary numbers its tokens roughly by frequency, and a
trained teacher's top-k sits mostly on frequent tokens; SmolLM2-135M's top-64 over GSM8K has 69% of
its ids there). A shard keeps the rows back to back (``rows`` uint8, one stream), that count per row
(``common``) and each trace's first byte (``byte_offsets``). Where the split would not save the byte
its count costs (a flat teacher's ids, spread over the vocabulary) the shard codes every row
unsplit, the ids as one part over the whole vocabulary, as format 2 did (``rows`` uint8 (T,
row_bytes), no counts, no byte offsets). At k = 64, SmolLM2-135M's rows over GSM8K take 114 B on
average (127 B in format 2); unsplit rows take 127 B at 49k tokens, 139 B at Llama 3's 128k and
141 B at Qwen2.5's 152k:

- bytes 0-1: the tail's log-odds, log(tail / top-k mass), in fp16; byte 2: the row's range R
  (its top minus its lowest log-prob) rounded up to R' = 2^(c/16 - 8), c in 0..255;
- k/2 bytes: a 4-bit code per entry, in ascending id order, high nibble first: 0 marks the
  row's top, c = 1..15 a log-prob R' (c - 1/2) / 14.5 below it (15 levels spread over (0, R']);
- then bits, most significant first: the ids below ``split`` and then the others (less ``split``),
  each part Elias-Fano coded: the low L bits of each id (n x L bits), then the high parts id >> L
  as a bit vector with a one at high_i + i (n + (U - 1 >> L) bits, U the part's universe); L
  minimises the part's total.

Decoding gives the top k the mass the odds say and puts the top back from it: top = log(top-k
mass) - logsumexp(offsets below the top). The rows come back normalised (the k + 1 buckets sum
to 1, as KD uses them: ``kd_losses._sparse_teacher``), in ascending id order (format 1: most
likely first, as written; nothing downstream depends on the order). Error bound, against the
teacher's normalised row: each log-prob is within R'/14.5 + e <= 2^(1/16) R / 14.5 + e (R'/29
from rounding its offset, R'/29 at most from the top it is measured from; e = |odds| 2^-11 from
fp16, under 0.01 nats for any tail between e^-20 and 1 - e^-20), the log tail within e; ids
are exact and the top stays the unique largest. For SmolLM2-135M on GSM8K (R = 9.4 nats at the
median) that is a KL(exact || stored) of about 0.004 nats per token over the k + 1 buckets.

Format 2 (``rows`` uint8 (T, row_bytes), every row unsplit) is still read.
Format 1 (``ids`` int32 (T, k), ``logprobs`` fp16 (T, k), ``log_tail`` fp32 (T,): 4k + 2k + 4
bytes, 388 B per token at k = 64) is still read; new shards are always format 3.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from distill.errors import DistillError
from distill.records import write_json

FORMAT = "distill-topk-logits/3"
FORMAT_VERSION = 3
READ_ONLY_FORMATS = ("distill-topk-logits/2", "distill-topk-logits/1")  # read, never written
SPLIT = 4096  # ids below it are coded apart from the rest
VALUE_BITS = 4  # per entry: 0 marks the top, 1..15 the offset below it
LEVELS = 2**VALUE_BITS - 1  # codes 1..15: offsets R' (c - 1/2) / 14.5 below the top
INDEX = "index.json"
PART_INDEX = "index.part-{rank}.json"
TEACHER_TOKENIZER = "teacher-tokenizer"
TEACHER_STRINGS = "teacher-strings.json"
STRINGS_ROWS = 2**20  # the id universe of an API teacher's printed tokens


def token_sha(input_ids) -> str:
    """Fingerprint of one example's token ids (what the teacher saw)."""
    import numpy as np

    return hashlib.sha256(np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def tokenizer_sha(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary: equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def packing(vocab_size: int, top_k: int) -> dict:
    """The settings of a row's layout for this vocabulary and k (recorded in the index)."""
    return {"vocab_size": vocab_size, "top_k": top_k, "value_bits": VALUE_BITS, "split": min(SPLIT, vocab_size)}


def _elias_fano(n: int, universe: int) -> tuple[int, int]:
    """(low bits per id, bits of the high part) of n ascending ids below ``universe``."""
    if n == 0:
        return 0, 0
    low = min(range(18), key=lambda bits: n * bits + ((universe - 1) >> bits))
    return low, n + ((universe - 1) >> low)


def _parts(layout: dict, common: int) -> list[tuple[int, int, int, int]]:
    """(first id, count, low bits, high bits) of a row's id parts: below the split, and the rest;
    ``common`` = ``unsplit(layout)``: one part over the whole vocabulary (format 2's rows)."""
    k, vocab = layout["top_k"], layout["vocab_size"]
    if common > k:
        return [(0, k, *_elias_fano(k, vocab))]
    split = layout["split"]
    return [(0, common, *_elias_fano(common, split)), (split, k - common, *_elias_fano(k - common, vocab - split))]


def unsplit(layout: dict) -> int:
    """The count that marks a row coded without the split."""
    return layout["top_k"] + 1


def row_bytes(layout: dict, common: int) -> int:
    """Bytes of a row with ``common`` of its ids below the split."""
    bits = sum(n * low + high for _, n, low, high in _parts(layout, common))
    return 3 + (layout["top_k"] + 1) // 2 + (bits + 7) // 8


def pack_rows(ids, logprobs, log_tail, layout: dict):
    """(T, k) ids and log-probs, (T,) log tails -> the rows back to back (uint8) and each row's count
    of ids below the split (format in the module doc); ``unsplit`` for every row when the split
    would not save the counts' byte per row."""
    import torch

    k, vocab, split = layout["top_k"], layout["vocab_size"], layout["split"]
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
    odds = log_tail.float() - torch.logsumexp(logprobs, dim=1)  # log(tail / top-k mass)
    head = torch.cat([odds.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2), code.to(torch.uint8)[:, None],
                      _bytes(_bits(values, VALUE_BITS))], dim=1)
    common = (ids < split).sum(1)
    count = torch.uint8 if unsplit(layout) < 256 else torch.int32
    starts, lengths = _row_starts(common, layout)
    if len(ids) * row_bytes(layout, unsplit(layout)) <= lengths.sum() + len(ids) * torch.iinfo(count).bits // 8:
        common.fill_(unsplit(layout))  # rows spread over the vocabulary (a flat teacher): no split, no counts
        starts, lengths = _row_starts(common, layout)
    stream = torch.empty(int(lengths.sum()), dtype=torch.uint8)
    for c in common.unique().tolist():  # the rows with c ids below the split share one layout
        rows = (common == c).nonzero()[:, 0]
        parts = _parts(layout, c)
        bits = [_elias_fano_bits(part - first, low, high) for (first, _, low, high), part
                in zip(parts, ids[rows].split([n for _, n, _, _ in parts], dim=1))]
        stream[starts[rows, None] + torch.arange(lengths[rows[0]])] = torch.cat([head[rows], _bytes(torch.cat(bits, 1))], 1)
    return stream, common.to(count)


def unpack_rows(stream, common, layout: dict):
    """The rows back to back (uint8) and their counts of ids below the split -> ids int64 (T, k)
    ascending, log-probs fp32 (T, k), log tail fp32 (T,). On the stream's device, every row at once:
    each entry's bit position follows from its row's count."""
    import torch

    k, device = layout["top_k"], stream.device
    rows = _layouts(layout, device)[common.long()]
    n1, low1, high1, first2, low2, high2, length = rows.unbind(1)
    most1, most2, longest = rows[:, [2, 5, 6]].max(0).values.tolist() if len(rows) else (0, 0, 0)  # one sync
    starts = length.cumsum(0) - length
    head = stream[starts[:, None] + torch.arange(3 + (k + 1) // 2, device=device)]
    odds = head[:, :2].contiguous().view(torch.float16).float()[:, 0]
    span = (2 ** (head[:, 2].float() / 16 - 8))[:, None]
    nibbles = head[:, 3:]
    values = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).flatten(1)[:, :k]
    # the bits after the head: part 1's low bits and high bit vector, then part 2's
    width = max(longest - head.shape[1], 0) + 2
    body = torch.nn.functional.pad(stream, (0, width))[starts[:, None] + head.shape[1] + torch.arange(width, device=device)]
    body = body.long()
    j = torch.arange(k, device=device)
    second = j >= n1[:, None]  # (T, k): the entry is in part 2
    low = torch.where(second, low2[:, None], low1[:, None])
    at = torch.where(second, (n1 * low1 + high1)[:, None] + (j - n1[:, None]) * low2[:, None], j * low1[:, None])
    byte = at >> 3
    window = sum(body.gather(1, byte + i) << 8 * (2 - i) for i in range(3))  # each low part in 3 bytes
    lows = (window >> (24 - low - (at & 7))) & ((1 << low) - 1)
    col = torch.arange(most1 + most2, device=device)
    in2 = col >= most1
    bit = torch.where(in2, (n1 * low1 + high1 + (k - n1) * low2)[:, None] + col - most1, (n1 * low1)[:, None] + col)
    valid = torch.where(in2, col - most1 < high2[:, None], col < high1[:, None])
    bit = bit.clamp(max=8 * width - 1)
    bits = ((body.gather(1, bit >> 3) >> (7 - (bit & 7))) & 1).bool() & valid
    ones = bits.nonzero()[:, 1].view(-1, k)  # k ones a row: part 1's, then part 2's
    high = torch.where(second, ones - most1 - (j - n1[:, None]), ones - j)
    ids = torch.where(second, first2[:, None], 0) + ((high << low) | lows)
    offset = torch.where(values == 0, 0.0, -span * (values - 0.5) / (LEVELS - 0.5))
    log_mass = torch.nn.functional.logsigmoid(-odds)  # what the top k hold
    return ids, offset + (log_mass - torch.logsumexp(offset, dim=1))[:, None], torch.nn.functional.logsigmoid(odds)


def _layouts(layout: dict, device):
    """Per count of ids below the split (0..k, then ``unsplit``), a row's (part 1's count, low bits,
    high bits, part 2's first id, low bits, high bits, row bytes); format 2 has unsplit rows only."""
    return _layout_table(layout["vocab_size"], layout["top_k"], layout.get("split"), str(device))


@functools.lru_cache(maxsize=16)
def _layout_table(vocab_size: int, top_k: int, split: int | None, device: str):
    """``_layouts``, made once per cache and device (a copy to a GPU each batch would wait for it)."""
    import torch

    layout = {"vocab_size": vocab_size, "top_k": top_k, "split": split}
    table = torch.zeros(unsplit(layout) + 1, 7, dtype=torch.long)
    for c in range(unsplit(layout) + 1) if split is not None else [unsplit(layout)]:
        parts = _parts(layout, c)
        _, n1, low1, high1 = parts[0] if len(parts) == 2 else (0, 0, 0, 0)
        first2, _, low2, high2 = parts[-1]
        table[c] = torch.tensor([n1, low1, high1, first2, low2, high2, row_bytes(layout, c)])
    return table.to(device)


def _row_starts(common, layout: dict):
    """Each row's first byte in the stream and its length."""
    lengths = _layouts(layout, common.device)[common.long(), 6]
    return lengths.cumsum(0) - lengths, lengths


def _elias_fano_bits(ids, low: int, high: int):
    """(T, n) ascending ids -> (T, n * low + high) bools: their low bits, then the high parts' bit vector."""
    import torch

    upper = torch.zeros(len(ids), high, dtype=torch.bool)
    upper.scatter_(1, (ids >> low) + torch.arange(ids.shape[1]), True)
    return torch.cat([_bits(ids & ((1 << low) - 1), low), upper], dim=1)


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
    """Atomically write one shard. entries: {id, sha, ids (T,k), logprobs (T,k), log_tail (T,)}, and
    ``targets`` (T,) in a cache of the teacher's own tokens."""
    import torch
    from safetensors.torch import save_file

    counts = [int(e["ids"].shape[0]) for e in entries]
    offsets = torch.zeros(len(entries) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    stream, common = pack_rows(*(torch.cat([e[name] for e in entries]) for name in ("ids", "logprobs", "log_tail")),
                               layout)
    if (common == unsplit(layout)).all():  # as format 2 wrote it: rows of one size, found by row
        tensors = {"rows": stream.view(len(common), row_bytes(layout, unsplit(layout))), "offsets": offsets}
    else:
        row_ends = _row_starts(common.long(), layout)[1].cumsum(0)
        tensors = {"rows": stream, "common": common, "offsets": offsets,
                   "byte_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), row_ends])[offsets]}
    if "targets" in entries[0]:
        tensors["targets"] = torch.cat([e["targets"] for e in entries]).to(torch.int32)
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
        if self.index.get("format") not in (FORMAT, *READ_ONLY_FORMATS):
            raise DistillError(f"{index_path}: unknown cache format {self.index.get('format')!r} (expected one of "
                               f"{', '.join((FORMAT, *READ_ONLY_FORMATS))}); re-cache with 'distill logits'")
        self.header, self.layout = self.index["header"], self.index.get("packing")
        self._files, self._where = [], {}
        self._counted = []  # per shard: whether its rows have counts (format 3's split rows)
        for shard in self.index["shards"]:
            f = safe_open(str(self.dir / shard["file"]), framework="pt")
            meta, keys = f.metadata(), set(f.keys())
            offsets = f.get_tensor("offsets").tolist()
            # where each trace's rows are: format 3 by byte (rows of varying length), else by row
            at = f.get_tensor("byte_offsets").tolist() if "byte_offsets" in keys else offsets
            for i, (tid, sha) in enumerate(zip(json.loads(meta["trace_ids"]), json.loads(meta["token_sha"]))):
                self._where[tid] = (len(self._files), offsets[i], offsets[i + 1], sha, (at[i], at[i + 1]))
            self._files.append(f)
            self._counted.append("common" in keys)

    def __contains__(self, trace_id: str) -> bool:
        return trace_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def trace_ids(self) -> set[str]:
        return set(self._where)

    def token_sha(self, trace_id: str) -> str:
        return self._where[trace_id][3]

    def targets(self, trace_id: str):
        """The realised teacher token of each of the trace's rows (a cache of the teacher's own tokens)."""
        shard, start, end, _, _ = self._where[trace_id]
        try:
            return self._files[shard].get_slice("targets")[start:end]
        except Exception:  # safetensors names a missing tensor in an error type of its own
            raise DistillError(f"{self.dir}: shard {self.index['shards'][shard]['file']} has no 'targets' (the "
                               f"teacher's own tokens); re-cache with 'distill logits'") from None

    def get(self, trace_id: str):
        return self.get_many([trace_id])

    def get_many(self, trace_ids: list[str], device=None):
        """The traces' rows, concatenated in this order, on ``device`` (decoded there: 1/3 of the bytes to move)."""
        import torch

        parts = []
        for tid in trace_ids:
            shard, start, end, _, (first, last) = self._where[tid]
            f = self._files[shard]
            if self.layout is None:  # format 1: the entries as they are
                parts.append(tuple(f.get_slice(name)[start:end] for name in ("ids", "logprobs", "log_tail")))
                continue
            # no counts: every row unsplit, one size (format 2, or a shard the split did not pay for)
            common = (f.get_slice("common")[start:end].int() if self._counted[shard]
                      else torch.full((end - start,), unsplit(self.layout), dtype=torch.int32))
            parts.append((f.get_slice("rows")[first:last].flatten(), common))
        stored = tuple(torch.cat(p).to(device) for p in zip(*parts))
        return stored if self.layout is None else unpack_rows(*stored, self.layout)


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


def save_teacher_tokenizer(directory: str | Path, tokenizer) -> None:
    """The teacher's tokenizer beside a cache of its own tokens (written whole or not at all)."""
    import shutil

    out = Path(directory) / TEACHER_TOKENIZER
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def save_teacher_strings(directory: str | Path, pieces: list[bytes | None]) -> None:
    """An API teacher's printed tokens, as bytes (None: the end of the turn), beside its cache."""
    write_json(Path(directory) / TEACHER_STRINGS, [p.hex() if p is not None else None for p in pieces])


def teacher_vocabulary(directory: str | Path):
    """The teacher's vocabulary beside a cache of its own tokens: its tokenizer (``teacher_vocab:
    tokenizer``), or the list of its printed tokens' bytes (``strings``); a clear refusal if unreadable."""
    directory = Path(directory)
    kind = (read_index(directory) or {}).get("header", {}).get("teacher_vocab", "tokenizer")
    path = directory / (TEACHER_STRINGS if kind == "strings" else TEACHER_TOKENIZER)
    try:
        if kind == "strings":
            return [bytes.fromhex(p) if p is not None else None for p in json.loads(path.read_text())]
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a missing or broken file, whichever error its reader raises
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistillError(f"{directory}: cannot load the teacher's vocabulary {path} ({reason}); the cache of the "
                           f"teacher's own tokens needs it: re-run 'distill logits' into a new --out") from None
