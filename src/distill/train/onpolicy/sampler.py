"""A sampler for on-policy rollouts whose decoding step is one CUDA graph, sampling included (issue #37).

transformers' ``generate`` spends ~5 ms of host work per decoding step of a 1.5B student (stopping
checks, logits processors, per-step Python) where reading its weights takes ~1 ms. This sampler
runs the student's own transformers modules with transformers' ``StaticCache`` and keeps the host
out of the loop, as gpt-fast (``decode_one_token``) and vLLM (``CUDAGraphRunner``) do:

- Prompts of different lengths are left-padded and prefilled together, eagerly (their width
  varies), each distinct prompt once: its rollouts' rows get copies of its keys and values. Each
  row attends from its own first column on and counts its positions from there, so every prompt
  continues as it would alone. Pad columns attend to themselves only, so nothing in the cache is
  ever NaN.
- A decoding step feeds the last tokens, writes the cache column, builds the step's additive mask
  from the cache's own write position, and picks the next tokens on the device: temperature,
  top-k and top-p are transformers' own logits processors in ``generate``'s order; the draw is
  the exponential race (the argmax of p / E with E ~ Exp(1) is distributed as multinomial(p), with
  no host sync; gpt-fast's ``multinomial_sample_one_no_sync``, vLLM's sampler) from an explicit
  ``torch.Generator`` seeded per rollout. A row that wrote a stop token is done: it writes
  padding from then on. The host reads the done flags every ``check_every`` steps only.
- The weights are a shadow copy of the live student (bf16 on a GPU) refreshed in place before each
  rollout: the graph's addresses stay valid, nothing is reloaded, and the live model's autocast
  casts never run while sampling. In the copy the projections that read one input are one matrix
  (``fused.merge_projections``: q/k/v, gate/up), and a one-token step's attention is two matrix
  products (``_attention``): at a few rows a step is many small kernels, and these make it fewer
  and wider.
- The cache (rows x length) is planned against the free GPU memory; a call that needs more rows or
  a longer prompt grows it and captures the step again. Fewer rows than planned decode as done
  padding rows. A step attends over the cache up to the end of its ``WINDOW`` of columns, not all
  of it (one graph per window, sharing one memory pool, as vLLM's graphs per batch size do): with
  64 rows the cache a step reads is as large as the weights.

``graphs`` says how a step runs: ``cuda-graph`` replays a ``torch.cuda.graph`` capture of it,
``compile`` replays such a capture of the step as ``torch.compile`` makes it (inductor fuses the small
kernels), ``eager`` runs the same code as is (the CPU, the tests); ``auto`` is ``compile`` on a GPU
(bench/bench_on_policy.py measures the three). A replay runs no Python: it may run in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain

import torch

from distill.distributed import sharded_over_processes
from distill.errors import DistillError
from distill.train.onpolicy.fused import live_names, merge_projections

log = logging.getLogger(__name__)

#: the name the step's attention is registered under with transformers' ``AttentionInterface``
ATTENTION = "distill_decode"
GRAPHS = ("auto", "cuda-graph", "compile", "eager")
#: steps run before a window's capture (on a side stream, as torch.cuda.graph asks; a compiled step compiles there)
WARM_UP_STEPS = 3
#: a step attends over the cache in windows of this many columns (one graph each), not all of it
WINDOW = 256


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the student's logits; temperature 0 is greedy. The default is
    the full distribution (top-k 0, top-p 1): the on-policy loss is an expectation under it."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def warpers(self) -> list:
        """transformers' processors, in the order ``generate`` applies them (none for greedy)."""
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)

        if self.temperature == 0:
            return []
        out = [TemperatureLogitsWarper(self.temperature)] if self.temperature != 1.0 else []
        out += [TopKLogitsWarper(self.top_k)] if self.top_k else []
        out += [TopPLogitsWarper(self.top_p)] if self.top_p < 1.0 else []
        return out


def unsupported(model) -> str | None:
    """Why the sampler cannot run ``model`` (None: it can)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if hasattr(model, "peft_config"):
        return "it samples from a copy of the full weights, and this student is a LoRA adapter"
    if sharded_over_processes(model):
        return "it samples from a whole copy of the student, and this student is sharded over processes"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take transformers' attention functions"
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    if set(layer_types) != {"full_attention"}:
        return f"{type(model).__name__} has {', '.join(sorted(set(layer_types) - {'full_attention'}))} layers"
    return None


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a model of ``config``."""
    c = config.get_text_config(decoder=True)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers, kv_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def cache_bytes(config, rows: int, length: int, dtype) -> int:
    """The bytes of a static KV cache of ``rows`` x ``length`` tokens for a model of ``config``."""
    layers, kv_heads, head_dim = kv_shape(config)
    return rows * length * 2 * layers * kv_heads * head_dim * dtype.itemsize


def check_memory(config, rows: int, length: int, dtype, vocab: int, free: int, fraction: float) -> None:
    """Refuse a cache (and the step's vocabulary-wide fp32 buffers: noise, logits, what sampling makes
    of them) over ``fraction`` of ``free`` bytes: the update after the rollout needs the rest."""
    need = cache_bytes(config, rows, length, dtype) + rows * vocab * 4 * 4
    if need > fraction * free:
        raise DistillError(f"on-policy rollouts: the KV cache for {rows} sequences x {length} tokens needs "
                           f"{need / 2**30:.1f} GiB, over {fraction:.0%} of the {free / 2**30:.1f} GiB free on the "
                           "GPU; lower --n, the batch size or --max-tokens")


def refreshed_copy(model, copy=None, dtype=torch.bfloat16, attn_implementation: str | None = None):
    """``model``'s current weights in a model of its own (made on the first call, in ``dtype``), copied
    in place: captured graphs keep their addresses, and sampling runs without the live model's
    autocast casts and in the dtype of its cache. The copy is made on the meta device and filled
    from the student, buffers included: no random initialisation, so the global RNG is untouched."""
    from transformers import AutoModelForCausalLM

    if hasattr(model, "peft_config"):
        raise DistillError("rollouts from a copy of the student need its full weights; LoRA students sample "
                           "with --rollout-cache dynamic")
    with torch.no_grad():
        if copy is None:
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            with torch.device("meta"):  # a config of its own: from_config sets the attention on the one it gets
                copy = AutoModelForCausalLM.from_config(deepcopy(model.config), dtype=dtype, **extra)
            copy.to_empty(device=model.get_input_embeddings().weight.device)
            copy.tie_weights()  # to_empty made tied parameters separate tensors
            copy.generation_config = model.generation_config
            copy.requires_grad_(False).eval()
        live = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, tensor in chain(copy.named_parameters(), copy.named_buffers()):
            parts = [live[part] for part in live_names(name)]  # several where the copy merged them (fused.py)
            if len(parts) > 1:
                torch.cat(parts, out=tensor)
            else:
                tensor.copy_(parts[0])
    return copy


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention, except for a one-token step: the query heads that share a key/value
    head fold into one head of several queries (transformers' ``pack_gqa``, which it skips under
    torch.compile), so the cache is read once per key/value head, never repeated in memory; only as many
    columns as its mask has are read (the step's window); and it runs as two matrix products around a
    softmax, not a fused attention kernel. At a few rows that kernel runs one block per row and head (16
    on an H100's 132 multiprocessors at 8 rows), each reading its keys in turn; the products spread the
    columns over the GPU: 2.69 -> 2.34 ms per decoding step of a 1.5B student at 8 rows (bench/RESULTS.md).
    The scores come out of the product in the copy's dtype and the softmax runs in fp32, as in
    transformers' eager attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if length != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    window = attention_mask.shape[-1]  # the columns the step reads: its window of the cache
    folded = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    scale = scaling if scaling is not None else dim ** -0.5
    scores = (folded @ key[:, :, :window].transpose(-1, -2)).float() * scale + attention_mask
    out = scores.softmax(-1).to(value.dtype) @ value[:, :, :window]
    return out.reshape(batch, 1, heads, dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


class StaticSampler:
    """Rows of ``max_tokens`` sampled tokens for left-padded prompts, one graph replay per step.

    ``generate(model, prompts, seed)`` refreshes the shadow copy from ``model`` (``refresh``) and returns
    (``sample``) a row per prompt: its sampled tokens through its first stop token, ``pad_id`` after it. A seed reproduces
    a rollout on the same device. ``stats`` holds the last call's prefill and decoding seconds and
    steps. ``memory_fraction``: the share of the free GPU memory the cache may take. ``rows`` and
    ``prompt_tokens``: the most prompts a call will have and the longest prompt, when known: the cache
    is then planned (and the step captured or compiled) once, not again when a call needs more.
    """

    def __init__(self, max_tokens: int, sampling: Sampling, stop_ids: list[int], pad_id: int | None = None, *,
                 graphs: str = "auto", check_every: int = 32, memory_fraction: float = 0.5, dtype=None,
                 rows: int = 1, prompt_tokens: int = 1):
        if graphs not in GRAPHS:
            raise DistillError(f"sampler graphs: one of {', '.join(GRAPHS)}; got {graphs!r}")
        if check_every < 1 or not 0 < memory_fraction <= 1:
            raise DistillError(f"sampler: check_every >= 1 and memory_fraction in (0, 1]; got {check_every}, "
                               f"{memory_fraction}")
        self.max_tokens, self.sampling, self.check_every = max_tokens, sampling, check_every
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id if pad_id is not None else (self.stop_ids or [0])[0]
        self.mode = graphs if graphs != "auto" else "compile" if torch.cuda.is_available() else "eager"
        self.memory_fraction, self.dtype = memory_fraction, dtype
        self.stats: dict = {}
        self._shadow = self._cache = self._replay = None
        self._rows = self._length = 0
        self._least = (rows, prompt_tokens)
        self._warpers = sampling.warpers()
        _register_attention()

    @property
    def name(self) -> str:
        return f"graph:{self.mode}"

    @property
    def planned(self) -> tuple[int, int]:
        """(rows, columns) of the cache the step is captured on."""
        return self._rows, self._length

    @property
    def model(self):
        """The copy of the student it samples from (None before the first call)."""
        return self._shadow

    def generate(self, model, prompts: list[list[int]], seed: int) -> list[list[int]]:
        self.refresh(model)
        return self.sample(prompts, seed)

    def refresh(self, model) -> None:
        """The shadow copy takes ``model``'s current weights (in place after the first call)."""
        dtype = self.dtype or (torch.bfloat16 if model.device.type == "cuda" else model.dtype)
        first = self._shadow is None
        self._shadow = refreshed_copy(model, self._shadow, dtype, ATTENTION)
        if first:
            merge_projections(self._shadow)
        self._cache_arg = _cache_kwarg(self._shadow)

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Rows from the shadow as the last :meth:`refresh` left it (whatever the live model does since)."""
        device = self._shadow.device
        width = max(len(p) for p in prompts)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            self._plan(len(prompts), width)
            started = time.perf_counter()
            self._generator.manual_seed(seed)
            self._prefill(prompts, width)
            steps, done = 1, bool(self._done.all())  # the host waits for the prefill here
            prefilled = time.perf_counter()
            while steps < self.max_tokens and not done:
                for _ in range(min(self.check_every, self.max_tokens - steps)):
                    self._replay(min(self._length, (width + steps - 1) // WINDOW * WINDOW + WINDOW))
                    steps += 1
                done = bool(self._done.all())
            rows = self._out[:len(prompts)].tolist()
        self.stats = {"prefill_s": prefilled - started, "decode_s": time.perf_counter() - prefilled,
                      "decode_steps": steps - 1}
        return rows

    def _plan(self, rows: int, width: int) -> None:
        """A cache and buffers for at least ``rows`` x (``width`` + ``max_tokens``), and the step captured on them."""
        width = max(width, self._least[1])
        length = -(-(width + self.max_tokens) // 128) * 128  # columns in multiples of 128: aligned attention masks
        if rows <= self._rows and length <= self._length:
            return
        rows, length = max(rows, self._rows, self._least[0]), max(length, self._length)
        self._cache = self._replay = None
        device, vocab = self._shadow.device, self._shadow.get_output_embeddings().weight.shape[0]
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
                - torch.cuda.memory_allocated(device)
            check_memory(self._shadow.config, rows, length, self._shadow.dtype, vocab, free, self.memory_fraction)
        from transformers import StaticCache

        self._cache = StaticCache(config=self._shadow.config, max_cache_len=length)
        _, kv_heads, head_dim = kv_shape(self._shadow.config)
        self._cache.early_initialization(rows, kv_heads, head_dim, self._shadow.dtype, device)
        new = dict(device=device)
        self._tokens = torch.zeros(rows, dtype=torch.long, **new)
        self._start = torch.zeros(rows, dtype=torch.long, **new)   # each row's first prompt column
        self._width = torch.zeros((), dtype=torch.long, **new)     # the prompts' (padded) width
        self._done = torch.zeros(rows, dtype=torch.bool, **new)
        self._out = torch.zeros(rows, self.max_tokens, dtype=torch.long, **new)
        self._stops = torch.tensor(self.stop_ids, dtype=torch.long, **new)
        self._columns = torch.arange(length, **new)
        self._noise = torch.ones(rows, vocab, **new)
        self._generator = torch.Generator(device)
        self._rows, self._length = rows, length
        self._prefill([[self.pad_id]], 1)  # the step is captured from a state a prefill leaves
        self._capture()

    def _prefill(self, prompts: list[list[int]], width: int) -> None:
        """The prompts, left-padded to ``width``, through the student into the cache, and the first pick.
        Each distinct prompt runs once (a prompt's rollouts share its keys and values, copied into
        their rows); rows past the prompts are padding, done from the start."""
        from transformers import DynamicCache

        distinct = {tuple(p): None for p in prompts}
        row_of = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([row_of[tuple(p)] for p in prompts] + [0] * (self._rows - len(prompts)))
        ids = torch.full((len(distinct), width), self.pad_id, dtype=torch.long)
        for i, p in enumerate(distinct):
            ids[i, width - len(p):] = torch.tensor(p)
        device = self._shadow.device
        start = (ids.shape[1] - torch.tensor([len(p) for p in distinct])).to(device)[:, None, None]
        query = torch.arange(width, device=device)[:, None]
        cols = query.T[None]
        allowed = ((cols >= start) & (cols <= query)) | (cols == query)  # pad columns see themselves only
        prefilled = DynamicCache(config=self._shadow.config)
        logits = self._shadow(input_ids=ids.to(device), attention_mask=self._additive(allowed[:, None]),
                              position_ids=(query.T - start[:, 0]).clamp(min=0), **{self._cache_arg: prefilled},
                              use_cache=True, logits_to_keep=1).logits[:, -1]
        rows = rows.to(device)
        self._cache.reset()
        for layer, prompt_layer in zip(self._cache.layers, prefilled.layers):
            layer.keys[:, :, :width] = prompt_layer.keys[rows]
            layer.values[:, :, :width] = prompt_layer.values[rows]
            layer.cumulative_length.fill_(width)
        self._start.copy_(start[rows, 0, 0])
        self._width.fill_(width)
        self._done.copy_(torch.arange(self._rows, device=device) >= len(prompts))
        self._out.fill_(self.pad_id)
        self._draw_noise()
        self._pick(logits[rows], torch.zeros((), dtype=torch.long, device=device))

    def _step(self, window: int) -> None:
        self._draw_noise()
        self._decode(window)

    def _decode(self, window: int) -> None:
        """One decoding step on the static buffers: the last tokens through the student, attending over
        the first ``window`` columns of the cache, then the pick."""
        column = self._cache.layers[0].cumulative_length  # where this step's keys and values go (the forward adds 1)
        index = column - self._width + 1                   # the output column of its token (the prefill picked 0)
        columns = self._columns[:window]
        allowed = (columns >= self._start[:, None]) & (columns <= column)
        logits = self._shadow(input_ids=self._tokens[:, None], attention_mask=self._additive(allowed[:, None, None]),
                              position_ids=(column - self._start)[:, None], **{self._cache_arg: self._cache},
                              use_cache=True).logits[:, -1]
        self._pick(logits, index)

    def _pick(self, logits, index) -> None:
        """Draw each row's next token into column ``index`` of the output; done rows write padding."""
        token = torch.where(self._done, self.pad_id, self._draw(logits.float()))
        self._out.index_copy_(1, index.view(1), token[:, None])
        self._done |= (token[:, None] == self._stops).any(-1)
        self._tokens.copy_(token)

    def _draw(self, scores):
        """Each row's token: the largest score (greedy), else a draw from the warped distribution, p / E
        largest with E ~ Exp(1) independent per column (the exponential race)."""
        if self.sampling.temperature == 0:
            return scores.argmax(-1)
        for warp in self._warpers:
            scores = warp(None, scores)
        return (scores.softmax(-1) / self._noise).argmax(-1)

    def _draw_noise(self) -> None:
        if self.sampling.temperature != 0:  # Exp(1), kept off 0 so that p / E never divides by it
            self._noise.exponential_(generator=self._generator).clamp_(min=torch.finfo(torch.float32).tiny)

    def _additive(self, allowed):
        return torch.zeros(allowed.shape, dtype=self._shadow.dtype, device=allowed.device).masked_fill_(
            ~allowed, float("-inf"))

    def _windows(self) -> list[int]:
        return sorted({min(w, self._length) for w in range(WINDOW, self._length + WINDOW, WINDOW)})

    def _capture(self) -> None:
        """``_replay(window)``: one decoding step, as ``mode`` runs it."""
        warm_up = min(WARM_UP_STEPS, self.max_tokens - 1)  # the steps after the one-token prefill stay in the output
        cuda = self._shadow.device.type == "cuda"
        if self.mode == "cuda-graph" and not cuda:
            raise DistillError(f"sampler graphs cuda-graph: the student is on {self._shadow.device}, not a GPU")
        if self.mode == "compile" and threading.current_thread() is not threading.main_thread():
            # dynamo's state is per process: tracing here while the update's thread traces fails
            log.info("on-policy sampler: the plan grew in the sampling thread; its step is captured as it is")
            self.mode = "cuda-graph" if cuda else "eager"
        if self.mode == "eager" or warm_up == 0:
            self._replay = self._step
        elif self.mode == "compile":
            try:
                self._compile(warm_up, cuda)
            except Exception as e:  # the same step, captured as it is, still keeps the host out of the loop
                self.mode = "cuda-graph" if cuda else "eager"
                log.warning("on-policy sampler: torch.compile failed on the decoding step (%s: %.300s); running it "
                            "as %s instead", type(e).__name__, e, self.mode)
                self._capture()
        else:
            self._graphs(self._step, warm_up)

    def _compile(self, warm_up: int, cuda: bool) -> None:
        """The step through inductor (its fused kernels), captured in the sampler's own CUDA graphs on a
        GPU: a replay then runs no Python, so it may run in a thread beside a training step that
        traces (``--rollout-overlap``), which torch.compile's own graphs (cudagraph trees) may not.
        The window changes once per ``WINDOW`` steps: after its first change dynamo compiles the step for
        any window (automatic dynamic shapes), captured once per window."""
        decode = torch.compile(self._decode, fullgraph=True)

        def step(window: int) -> None:
            self._draw_noise()
            decode(window)

        if cuda:
            self._graphs(step, warm_up)
            return
        self._replay = step
        for window in self._windows():  # compiled here, not in the first rollout
            self._prefill([[self.pad_id]], 1)
            for _ in range(warm_up):
                step(window)

    def _graphs(self, step, warm_up: int) -> None:
        """``step`` captured in one CUDA graph per window, after ``warm_up`` runs on a side stream (where a
        compiled step compiles)."""
        graphs, pool = {}, None
        for window in self._windows():
            self._prefill([[self.pad_id]], 1)  # each capture starts where a rollout's first step does
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warm_up):
                    step(window)
            torch.cuda.current_stream().wait_stream(side)
            graph = graphs[window] = torch.cuda.CUDAGraph()
            graph.register_generator_state(self._generator)
            # one memory pool for all windows (replays never overlap, as vLLM's graphs of batch sizes);
            # thread_local: the Trainer's data-loader threads may touch CUDA (pinned memory) meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                step(window)
            pool = graph.pool()
        self._replay = lambda window: graphs[window].replay()


def _cache_kwarg(model) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` since transformers 5.2x,
    ``past_key_values`` before (an unknown keyword would be swallowed, and the cache left empty)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
