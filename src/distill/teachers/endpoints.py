"""Several endpoints serving one model: which one gets a request, retries, and what each did.

``--teacher-url`` (``--model-url`` in eval) may name several OpenAI-compatible endpoints (replicas of ``vllm serve``, or
providers serving the same model). Each attempt goes to the open endpoint with the fewest
requests in flight (ties: the one asked least), so a slow replica gets less work without any
tuning. An attempt that fails in a retryable way (408/429/5xx, timeout, dropped connection, a
reply without a completion) counts against its endpoint: the endpoint is closed for an
exponential back-off (``retry_backoff * 2**(failures in a row - 1)``, jittered, capped at
:data:`MAX_BACKOFF`, at least what ``Retry-After`` asks), then takes one probe request at a time
until a success reopens it. The request itself is retried at once on another open endpoint; only
when there is none does it wait its own back-off, so with one URL retries behave as they always
did. A request is sent to one endpoint at a time and returned once, so no sample is lost or
written twice; after ``max_retries`` retries it fails with :class:`RequestFailed`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import monotonic, time
from typing import Awaitable, Callable, TypeVar

from distill.errors import DistillError

MAX_BACKOFF = 60.0
_MAX_RETRY_AFTER = 300.0

T = TypeVar("T")


class RequestFailed(Exception):
    """A request that still failed after every retry (``url``: where it failed last); it goes to the errors file."""

    def __init__(self, reason: str, attempts: int, url: str):
        super().__init__(reason)
        self.reason, self.attempts, self.url = reason, attempts, url


class Retry(Exception):
    """One failed attempt worth another (elsewhere when there is an elsewhere)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


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
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF, base * 2 ** attempt)


def endpoint_urls(value, source: str) -> list[str]:
    """``--teacher-url`` / ``--model-url`` / a preset's ``base_url``: one URL, comma-separated URLs, or a YAML list."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DistillError(f"{source}: field 'base_url' must be a URL or a list of URLs, got {value!r}")
    urls = [v.strip() for v in value if v.strip()]
    if len(set(urls)) < len(urls):
        raise DistillError(f"{source}: field 'base_url' lists an endpoint twice: {', '.join(urls)}")
    return urls


@dataclass
class Endpoint:
    """One URL and what it did this run; ``in_flight``, ``down_until`` and ``failing`` steer the choice."""

    url: str
    requests: int = 0         # attempts sent
    failures: int = 0         # attempts that failed (retryable)
    answered: int = 0         # attempts that succeeded
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0      # summed latency of the successful attempts
    in_flight: int = 0
    failing: int = 0          # failures in a row
    down_until: float = 0.0   # monotonic time the back-off ends

    def is_open(self, now: float) -> bool:
        return now >= self.down_until and (not self.failing or not self.in_flight)

    def summary(self) -> dict:
        return {"url": self.url, "requests": self.requests, "failures": self.failures,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "mean_latency_s": round(self.seconds / self.answered, 4) if self.answered else None}


class EndpointPool:
    """``result, endpoint = await pool.call(attempt)``: ``attempt(endpoint)`` sends one request there
    and returns its result, raises :class:`Retry` for a retryable failure, or anything else to stop."""

    def __init__(self, urls: list[str], *, max_retries: int = 8, retry_backoff: float = 1.0):
        self.endpoints = [Endpoint(url) for url in urls]
        self.max_retries, self.retry_backoff = max_retries, retry_backoff

    def pick(self) -> Endpoint:
        """The open endpoint with the fewest requests in flight; when none is open, the first to reopen."""
        now = monotonic()
        candidates = [e for e in self.endpoints if e.is_open(now)]
        if not candidates:
            return min(self.endpoints, key=lambda e: (e.down_until, e.in_flight, e.requests))
        return min(candidates, key=lambda e: (e.in_flight, e.requests))

    async def call(self, attempt: Callable[[Endpoint], Awaitable[T]],
                   max_retries: int | None = None) -> tuple[T, Endpoint]:
        max_retries = self.max_retries if max_retries is None else max_retries
        for tries in range(1, max_retries + 2):
            endpoint = self.pick()
            endpoint.requests += 1
            endpoint.in_flight += 1
            started = monotonic()
            try:
                result = await attempt(endpoint)
            except Retry as e:
                self._failed(endpoint, e.retry_after)
                failure = e
            else:
                endpoint.failing = 0
                endpoint.answered += 1
                endpoint.seconds += monotonic() - started
                return result, endpoint
            finally:
                endpoint.in_flight -= 1
            if tries > max_retries:
                raise RequestFailed(failure.reason, tries, endpoint.url)
            if not any(e.is_open(monotonic()) for e in self.endpoints if e is not endpoint):
                await asyncio.sleep(backoff_seconds(tries - 1, self.retry_backoff, failure.retry_after))
        raise AssertionError("unreachable")

    def _failed(self, endpoint: Endpoint, retry_after: float | None) -> None:
        endpoint.failures += 1
        endpoint.failing += 1
        wait = backoff_seconds(endpoint.failing - 1, self.retry_backoff)
        endpoint.down_until = monotonic() + max(wait, retry_after or 0.0)

    def summary(self) -> list[dict]:
        return [e.summary() for e in self.endpoints]
