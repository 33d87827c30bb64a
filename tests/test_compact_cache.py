"""The compact logits cache (format 3): exact ids, log-probs within the stated bound, <= 128 B/token
at k = 64, and offline KD from it as good as from the exact format-1 cache; formats 1 and 2 are
still read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from distill.cli import main
from distill.errors import DistillError
from distill.store import LogitsCache, pack_rows, packing, row_bytes, unpack_rows, unsplit
from conftest import assert_within_bound
from test_kd import QUIET, held_out_kl, write_traces


def teacher_rows(n: int, vocab: int, k: int, scale: float, seed: int, frequent: float = 0.0):
    """Normalised top-k rows of random softmaxes (most likely first), as ``teacher_top_k`` writes them;
    ``frequent`` > 0 tilts them towards low ids (a trained teacher on a byte-pair vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=g) * scale - frequent * torch.arange(vocab), dim=-1)
    top = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(1, top.indices, -torch.inf), dim=-1)
    return top.indices, top.values, tail


@pytest.mark.parametrize("vocab,k", [(49152, 64), (151936, 64), (32000, 7), (300, 1)])
def test_rows_round_trip_within_the_stated_error(vocab, k):
    layout = packing(vocab, k)
    for scale, frequent in ((0.05, 0.0), (1.0, 0.0), (4.0, 0.0), (1.0, 1e-3)):  # near-flat to peaked
        ids, lps, tail = teacher_rows(40, vocab, k, scale, seed=k, frequent=frequent)
        stream, common = pack_rows(ids, lps, tail, layout)
        assert stream.dtype == torch.uint8 and len(stream) == sum(row_bytes(layout, int(c)) for c in common)
        assert_within_bound(ids, lps, tail, unpack_rows(stream, common, layout))
    if k == 64 and vocab <= 65536:  # ids of fewer than 16 bits: 2 bytes per entry at most, the tail included
        assert max(row_bytes(layout, c) for c in range(k + 2)) <= 2 * k


def test_rows_on_frequent_tokens_take_fewer_bytes():
    """Ids mostly below the split (a trained teacher's top-k) cost less than ids spread over the
    vocabulary: at Qwen2.5's 152k tokens such rows fit 128 B; spread ones stay unsplit, the size of
    format 2's rows, with no count per row (it would not pay for itself)."""
    layout = packing(151936, 64)
    spread = pack_rows(*teacher_rows(40, 151936, 64, 1.0, seed=1), layout)
    frequent = pack_rows(*teacher_rows(40, 151936, 64, 1.0, seed=1, frequent=1e-3), layout)
    assert frequent[1].float().mean() > 48 and (spread[1] == unsplit(layout)).all()
    assert len(frequent[0]) / 40 <= 128 < len(spread[0]) / 40 == row_bytes(layout, unsplit(layout)) == 141


def test_api_rows_one_hot_and_padded_round_trip():
    """API rows: a one-hot end of turn and a few alternatives padded with distinct ids at -20."""
    ids = torch.tensor([[7, 0, 1, 2], [5, 9, 49151, 3]])
    lps = torch.tensor([[0.0, -20.0, -20.0, -20.0], [-0.2, -1.9, -20.0, -20.0]])
    tail = torch.log1p(-lps.exp().sum(1)).clamp(min=-20.0)
    layout = packing(49152, 4)
    assert_within_bound(ids, lps, tail, unpack_rows(*pack_rows(ids, lps, tail, layout), layout))
    with pytest.raises(DistillError, match="do not fit the cache's top-4 of a 300-token vocabulary"):
        pack_rows(ids, lps, tail, packing(300, 4))


#: three rows as distill wrote them in format 2 (49,152 tokens, k = 4; its index's packing below),
#: and what they decode to
FORMAT_2_ROWS = "d5c2a98bf00000004004007f00e8c2b3f03b0018014013fffe0841bd94a02f0063ffe001530e20"
FORMAT_2_PACKING = {"vocab_size": 49152, "top_k": 4, "low_bits": 13, "high_bits": 9, "value_bits": 4, "row_bytes": 13}
FORMAT_2_IDS = [[0, 1, 2, 7], [3, 5, 9, 49151], [12, 4095, 4096, 30000]]
FORMAT_2_LOGPROBS = [[-3.1496, -4.3718, -6.0014, -0.0941], [-9.3316, -0.2213, -1.792, -6.8184],
                     [-2.5312, -0.9729, -1.219, -3.3514]]


def test_a_format_2_cache_is_still_read(tmp_path):
    rows = torch.tensor(list(bytes.fromhex(FORMAT_2_ROWS)), dtype=torch.uint8).view(3, 13)
    save_file({"rows": rows, "offsets": torch.tensor([0, 1, 3])}, str(tmp_path / "shard-00000.safetensors"),
              metadata={"trace_ids": json.dumps(["a", "b"]), "token_sha": json.dumps(["x", "y"])})
    header = {"vocab_size": 49152, "top_k": 4, "format_version": 2}
    (tmp_path / "index.json").write_text(json.dumps({
        "format": "distill-topk-logits/2", "header": header, "packing": FORMAT_2_PACKING,
        "shards": [{"file": "shard-00000.safetensors", "traces": 2, "tokens": 3}]}))
    ids, lps, _ = LogitsCache(tmp_path).get_many(["b", "a"])
    assert ids.tolist() == FORMAT_2_IDS[1:] + FORMAT_2_IDS[:1]
    torch.testing.assert_close(lps, torch.tensor(FORMAT_2_LOGPROBS[1:] + FORMAT_2_LOGPROBS[:1]), atol=1e-4, rtol=0)


def write_format_1(directory, header: dict, entries: list[dict]) -> None:
    """A cache as distill wrote it before format 2 (store's docstring): ids int32, fp16 log-probs, fp32 tail."""
    directory.mkdir()
    counts = torch.tensor([0] + [len(e["ids"]) for e in entries])
    save_file({"ids": torch.cat([e["ids"] for e in entries]).int(),
               "logprobs": torch.cat([e["logprobs"] for e in entries]).half(),
               "log_tail": torch.cat([e["log_tail"] for e in entries]).float(), "offsets": counts.cumsum(0)},
              str(directory / "shard-00000.safetensors"),
              metadata={"trace_ids": json.dumps([e["id"] for e in entries]),
                        "token_sha": json.dumps([e["sha"] for e in entries])})
    old_header = {k: v for k, v in header.items() if k != "format_version"}
    (directory / "index.json").write_text(json.dumps({
        "format": "distill-topk-logits/1", "header": old_header,
        "shards": [{"file": "shard-00000.safetensors", "traces": len(entries), "tokens": int(counts.sum())}]}))


def test_kd_from_the_compact_cache_matches_the_exact_one(tmp_path, shared_data, smollm2_dir, tiny_qwen2,
                                                         monkeypatch, capsys):
    """SmolLM2-135M-Instruct's top-64 cached both ways; the students trained from each end equally close."""
    from distill.store import CacheWriter

    traces = write_traces(tmp_path / "traces.jsonl", shared_data, 0, 24)
    held_out = write_traces(tmp_path / "held_out.jsonl", shared_data, 500, 6)
    written: list[dict] = []
    add_shard = CacheWriter.add_shard
    monkeypatch.setattr(CacheWriter, "add_shard", lambda self, entries: (written.extend(entries),
                                                                         add_shard(self, entries))[1])
    compact, exact = tmp_path / "compact", tmp_path / "exact"
    assert main(["logits", "--teacher", str(smollm2_dir), "--student", str(tiny_qwen2), "--traces", str(traces),
                 "--out", str(compact), "--top-k", "64"]) == 0
    index = json.loads((compact / "index.json").read_text())
    assert index["format"] == "distill-topk-logits/3" and index["header"]["format_version"] == 3
    stats = json.loads((compact / "run.json").read_text())["stats"]
    assert stats["tokens"] > 1000 and stats["bytes_per_token"] <= 128, stats
    cache = LogitsCache(compact)
    for e in written:  # the real teacher's rows, decoded, within the stated error
        assert_within_bound(e["ids"], e["logprobs"], e["log_tail"], cache.get(e["id"]))

    write_format_1(exact, index["header"], written)
    old = LogitsCache(exact)
    ids, lps, tail = old.get(written[3]["id"])  # format 1 is read as stored
    assert torch.equal(ids, written[3]["ids"].int()) and torch.equal(lps, written[3]["logprobs"].half())
    size = sum(p.stat().st_size for p in exact.glob("shard-*"))
    assert size / stats["tokens"] >= 388  # 64 x (4 + 2) + 4

    kl = {}
    for name, cache_dir in (("compact", compact), ("exact", exact)):
        out = tmp_path / f"kd-{name}"
        assert main(["train", "--method", "kd", "--student", str(tiny_qwen2), "--teacher-logits", str(cache_dir),
                     "--traces", str(traces), "--out", str(out), "--max-steps", "8", "--batch-size", "2",
                     "--lr", "3e-3", "--warmup-ratio", "0", "--eval-fraction", "0", "--alpha", "1.0", "--seed", "0",
                     *QUIET]) == 0
        kl[name] = held_out_kl(out, smollm2_dir, held_out)
    before = held_out_kl(tiny_qwen2, smollm2_dir, held_out)
    assert kl["exact"] < 0.95 * before, (before, kl)  # training moved the student
    assert math.isclose(kl["compact"], kl["exact"], rel_tol=0.01), kl

    capsys.readouterr()  # a rerun into the old cache is refused, pointing to a new --out
    assert main(["logits", "--teacher", str(smollm2_dir), "--student", str(tiny_qwen2), "--traces", str(traces),
                 "--out", str(exact), "--top-k", "64"]) == 2
    assert "cache is in format 'distill-topk-logits/1'" in capsys.readouterr().err
