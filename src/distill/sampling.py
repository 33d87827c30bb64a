"""A local model writes: completions of token prompts, sampled with transformers' ``generate``.

What on-policy training's rollouts (``train.onpolicy.rollouts.HFRollouts``) and eval's own-sample
fidelity (``eval.fidelity``) both draw. Prompts are left-padded into one batch, so that every prompt
ends where generation starts; ``per_prompt`` consecutive rows a prompt. Sampling is from the full
distribution at ``temperature`` unless ``top_k`` / ``top_p`` cut it (0 and 1 are passed to
``generate`` as such: its own default top-k of 50 would hide the tail, and a student's tail is where
it differs from its teacher), under a forked, seeded RNG, so the caller's random state is left as
it was. A row ends after its first stop token (:func:`cut_at_stop`).
"""

from __future__ import annotations

from distill.rendering import end_of_turn_id, target_mask


def prompt_ids(example: dict) -> list[int]:
    """The prompt of a rendered example: its tokens before the first trained one (all of them
    for a prompt without a completion, as ``--prompts`` makes)."""
    targets = target_mask(example["labels"])  # output t predicts token t + 1
    return list(example["input_ids"][:targets.index(True) + 1] if any(targets) else example["input_ids"])


def stop_ids_of(tokenizer) -> list[int]:
    """What a completion stops on: the end-of-turn token and EOS."""
    return sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})


def cut_at_stop(tokens: list[int], stop_ids) -> tuple[list[int], bool]:
    """(the tokens through the first stop token, whether there was one)."""
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    return (tokens, False) if end is None else (tokens[:end + 1], True)


def sample_rows(model, prompts: list[list[int]], *, max_tokens: int, seed: int, stop_ids: list[int], pad_id: int,
                per_prompt: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                width_multiple: int = 1, cache_implementation: str | None = None, **generate) -> list[list[int]]:
    """The tokens ``model`` writes after each prompt, ``per_prompt`` consecutive rows a prompt (padding
    after a stop token included); ``temperature`` 0: greedy. ``width_multiple``: the padded prompt width
    is rounded up to it (a static cache's shapes repeat); ``generate``: more arguments of ``generate``."""
    import torch
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    width = -(-max(len(p) for p in prompts) // width_multiple) * width_multiple
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_tokens, num_return_sequences=per_prompt, eos_token_id=stop_ids,
                              pad_token_id=pad_id, use_cache=True, cache_implementation=cache_implementation,
                              **sampling)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             **generate)
    return out[:, width:].tolist()
