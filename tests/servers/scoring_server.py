"""A vLLM-shaped scoring server that misbehaves on purpose, for the served-teacher tests.

It answers ``POST /v1/completions`` with ``prompt_logprobs=K`` as vLLM does (the prompt as token
ids or text; per position ``{id: {logprob, rank, decoded_token}}`` holding the top K and the
actual token, None for the first) and ``POST /tokenize``, from a made-up teacher whose log-probs
a test can write down (:func:`teacher_top`): after token ``p`` the teacher ranks the ids
``(31 p + 7 j + 1) mod V`` with probability ``2^-(j+1)`` for ``j < RANKED``, and spreads the rest
evenly. The faults of ``FaultServer`` (429, 5xx, slow, dropped connections) hit every request,
keyed by its prompt. Options make it a server distill must refuse: no log-probs, a lower
``max_logprobs``, another tokenizer (every id shifted by one), or no ``/tokenize`` endpoint;
``max_model_len`` makes it refuse longer prompts as vLLM does; ``tempered`` divides its log-probs by
the request's temperature, which vLLM's prompt log-probs never are (verl #6867).
"""

from __future__ import annotations

import math

from fault_server import FaultServer

RANKED = 64
LN2 = math.log(2)


def ranked(prev: int, vocab: int) -> list[int]:
    return [(31 * prev + 7 * j + 1) % vocab for j in range(RANKED)]


def teacher_top(prev: int, k: int, vocab: int) -> tuple[list[int], list[float], float]:
    """The made-up teacher after token ``prev``: its top-k ids, their log-probs, and log of the rest."""
    return ranked(prev, vocab)[:k], [-(j + 1) * LN2 for j in range(k)], -k * LN2


def teacher_logprob(prev: int, token: int, vocab: int) -> float:
    order = ranked(prev, vocab)
    if token in order:
        return -(order.index(token) + 1) * LN2
    return -RANKED * LN2 - math.log(vocab - RANKED)


class ScoringServer(FaultServer):
    def __init__(self, tokenizer, *, max_logprobs: int = 20, logprobs: bool = True, tokenize: bool = True,
                 vocab_shift: int = 0, max_model_len: int = 4096, tempered: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer, self.vocab, self.max_model_len = tokenizer, len(tokenizer), max_model_len
        self.tempered = tempered
        self.max_logprobs, self.logprobs, self.tokenize, self.vocab_shift = max_logprobs, logprobs, tokenize, vocab_shift
        self.scored: list[list[int]] = []  # every prompt scored with a 200

    def request_key(self, body: dict) -> tuple:
        prompt = body.get("prompt", body.get("input"))
        return (tuple(prompt) if isinstance(prompt, list) else prompt, body.get("prompt_logprobs"))

    def route(self, path: str):
        path = path.rstrip("/")
        if path == "/v1/completions":
            return self.completion
        if path == "/tokenize" and self.tokenize:
            return lambda body: (200, {"count": len(ids := self.ids(body["prompt"])), "tokens": ids,
                                       "max_model_len": self.max_model_len, "token_strs": None})
        return None

    def ids(self, text: str) -> list[int]:
        """The server's tokenizer: the student's, or with every id shifted (another vocabulary)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [(i + self.vocab_shift) % self.vocab for i in ids]

    def completion(self, body: dict) -> tuple[int, dict]:
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.ids(prompt)
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            return self.bad_request(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                    f"{self.max_logprobs}")
        if len(ids) + body.get("max_tokens", 16) > self.max_model_len:
            return self.bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                    f"you requested {len(ids) + body.get('max_tokens', 16)} tokens.")
        choice = {"index": 0, "text": " the", "logprobs": None, "finish_reason": "length", "stop_reason": None}
        if self.logprobs and k is not None:
            scale = 1 / body.get("temperature", 1.0) if self.tempered else 1.0
            choice["prompt_logprobs"] = [None] + [self.position(prev, token, k, scale)
                                                  for prev, token in zip(ids, ids[1:])]
        with self._lock:
            self.scored.append(ids)
        return 200, {"id": f"cmpl-{len(self.bodies)}", "object": "text_completion", "model": body.get("model"),
                     "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    @staticmethod
    def bad_request(message: str) -> tuple[int, dict]:
        return 400, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}

    def position(self, prev: int, token: int, k: int, scale: float = 1.0) -> dict:
        top, lps, _ = teacher_top(prev, k, self.vocab)
        entries = {i: (lp, j + 1) for j, (i, lp) in enumerate(zip(top, lps))}
        if token not in entries:
            order = ranked(prev, self.vocab)
            entries[token] = (teacher_logprob(prev, token, self.vocab),
                              order.index(token) + 1 if token in order else RANKED + 1)
        return {str(i): {"logprob": lp * scale, "rank": rank, "decoded_token": self.tokenizer.decode([i])}
                for i, (lp, rank) in entries.items()}
