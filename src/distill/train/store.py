"""The logits store: a directory of top-k teacher log-probs, one row per target token.

Offline KD reads the teacher from here instead of running it. The format knows nothing of the
commands that fill it (``distill logits`` from a local, API or served teacher):

- each shard holds, for a group of traces, per target token (``rendering.target_mask``, in
  order): ``ids`` int32 (T, k), ``logprobs`` fp16 (T, k), ``log_tail`` fp32 (T,) = log of the
  probability outside the top-k, and ``offsets`` int64 (traces + 1). Its metadata names the
  traces and a sha256 of each trace's token ids, so training can check that it renders every
  trace to exactly the tokens the teacher saw. 4k + 2k + 4 bytes per token: 388 B at k = 64.
- ``index.json`` holds the settings the cache was made with (teacher, tokenizer fingerprint,
  top-k, temperature, rendering) and the list of finished shards. Shards and the index are
  written atomically (temp file + rename), so a rerun skips every trace in a finished shard.
- in a data-parallel launch each rank lists its shards in its own ``index.part-RANK.json``;
  ``merge_parts`` folds every part index into ``index.json`` (at the end, and at the start of a
  rerun after a killed launch). The shard files stay where they are, so merging is one write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distill.errors import DistillError
from distill.records import write_json

FORMAT = "distill-topk-logits/1"
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


def write_shard(path: Path, entries: list[dict]) -> None:
    """Atomically write one shard. entries: {id, sha, ids (T,k), logprobs (T,k), log_tail (T,)}."""
    import torch
    from safetensors.torch import save_file

    counts = [int(e["ids"].shape[0]) for e in entries]
    offsets = torch.zeros(len(entries) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {
        "ids": torch.cat([e["ids"] for e in entries]).to(torch.int32).contiguous(),
        "logprobs": torch.cat([e["logprobs"] for e in entries]).to(torch.float16).contiguous(),
        "log_tail": torch.cat([e["log_tail"] for e in entries]).to(torch.float32).contiguous(),
        "offsets": offsets,
    }
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
    """Reader: ``cache.get(trace_id)`` -> (ids, logprobs, log_tail) tensors, memory-mapped."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise DistillError(f"{self.dir}: not a logits cache (no {INDEX}); make one with 'distill logits'")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise DistillError(f"{index_path}: unknown cache format {self.index.get('format')!r} (expected {FORMAT})")
        self.header = self.index["header"]
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
        shard, start, end, _ = self._where[trace_id]
        f = self._files[shard]
        return tuple(f.get_slice(name)[start:end] for name in ("ids", "logprobs", "log_tail"))


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
        self.index = read_index(self.out) or {"format": FORMAT, "header": header, "shards": []}
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
            self.index = {"format": FORMAT, "header": header, "shards": []}

    def add_shard(self, entries: list[dict]) -> None:
        """Write the next shard, then the index that lists it (a crash between the two loses nothing)."""
        name = self.shard_name.format(len(self.index["shards"]))
        write_shard(self.out / name, entries)
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
        index = index or {"format": FORMAT, "header": part["header"], "shards": []}
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
