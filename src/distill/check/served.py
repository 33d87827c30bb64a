"""A served teacher (``vllm serve``, llama-cpp-python) asked what a run will ask of it, once.

Reachable, serving the model name the run will send, the student's tokenizer, prompt log-probs
at the top-k asked for (``teachers.served.ServedClient.check``, the run's own start-up check), one
sample scored, and the temperature its prompt log-probs carry. vLLM computes prompt log-probs from
the raw logits whatever the request's temperature (verl #6867 now forces T = 1 and warns; vLLM
#37082 proposes a separate ``prompt_logprobs_temperature``), so a teacher temperature set for the
run does not reach them; distill reads them as T = 1 and cannot re-temper top-k rows, so a KD
temperature other than 1 would temper the student's side of the loss alone. The probe
asks for the same sample at T = 1 and T = 0.5 and compares the actual tokens' log-probs.
"""

from __future__ import annotations

import asyncio
import math

from distill.check.verdicts import Verdict, error, ok
from distill.errors import DistillError
from distill.options import Endpoint
from distill.rendering import tokenize_example
from distill.teachers.served import PROBE, ServedClient

CHECK = "served"
PROBE_TEMPERATURE = 0.5
#: Tokens of the sample scored (and scored again at the probe temperature): llama-cpp-python takes ~0.1 s each.
SAMPLE_TOKENS = 32
#: Log-probs that move less than this between the two temperatures are the same (JSON rounding).
SAME = 1e-3


def check_served(base_url: str, model: str, tokenizer, *, student: str, vocab_size: int, top_k: int = 20,
                 kd_temperature: float = 1.0, timeout: float = 30.0) -> list[Verdict]:
    """One served teacher endpoint, checked as ``distill logits`` / ``train --teacher-url`` will use it."""
    return asyncio.run(_check(base_url.rstrip("/"), model, tokenizer, student, vocab_size, top_k, kd_temperature,
                              timeout))


async def _check(url, model, tokenizer, student, vocab_size, top_k, kd_temperature, timeout) -> list[Verdict]:
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as http:
        try:
            response = await http.get(f"{url}/models")
        except httpx.TransportError as e:
            return [error(CHECK, f"{url}: cannot reach the teacher server ({type(e).__name__}: {e})".replace(" ()", ""),
                          f"start it (vllm serve {model} --max-logprobs {max(top_k, 1)}) or fix the URL")]
        if response.status_code != 200:
            return [error(CHECK, f"{url}/models answered HTTP {response.status_code}",
                          "point the URL at the server's OpenAI root (http://HOST:PORT/v1)")]
        served = [m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)]
        listed = ", ".join(map(repr, served)) or "no model"
        client = ServedClient(base_url=url, model=model, top_k=top_k, tokenizer=tokenizer, student=student,
                              vocab_size=vocab_size, endpoint=Endpoint(max_retries=2, request_timeout=timeout))
        async with client:
            try:
                await client.check()
                ids = _sample(tokenizer)
                rows = await client.score(ids)
            except DistillError as e:
                if model not in served:  # vLLM answers 404 for a name it does not serve
                    return [error(CHECK, f"{url} serves {listed}, not '{model}' ({e})",
                                  f"--teacher-model {served[0]}" if served else "start the server with the teacher")]
                return [ok(CHECK, f"{url} is up and serves '{model}'"), error(CHECK, str(e))]
            # llama-cpp-python answers to any name: it lists its model file
            found = [ok(CHECK, f"{url} is up and serves '{model}'" if model in served else
                     f"{url} is up and answers requests for '{model}' (it lists {listed})")]
            known = rows.known & ~rows.sampled.isnan()
            found.append(ok(CHECK, f"{client.server} server: the student's tokenizer, top-{top_k} prompt log-probs; "
                                   f"a {len(ids)}-token sample scored at {int(known.sum())} of {len(ids) - 1} "
                                   f"positions, mean log-prob {float(rows.sampled[known].mean()):.2f} per token"))
            moved = await _temperature_effect(http, client, ids)
    return [*found, _temperature_verdict(moved, client.server, kd_temperature)]


def _sample(tokenizer) -> list[int]:
    """The start of the start-up probe conversation as the student renders it (as text where its template
    refuses it)."""
    try:
        ids = tokenize_example(PROBE, tokenizer)["input_ids"]
    except DistillError:
        ids = tokenizer("\n\n".join(m["content"] for m in PROBE), add_special_tokens=False)["input_ids"]
    return ids[:SAMPLE_TOKENS]


async def _actual_logprobs(http, client: ServedClient, ids: list[int], temperature: float) -> list[float | None]:
    """The log-prob of each actual next token, asked at ``temperature`` (None where the server gives none)."""
    if client.server == "llama-cpp-python":
        body = {"model": client.model, "prompt": client.vocab.text(ids), "echo": True, "logprobs": 1,
                "max_tokens": 1, "temperature": temperature}
        response = await http.post(f"{client.base_url}/completions", json=body)
        return response.json()["choices"][0]["logprobs"]["token_logprobs"]
    body = {"model": client.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 1, "temperature": temperature}
    response = await http.post(f"{client.base_url}/completions", json=body)
    entries = response.json()["choices"][0]["prompt_logprobs"]
    out = []
    for t, entry in enumerate(entries[1:len(ids)]):
        value = (entry or {}).get(str(ids[t + 1]))
        out.append(None if value is None else float(value["logprob"] if isinstance(value, dict) else value))
    return out


async def _temperature_effect(http, client: ServedClient, ids: list[int]) -> float:
    """How far the actual tokens' log-probs move between T = 1 and T = 0.5 (0: the server ignores temperature)."""
    at_one, at_probe = await asyncio.gather(_actual_logprobs(http, client, ids, 1.0),
                                            _actual_logprobs(http, client, ids, PROBE_TEMPERATURE))
    moves = [abs(a - b) for a, b in zip(at_one, at_probe) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    return max(moves, default=0.0)


def _temperature_verdict(moved: float, server: str, kd_temperature: float) -> Verdict:
    if moved <= SAME:
        found = (f"its prompt log-probs do not change with the request's temperature (1.0 vs {PROBE_TEMPERATURE}): "
                 f"they are the teacher at T = 1 (vLLM's behaviour, verl #6867), as distill reads them")
    elif server == "llama-cpp-python":  # distill asks llama-cpp-python for temperature 0 (greedy, one token)
        return error(CHECK, f"the server tempers its echoed log-probs by the request's temperature (moved up to "
                            f"{moved:.2f} at T = {PROBE_TEMPERATURE}), and distill's scoring requests to "
                            f"llama-cpp-python ask for temperature 0",
                     "serve the teacher with vLLM, whose prompt log-probs are the model's own")
    else:
        found = (f"the server tempers prompt log-probs by the request's temperature (moved up to {moved:.2f} at "
                 f"T = {PROBE_TEMPERATURE}); distill asks for T = 1, so its rows are the teacher at T = 1")
    if kd_temperature != 1.0:
        return error(CHECK, f"{found}; --kd-temperature {kd_temperature:g} would temper only the student's side "
                            f"of the loss: served top-k rows cannot be re-tempered, so the teacher stays at T = 1 "
                            f"(distill logits refuses this; train --teacher-url does not yet)",
                     "--kd-temperature 1, or a local teacher (--teacher), whose full logits distill tempers itself")
    return ok(CHECK, found)
