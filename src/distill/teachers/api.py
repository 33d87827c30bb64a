"""A teacher behind an OpenAI-compatible chat API (DeepSeek, SiliconFlow, vLLM, llama.cpp).

Requests go through the official async ``openai`` client with its own retries off: this module
retries 408/429/5xx, timeouts and dropped connections with exponential backoff and jitter,
waiting what ``Retry-After`` asks when the server says. Any other 4xx (bad key, unknown model,
bad parameter) will fail the same way for every request, so it stops the run at once.
"""

from __future__ import annotations

import asyncio
import random
from email.utils import parsedate_to_datetime
from time import time

from distill.errors import DistillError
from distill.teachers.base import Completion, make_usage, split_reasoning, top_entry

_MAX_BACKOFF = 60.0
# httpx checks every pooled connection on each request; pools of a few connections keep that
# scan cheap (one pool of 32 cost a quarter of the client's CPU at 150 requests/s).
_CONNECTIONS_PER_CLIENT = 8
_MAX_RETRY_AFTER = 300.0


class RequestFailed(Exception):
    """A request that still failed after every retry; it goes to the errors file."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


class _BadResponse(Exception):
    """A 200 reply without a usable completion (retried like a server error)."""


def retryable_status(code: int) -> bool:
    return code in (408, 429) or code >= 500


def retry_after_seconds(headers) -> float | None:
    """Seconds the server asked us to wait (``Retry-After``/``retry-after-ms``), if it did."""
    if headers is None:
        return None
    if ms := headers.get("retry-after-ms"):
        try:
            return min(float(ms) / 1000, _MAX_RETRY_AFTER)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def backoff_seconds(attempt: int, base: float, retry_after: float | None = None) -> float:
    """``Retry-After`` plus up to 10% jitter if given, else ``base * 2**attempt`` with full jitter."""
    if retry_after is not None:
        return retry_after * random.uniform(1.0, 1.1)
    return random.uniform(0.5, 1.0) * min(_MAX_BACKOFF, base * 2 ** attempt)


def _status_message(err) -> str:
    body = err.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(err.message)


def _cause(err: BaseException) -> str:
    cause = err.__cause__ or err
    return f"{type(cause).__name__}: {cause}".strip().rstrip(":")


class ApiTeacher:
    """``async with ApiTeacher(...) as t: await t.complete(messages, seed, slot)`` -> (Completion, attempts).

    ``slot`` is the caller's worker number (0 .. concurrency-1); it picks the connection pool.
    """

    def __init__(self, *, base_url: str, model: str, api_key: str, api_key_env: str | None,
                 temperature: float, top_p: float, max_tokens: int, top_logprobs: int | None = None,
                 concurrency: int = 16, max_retries: int = 8, timeout: float = 600.0,
                 retry_backoff: float = 1.0):
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.top_logprobs = top_logprobs
        self.max_retries, self.timeout, self.retry_backoff = max_retries, timeout, retry_backoff
        self._api_key = api_key
        self._pools = -(-concurrency // _CONNECTIONS_PER_CLIENT)
        self.clients: list = []

    async def __aenter__(self) -> "ApiTeacher":
        import openai

        self.clients = [openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key,
                                           max_retries=0, timeout=self.timeout) for _ in range(self._pools)]
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.close()

    async def check(self) -> None:
        """Fail fast, in one line, on an unreachable endpoint or a rejected key."""
        import openai

        try:
            await self.clients[0].models.list(timeout=min(self.timeout, 15.0))
        except openai.APIConnectionError as e:
            raise DistillError(f"{self.base_url}: cannot reach the teacher endpoint ({_cause(e)})") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise DistillError(self._rejected(e)) from None
        except openai.APIStatusError:
            pass  # some servers have no /models; the first chat request will tell

    def _rejected(self, err) -> str:
        hint = f"; check ${self.api_key_env}" if self.api_key_env and err.status_code in (401, 403) else ""
        return (f"{self.base_url}: the teacher rejected the request with HTTP {err.status_code}: "
                f"{_status_message(err)}{hint} (model '{self.model}'; not retried)")

    async def complete(self, messages: list[dict], seed: int | None, slot: int = 0) -> tuple[Completion, int]:
        """One chat completion, retried as the module says.

        The body is posted as plain JSON through the client's documented low-level ``post`` and
        the reply read as JSON: typed request/response models cost a third of the client's CPU,
        which at 100+ requests/s is the throughput limit, and servers add fields of their own.
        """
        import httpx
        import openai

        client = self.clients[slot // _CONNECTIONS_PER_CLIENT % len(self.clients)]
        kwargs = dict(model=self.model, messages=messages, **self.sampling)
        if seed is not None:
            kwargs["seed"] = seed
        if self.top_logprobs:
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                response = await client.post("/chat/completions", body=kwargs, cast_to=httpx.Response)
                return self._parse(response), attempt + 1
            except openai.APIStatusError as e:
                if not retryable_status(e.status_code):
                    raise DistillError(self._rejected(e)) from None
                reason = f"HTTP {e.status_code}: {_status_message(e)}"
                wait = retry_after_seconds(e.response.headers)
            except openai.APITimeoutError:
                reason = f"timed out after {self.timeout:g} s"
            except openai.APIConnectionError as e:
                reason = f"connection error ({_cause(e)})"
            except _BadResponse as e:
                reason = f"bad response ({e})"
            if attempt == self.max_retries:
                raise RequestFailed(reason, attempt + 1)
            await asyncio.sleep(backoff_seconds(attempt, self.retry_backoff, wait))
        raise AssertionError("unreachable")

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
