"""The graph sampler of on-policy rollouts (train/onpolicy/sampler.py) on the CPU.

On a GPU each decoding step is replayed from a CUDA graph (or torch.compile's); here the very same
step code runs eagerly, and once through torch.compile, so these tests check what a GPU runs:
tokens equal to transformers' ``generate`` (greedy), per-step distributions equal to a plain
forward pass of the student, draws that follow transformers' top-k / top-p / temperature, stops
token by token, left-padded prompts that continue as they would alone, and weights read live.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, StaticCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from distill.errors import DistillError
from distill.rendering import render_prompt
from distill.train.onpolicy.rollouts import GraphRollouts, HFRollouts, RolloutSettings, rollout_engine
from distill.train.onpolicy.fused import Part, merge_projections
from distill.train.onpolicy.sampler import Sampling, StaticSampler, cache_bytes, check_memory, refreshed_copy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread: these models are small, and on the shared 2-core machine a second OpenMP thread
    made every step several times slower (its threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(model_dir):
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)


def prompts_for(tok) -> list[list[int]]:
    """Two chat prompts (a real chat model ends its turn on them) and a bare one, of three lengths."""
    return [render_prompt([{"role": "user", "content": "What is 2+2? Answer with a number."}], tok),
            tok("Once upon a time, in a land far away, there lived a")["input_ids"],
            render_prompt([{"role": "user", "content": "Hi"}], tok)]


@pytest.mark.parametrize("which", ["smollm2_dir", "tiny_qwen2"])
def test_greedy_rollouts_are_generates_tokens_for_left_padded_prompts(which, request):
    """Greedy, the sampler's batch of prompts of three lengths gives, prompt by prompt, what transformers'
    ``generate`` gives for that prompt alone, stop tokens and all."""
    tok, model = load(request.getfixturevalue(which))
    prompts = prompts_for(tok)
    settings = RolloutSettings(max_tokens=10, temperature=0.0)
    engine = GraphRollouts(tok, settings)
    got = engine.sample(model, prompts, seed=0)
    alone = [HFRollouts(tok, settings).sample(model, [p], seed=0)[0] for p in prompts]
    assert [(r.completion, r.ended) for r in got] == [(r.completion, r.ended) for r in alone]
    assert [r.prompt for r in got] == prompts
    if which == "smollm2_dir":  # the real chat model answers and ends its turn
        assert got[0].ended and "4" in tok.decode(got[0].completion)
    else:  # one prompt in rows planned for three: the other two are padding rows
        assert [engine.sample(model, [p], seed=0)[0].completion for p in prompts] == [r.completion for r in got]


def test_each_step_samples_from_the_students_distribution_on_its_prefix(tiny_qwen2):
    """The logits each step samples from are those of a plain forward pass of the live student on the
    prompt and the tokens sampled so far, also across a window of the cache (the long prompt's steps
    write columns 252 to 257, past the first window of 256); every sampled token is one that
    transformers' processors (temperature, top-k, top-p) leave in."""
    tok, model = load(tiny_qwen2)
    prompts = [tok("a b c d e f g")["input_ids"], list(range(5, 257))]
    settings = RolloutSettings(max_tokens=6, temperature=0.7, top_k=50, top_p=0.9, per_prompt=2)
    engine = GraphRollouts(tok, settings, stop_ids=[])
    engine.sample(model, prompts, seed=1)  # makes the copy it samples from
    steps = []
    engine.sampler.model.get_output_embeddings().register_forward_hook(lambda m, a, out: steps.append(out[:, -1]))
    rollouts = engine.sample(model, prompts, seed=1)
    assert len(steps) == 6 and len(steps[0]) == 2 and len(steps[1]) == 4
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)])
    with torch.no_grad():
        for row, r in enumerate(rollouts):
            for t, token in enumerate(r.completion):
                plain = model(torch.tensor([r.prompt + r.completion[:t]])).logits[0, -1]
                sampled_from = steps[t][row if t else row // 2]  # the prefill runs each prompt once for its rollouts
                torch.testing.assert_close(sampled_from, plain, atol=1e-4, rtol=1e-4)
                assert processors(None, plain[None])[0, token] > float("-inf")
    assert len({tuple(r.completion) for r in rollouts}) == 4  # a prompt's two rollouts are two draws


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_draws_follow_transformers_temperature_top_k_and_top_p(tiny_llama, top_p):
    """1,600 first tokens (32 rows x 50 seeds) land on transformers' processed distribution: temperature,
    then top-k, then top-p, as ``generate`` orders them (with top-p 0.8 only two of the top four remain)."""
    tok, model = load(tiny_llama)
    prompt = tok("hello there my friend")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1]
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.2), TopKLogitsWarper(4)]
                                     + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = processors(None, logits)[0].softmax(-1)
    engine = GraphRollouts(tok, RolloutSettings(max_tokens=1, temperature=0.2, top_k=4, top_p=top_p, per_prompt=32),
                           stop_ids=[])
    draws = torch.tensor([r.completion[0] for seed in range(50) for r in engine.sample(model, [prompt], seed)])
    frequency = torch.bincount(draws, minlength=expected.numel()).double() / draws.numel()
    support = expected.nonzero().flatten()
    assert len(support) == (4 if top_p == 1.0 else 2)
    assert set(draws.tolist()) == set(support.tolist())
    p = expected[support].double()
    assert ((frequency[support] - p).abs() <= 4 * (p * (1 - p) / draws.numel()).sqrt()).all(), (frequency[support], p)


def test_stops_token_by_token(tiny_llama):
    """A row that writes a stop token ends there and writes padding after it, the others go on as they
    would have; rows without a stop are exactly max_tokens long; the host stops once all rows are done."""
    tok, model = load(tiny_llama)
    prompts = [tok("a b c d e")["input_ids"], tok("x")["input_ids"]]
    settings = RolloutSettings(max_tokens=12, temperature=1.0)
    free = GraphRollouts(tok, settings, stop_ids=[]).sample(model, prompts, seed=5)
    first = GraphRollouts(tok, settings, stop_ids=[]).sample(model, prompts[:1], seed=5)[0].completion
    assert first != free[0].completion  # the noise of a step is drawn for all rows: one row alone draws others
    assert [len(r.completion) for r in free] == [12, 12] and not any(r.ended for r in free)
    row0, row1 = free[0].completion, free[1].completion
    cut = next(i for i, t in enumerate(row0) if i >= 2 and t not in row0[:i] and t not in row1[:i + 1])
    stop = row0[cut]
    engine = GraphRollouts(tok, settings, stop_ids=[stop])
    stopped = engine.sample(model, prompts, seed=5)
    assert stopped[0].completion == row0[:cut + 1] and stopped[0].ended
    assert stopped[0].example()["labels"] == [-100] * len(prompts[0]) + row0[:cut + 1]
    assert stopped[1].completion == (row1[:row1.index(stop) + 1] if stop in row1 else row1)
    rows = engine.sampler.generate(model, prompts, seed=5)
    assert rows[0] == row0[:cut + 1] + [tok.pad_token_id] * (11 - cut)

    cut = next(i for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    stop = first[cut]

    alone = GraphRollouts(tok, settings, stop_ids=[stop], check_every=2)
    assert alone.sample(model, prompts[:1], seed=5)[0].completion == first[:cut + 1]
    assert alone.sampler.stats["decode_steps"] <= cut + 2  # checked every 2 steps, not decoded to max_tokens


def test_a_seed_reproduces_a_rollout_and_leaves_the_global_rng_alone(tiny_llama):
    tok, model = load(tiny_llama)
    engine = GraphRollouts(tok, RolloutSettings(max_tokens=8, per_prompt=3), stop_ids=[])
    prompt = [tok("a b c")["input_ids"]]
    state = torch.random.get_rng_state()
    once = [r.completion for r in engine.sample(model, prompt, seed=7)]
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout and data order don't see sampling
    assert [r.completion for r in engine.sample(model, prompt, seed=7)] == once
    assert [r.completion for r in engine.sample(model, prompt, seed=8)] != once
    assert len({tuple(c) for c in once}) == 3


def test_the_next_rollout_reads_the_live_weights(tiny_llama):
    """After the student's weights change (a training step), the next rollout samples from the new
    weights, from the same copy, refreshed in place (no copy or reload per step); the student keeps its
    own attention and dtype."""
    tok, model = load(tiny_llama)
    settings = RolloutSettings(max_tokens=6, temperature=0.0)
    engine, today = GraphRollouts(tok, settings, stop_ids=[]), HFRollouts(tok, settings, stop_ids=[])
    prompt = [tok("a b c")["input_ids"]]
    first = engine.sample(model, prompt, 0)[0].completion
    copy = engine.sampler.model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    second = engine.sample(model, prompt, 0)[0].completion
    assert second == today.sample(model, prompt, 0)[0].completion and second != first
    assert engine.sampler.model is copy
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32  # the student is untouched


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama"])  # projections with biases and without
def test_the_copy_merges_projections_and_computes_what_the_student_does(which, request):
    """In the sampler's copy q/k/v and gate/up are one matrix each (fewer, wider kernels per step) and the
    model's modules still call them by name: its logits are the student's, before and after the student
    changes and the copy is refreshed in place."""
    tok, model = load(request.getfixturevalue(which))
    copy = refreshed_copy(model, None, torch.float32)
    assert merge_projections(copy) == 2 * model.config.num_hidden_layers
    attention = copy.model.layers[0].self_attn
    merged = dict(attention.named_children())["q_proj+k_proj+v_proj"].weight
    assert isinstance(attention.k_proj, Part) and merged.shape[0] == sum(
        getattr(model.model.layers[0].self_attn, name).out_features for name in ("q_proj", "k_proj", "v_proj"))
    assert sum(p.numel() for p in copy.parameters()) == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([tok("Once upon a time, in a land far away")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        model.model.layers[0].self_attn.v_proj.weight.add_(1.0)
        model.model.layers[1].mlp.up_proj.weight.mul_(-2.0)
        address = merged.data_ptr()
        refreshed_copy(model, copy)
        assert merged.data_ptr() == address
        torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_call_past_the_plan_grows_it_and_a_planned_sampler_is_captured_once(tiny_llama):
    """More prompts or a longer one than planned: the cache grows (and the step is captured again), and
    sampling is as if it had been planned so from the start."""
    tok, model = load(tiny_llama)
    settings = RolloutSettings(max_tokens=6)
    short, prompts = [tok("a")["input_ids"]], [tok("a")["input_ids"], tok("b c")["input_ids"], list(range(5, 205))]
    grown = GraphRollouts(tok, settings, stop_ids=[])
    grown.sample(model, short, seed=0)
    assert grown.sampler.planned == (1, 128)
    planned = GraphRollouts(tok, settings, stop_ids=[], max_prompts=3, prompt_tokens=200)
    planned.sample(model, short, seed=0)
    assert planned.sampler.planned == (3, 256)  # 200 + 6 columns, in multiples of 128
    assert [r.completion for r in grown.sample(model, prompts, seed=4)] == \
        [r.completion for r in planned.sample(model, prompts, seed=4)]
    assert grown.sampler.planned == planned.sampler.planned == (3, 256)


def test_torch_compile_runs_the_same_step(tiny_llama):
    """The step as torch.compile traces it (whole, ``fullgraph``: no host syncs, no graph breaks) samples
    the same tokens as the eager step for a seed; on a GPU this is the CUDA-graphed ``compile`` mode."""
    tok, model = load(tiny_llama)
    prompts = [list(range(5, 257)), tok("x")["input_ids"]]  # steps cross the cache's first window
    settings = RolloutSettings(max_tokens=8, temperature=0.7, top_k=100, top_p=0.95)
    eager = GraphRollouts(tok, settings, stop_ids=[], graphs="eager").sample(model, prompts, seed=3)
    engine = GraphRollouts(tok, settings, stop_ids=[], graphs="compile")
    assert [r.completion for r in engine.sample(model, prompts, seed=3)] == [r.completion for r in eager]
    assert engine.name == "graph:compile"


def test_a_plan_grown_in_the_sampling_thread_is_not_compiled_there(tiny_llama):
    """--rollout-overlap samples in a thread; a call there that outgrows the plan captures the step again,
    and dynamo must not trace in that thread (its state is per process, and the update's thread traces):
    the step runs as it is, with the same tokens."""
    from concurrent.futures import ThreadPoolExecutor

    tok, model = load(tiny_llama)
    settings = RolloutSettings(max_tokens=6, temperature=0.8)
    prompts = [tok("a b c")["input_ids"], tok("x")["input_ids"]]
    engine = GraphRollouts(tok, settings, stop_ids=[], graphs="compile")
    engine.sample(model, prompts[:1], seed=0)  # planned and compiled for one prompt, in this thread
    with ThreadPoolExecutor(1) as thread:
        grown = thread.submit(engine.sample, model, prompts, 5).result()
    assert engine.name == "graph:eager"
    eager = GraphRollouts(tok, settings, stop_ids=[], graphs="eager").sample(model, prompts, seed=5)
    assert [r.completion for r in grown] == [r.completion for r in eager]


def test_a_step_torch_compile_fails_on_runs_captured_as_it_is(tiny_llama, monkeypatch, caplog):
    """Fault injection: torch.compile raising on the step. The sampler says so, runs the step as it is
    (torch.cuda.graph on a GPU, eagerly here), samples the same tokens, and its name says which ran."""
    tok, model = load(tiny_llama)
    prompts = [tok("a b c d e")["input_ids"], tok("x")["input_ids"]]
    settings = RolloutSettings(max_tokens=8)
    eager = GraphRollouts(tok, settings, stop_ids=[], graphs="eager").sample(model, prompts, seed=3)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no kernel for this op")

    monkeypatch.setattr(torch, "compile", broken)
    engine = GraphRollouts(tok, settings, stop_ids=[], graphs="compile")
    assert [r.completion for r in engine.sample(model, prompts, seed=3)] == [r.completion for r in eager]
    assert engine.name == "graph:eager"
    assert "torch.compile failed on the decoding step (RuntimeError: inductor: no kernel" in caplog.text


def test_the_engine_falls_back_where_the_sampler_cannot_run(tiny_llama):
    from peft import LoraConfig, get_peft_model

    tok, model = load(tiny_llama)
    settings = RolloutSettings(max_tokens=4)
    assert rollout_engine(tok, settings, model).name == "hf:dynamic"  # auto, on a CPU
    graph = rollout_engine(tok, settings, model, engine="graph")
    graph.sample(model, [tok("a b")["input_ids"]], seed=0)
    assert graph.name == "graph:eager"
    assert rollout_engine(tok, settings, model, engine="hf").name == "hf:dynamic"

    lora = get_peft_model(load(tiny_llama)[1], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert rollout_engine(tok, settings, lora).name == "hf:dynamic"
    with pytest.raises(DistillError, match="LoRA adapter.*--rollout-engine hf"):
        rollout_engine(tok, settings, lora, engine="graph")
    with pytest.raises(DistillError, match=r"sharded \(FSDP2\)"):
        rollout_engine(tok, settings, model, engine="graph", sharded="FSDP2")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                           sliding_window=8, max_window_layers=1))
    with pytest.raises(DistillError, match="sliding_attention layers"):
        rollout_engine(tok, settings, sliding, engine="graph")
    with pytest.raises(DistillError, match=r"--top-p in \(0, 1\]"):
        rollout_engine(tok, RolloutSettings(top_p=0.0), model)
    with pytest.raises(DistillError, match="--rollout-engine: one of auto, graph, hf"):
        rollout_engine(tok, settings, model, engine="vllm")


def test_the_memory_plan_is_the_caches_size_and_refuses_what_does_not_fit(tiny_qwen2):
    """The planned bytes are what transformers' StaticCache allocates; a cache over the share of free
    memory is refused with a one-line error that says what to lower."""
    tok, model = load(tiny_qwen2)
    cache = StaticCache(config=model.config, max_cache_len=256)
    with torch.no_grad():
        model(torch.zeros(3, 4, dtype=torch.long), cache=cache, use_cache=True)
    allocated = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache_bytes(model.config, 3, 256, torch.float32) == allocated

    from transformers import Qwen2Config

    qwen_1_5b = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                            num_key_value_heads=2, vocab_size=151936)
    check_memory(qwen_1_5b, 64, 1280, torch.bfloat16, 151936, free=40 * 2**30, fraction=0.5)  # 2.3 GiB: fits
    with pytest.raises(DistillError, match=r"64 sequences x 1280 tokens needs 2\.3 GiB, over 50% of the 4\.0 GiB "
                                           r"free on the GPU; lower --n, the batch size or --max-tokens"):
        check_memory(qwen_1_5b, 64, 1280, torch.bfloat16, 151936, free=4 * 2**30, fraction=0.5)


def test_sampler_settings_are_checked():
    with pytest.raises(DistillError, match="one of auto, cuda-graph, compile, eager"):
        StaticSampler(4, Sampling(), [1], graphs="fast")
    with pytest.raises(DistillError, match="check_every >= 1"):
        StaticSampler(4, Sampling(), [1], check_every=0)
