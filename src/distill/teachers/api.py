"""A teacher behind an OpenAI-compatible chat API (DeepSeek, SiliconFlow, vLLM, llama.cpp).

Requests go through the official async ``openai`` client with its own retries off: 408/429/5xx,
timeouts and dropped connections are retried by ``teachers.endpoints`` (exponential backoff with
jitter, ``Retry-After`` honoured, another endpoint first where ``--teacher-url`` names several). Any
other 4xx (bad key, unknown model, bad parameter) will fail the same way for every request, so
it stops the run at once.
"""

from __future__ import annotations

import asyncio

from distill.errors import DistillError
from distill.options import Endpoint, Sampling
from distill.teachers.base import Completion, make_usage, split_reasoning, top_entry
from distill.teachers.endpoints import EndpointPool, Retry, endpoint_urls, retry_after_seconds, retryable_status

# httpx checks every pooled connection on each request; pools of a few connections keep that
# scan cheap (one pool of 32 cost a quarter of the client's CPU at 150 requests/s).
_CONNECTIONS_PER_CLIENT = 8


class _BadResponse(Exception):
    """A 200 reply without a usable completion (retried like a server error)."""


def _status_message(err) -> str:
    body = err.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(err.message)


def _cause(err: BaseException) -> str:
    cause = err.__cause__ or err
    return f"{type(cause).__name__}: {cause}".strip().rstrip(":")


class ApiTeacher:
    """``async with ApiTeacher(...) as t: await t.complete(messages, seed, slot)`` -> (Completion, endpoint URL).

    ``base_url`` is one URL or several serving the same model (``teachers.endpoints`` picks one per
    attempt and keeps each one's counts in ``pool``). ``slot`` is the caller's worker number
    (0 .. concurrency-1); it picks the connection pool.
    """

    def __init__(self, *, base_url: str | list[str], model: str, api_key: str, api_key_env: str | None,
                 sampling: Sampling, endpoint: Endpoint, top_logprobs: int | None = None):
        self.model, self.api_key_env = model, api_key_env
        self.sampling = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens}
        if sampling.top_k:  # not OpenAI's; vLLM, SGLang and llama.cpp servers take it
            self.sampling["top_k"] = sampling.top_k
        self.top_logprobs = top_logprobs
        self.timeout = endpoint.request_timeout
        self.pool = EndpointPool(endpoint_urls(base_url, "--teacher-url"), max_retries=endpoint.max_retries,
                                 retry_backoff=endpoint.retry_backoff)
        self._api_key = api_key
        self._pools = -(-endpoint.concurrency // _CONNECTIONS_PER_CLIENT)
        self.clients: dict[str, list] = {}  # endpoint URL -> its clients

    async def __aenter__(self) -> "ApiTeacher":
        import openai

        self.clients = {e.url: [openai.AsyncOpenAI(base_url=e.url, api_key=self._api_key, max_retries=0,
                                                   timeout=self.timeout) for _ in range(self._pools)]
                        for e in self.pool.endpoints}
        return self

    async def __aexit__(self, *exc) -> None:
        for clients in self.clients.values():
            for client in clients:
                await client.close()

    async def check(self) -> None:
        """Fail fast, in one line, on an unreachable endpoint or a rejected key (every endpoint is asked)."""
        await asyncio.gather(*(self._check(url) for url in self.clients))

    async def _check(self, url: str) -> None:
        import openai

        try:
            await self.clients[url][0].models.list(timeout=min(self.timeout, 15.0))
        except openai.APIConnectionError as e:
            raise DistillError(f"{url}: cannot reach the teacher endpoint ({_cause(e)})") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise DistillError(self._rejected(e, url)) from None
        except openai.APIStatusError:
            pass  # some servers have no /models; the first chat request will tell

    def _rejected(self, err, url: str) -> str:
        hint = f"; check ${self.api_key_env}" if self.api_key_env and err.status_code in (401, 403) else ""
        return (f"{url}: the teacher rejected the request with HTTP {err.status_code}: "
                f"{_status_message(err)}{hint} (model '{self.model}'; not retried)")

    async def complete(self, messages: list[dict], seed: int | None, slot: int = 0) -> tuple[Completion, str]:
        """One chat completion, retried as ``teachers.endpoints`` says; also the URL that answered.

        The body is posted as plain JSON through the client's documented low-level ``post`` and
        the reply read as JSON: typed request/response models cost a third of the client's CPU,
        which at 100+ requests/s is the throughput limit, and servers add fields of their own.
        """
        import httpx
        import openai

        kwargs = dict(model=self.model, messages=messages, **self.sampling)
        if seed is not None:
            kwargs["seed"] = seed
        if self.top_logprobs:
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)

        async def attempt(endpoint) -> Completion:
            client = self.clients[endpoint.url][slot // _CONNECTIONS_PER_CLIENT % self._pools]
            try:
                completion = self._parse(await client.post("/chat/completions", body=kwargs, cast_to=httpx.Response))
            except openai.APIStatusError as e:
                if not retryable_status(e.status_code):
                    raise DistillError(self._rejected(e, endpoint.url)) from None
                wait = retry_after_seconds(e.response.headers)
                raise Retry(f"HTTP {e.status_code}: {_status_message(e)}", wait) from None
            except openai.APITimeoutError:
                raise Retry(f"timed out after {self.timeout:g} s") from None
            except openai.APIConnectionError as e:
                raise Retry(f"connection error ({_cause(e)})") from None
            except _BadResponse as e:
                raise Retry(f"bad response ({e})") from None
            endpoint.tokens_in += completion.usage["prompt_tokens"]
            endpoint.tokens_out += completion.usage["completion_tokens"]
            return completion

        completion, endpoint = await self.pool.call(attempt)
        return completion, endpoint.url

    def _parse(self, response) -> Completion:
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _BadResponse(f"no completion in the reply: {type(e).__name__}: {e}") from None
        channel = message.get("reasoning_content") or message.get("reasoning")
        reasoning, answer = split_reasoning(message.get("content"), channel if isinstance(channel, str) else None)
        usage = data.get("usage") or {}
        return Completion(
            reasoning=reasoning,
            answer=answer,
            finish_reason=choice.get("finish_reason") or "unknown",
            usage=make_usage(usage.get("prompt_tokens"), usage.get("completion_tokens")),
            top_logprobs=self._logprobs(choice) if self.top_logprobs else None,
        )

    def _logprobs(self, choice: dict) -> list[dict] | None:
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            return None
        k = self.top_logprobs
        return [top_entry(t["token"], t["logprob"],
                          [(a["token"], a["logprob"], a.get("bytes")) for a in t.get("top_logprobs") or []][:k],
                          t.get("bytes"))
                for t in content]
