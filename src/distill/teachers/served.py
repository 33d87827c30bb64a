"""A served teacher: a ``vllm serve`` or llama-cpp-python endpoint scores the student's tokens.

A 32B teacher does not fit beside the student, and traces written elsewhere were never scored
by the teacher we want; an inference server answers "what are your log-probs for these tokens"
for any tokens. :class:`ServedClient` asks it, for token ids in the student's tokenizer, for each
position's top-k log-probs and the log-prob of the actual next token (:class:`ScoredRows`).
:class:`ServedTeacher` puts that behind ``teachers.Teacher`` for training on the student's own
rollouts, and ``distill logits --teacher-url`` writes the offline cache from it. A teacher of another
tokenizer (:class:`AlignedServedTeacher`) is asked about its own tokens for the same text (for a
rollout: its tokenization of the student's sampled text), with the teacher's tokenizer in place of
the student's, and its rows are projected onto the student's positions (``teachers.align``).

Two servers, told apart once per run by :meth:`ServedClient.check`:

- **vLLM**: ``POST /v1/completions`` with the prompt as token ids, ``prompt_logprobs=K`` and
  ``max_tokens=1``. Each position comes back as ``{token id: {logprob, rank, ...}}`` holding the
  top K and the actual token: ids, nothing to map. ``vllm serve --max-logprobs`` caps K.
- **llama-cpp-python** (0.3.x; ``logits_all``, its server's default): its completions endpoint
  takes text only. The ids are sent as their text and ``POST /extras/tokenize`` must give exactly
  these ids back, else the sequence is refused (distill never lets a server re-tokenise).
  ``echo=True, logprobs=K, max_tokens=1`` then returns the prompt's ``top_logprobs``, keyed by
  each token's printed text, which :class:`PrintedVocab` maps back to ids exactly or leaves in
  the tail. Its quirks are handled in ``_echo_rows``, each where it applies.

The tokenizer is checked once per run on a probe text: the server's ``/tokenize`` (vLLM) or
``/extras/tokenize`` (llama-cpp-python) must give the student's ids; a server with neither gets a
round trip (the probe sent as text with ``prompt_logprobs=0``: the ids it scored). Requests are
async, ``concurrency`` in flight, and retried by the API teacher's rules (``teachers.endpoints``:
408/429/5xx, timeouts and dropped connections, ``Retry-After`` honoured); any other 4xx will
fail every time and stops the run in one line. Several base URLs (replicas of one server) share
the requests through the same ``teachers.endpoints.EndpointPool`` as the API teacher: fewest in
flight first, a failing one backed off and its request retried on another; each is checked.

Server log-probs are the model's own distribution (temperature 1). Rows are the cache's: the
top k (most likely first), padded to k with other ids at ``FLOOR``, and the log of the mass
outside them (``api_mapping`` does the same for API log-probs).
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distill.batching import batch_sequences
from distill.errors import DistillError
from distill.options import Endpoint
from distill.teachers.endpoints import (EndpointPool, RequestFailed, Retry, endpoint_urls, retry_after_seconds,
                                       retryable_status)
from distill.teachers.api_mapping import FLOOR, token_bytes

if TYPE_CHECKING:
    import torch

#: A conversation whose rendering exercises the tokenizer (template tokens, digits, LaTeX, code,
#: whitespace runs, accents, CJK, emoji) for the once-per-run tokenizer check.
PROBE = [
    {"role": "system", "content": "Tokenizer check."},
    {"role": "user", "content": "Prove 2^{10} = 1024;  then print(\"done\")\n\tnaïve café, 東京 🙂?"},
    {"role": "assistant", "content": "<think>\n1024 = 2 * 512.\n</think>\n\nSo $2^{10} = \\boxed{1024}$."},
]
PROBE_SCORED = 16        # tokens of the probe scored to check log-probs and the top-k limit
CHECK_RETRIES = 2        # a server failing the check this often is refused, not waited for
LIMIT = re.compile(r"max(?:imum)? allowed:?\s*(\d+)")  # vLLM: "... which is greater than max allowed: 20"


class Refused(DistillError):
    """A 4xx other than 408/429: the request is wrong and would fail again, so it is not retried."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url}: the teacher server refused the request with HTTP {status}: {message} (not retried)")
        self.status, self.message = status, message


class _BadResponse(Exception):
    """A 200 reply without the expected fields (retried like a server error)."""


@dataclass
class ScoredRows:
    """The teacher at some positions of a sequence; row i is its distribution over the token after position i.

    ``ids`` (T, k) int64 and ``logprobs`` (T, k) float32: the top k, most likely first, padded
    with other ids at ``FLOOR``; ``log_tail`` (T,): log of the probability outside them;
    ``sampled`` (T,): log-prob of the actual next token (nan where the server did not say);
    ``known`` (T,) bool: whether the server gave that position at all.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    sampled: torch.Tensor
    known: torch.Tensor

    @staticmethod
    def cat(parts: list["ScoredRows"]) -> "ScoredRows":
        import torch

        return ScoredRows(*(torch.cat(p) for p in zip(*(vars(r).values() for r in parts))))

    def sparse(self):
        """As KD's sparse teacher (top-k + tail bucket), the form the logits cache stores."""
        from distill.kd_losses import SparseTeacher

        return SparseTeacher(self.ids, self.logprobs, self.log_tail)


class PrintedVocab:
    """llama-cpp-python's printed token texts -> ids, only where the print names one token.

    It prints a token as ``detokenize([id], special=False).decode('utf-8', 'ignore')``: control
    tokens as '' and a byte fragment of a character as its valid part (often ''). Prints that
    several tokens share cannot be mapped; their probability stays in the tail.
    """

    def __init__(self, tokenizer):
        self.bytes = token_bytes(tokenizer)
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
        self.forms: list[set[str]] = []
        owners: dict[str, set[int]] = {}
        for i, raw in enumerate(self.bytes):
            forms = {raw.decode("utf-8", "ignore")} | ({""} if i in special else set())
            self.forms.append(forms)
            for form in forms:
                owners.setdefault(form, set()).add(i)
        self.ids = {form: next(iter(ids)) for form, ids in owners.items() if len(ids) == 1}

    def id_of(self, printed: str) -> int | None:
        return self.ids.get(printed)

    def text(self, ids: list[int]) -> str:
        return b"".join(self.bytes[i] for i in ids).decode("utf-8", "replace")


def _server_root(url: str) -> str:
    """The server's own routes (``/tokenize``) sit beside its OpenAI ``/v1``."""
    return re.sub(r"/v1$", "", url.rstrip("/"))


def first_mismatch(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def _error_message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return str(body)[:300]


class ServedClient:
    """``async with ServedClient(...) as c: await c.check(); rows = await c.score(ids, positions)``."""

    def __init__(self, *, base_url: str | list[str], model: str, top_k: int, tokenizer, student: str,
                 vocab_size: int, endpoint: Endpoint, role: str = "student"):
        """``tokenizer`` (named ``student``) is the one whose ids are scored: the student's, or with
        ``role="teacher"`` the teacher's own (a teacher of another tokenizer)."""
        urls = endpoint_urls(base_url, "--teacher-url")
        self.pool = EndpointPool(urls, max_retries=endpoint.max_retries, retry_backoff=endpoint.retry_backoff)
        self.base_url = ", ".join(url.rstrip("/") for url in urls)  # where messages say the server is
        self.model, self.top_k, self.student, self.vocab_size = model, top_k, student, vocab_size
        self.role = role
        self.tokenizer, self.concurrency, self.timeout = tokenizer, endpoint.concurrency, endpoint.request_timeout
        key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
        if endpoint.api_key_env and not key:
            raise DistillError(f"environment variable {endpoint.api_key_env} is not set (--api-key-env)")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}  # vllm serve --api-key
        self.vocab = PrintedVocab(tokenizer)
        self.bos = tokenizer.bos_token_id
        self.server: str | None = None   # "vllm" (token-id prompts) or "llama-cpp-python" (text prompts), set by check
        self.stats = Counter(requests=0, retries=0, bytes_received=0)
        self.http = None

    async def __aenter__(self) -> "ServedClient":
        import httpx

        self.http = httpx.AsyncClient(timeout=self.timeout, headers=self.headers, limits=httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self._slots = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    # ------------------------------------------------------------ requests

    async def _post(self, path: str, body: dict, parse=lambda data: data, *, at_root: bool = False,
                    missing_ok: bool = False, retries: int | None = None, tokens: int = 0):
        """POST ``path`` (under the base URL, or ``at_root`` under the server root) to an endpoint of the
        pool, retried by its rules; ``parse`` raising _BadResponse is retried too.

        ``missing_ok``: 404/405/422 return None (an endpoint this server does not have). ``tokens``:
        the tokens scored, counted for the endpoint that answers.
        """
        import httpx

        sent = 0

        async def attempt(endpoint):
            nonlocal sent
            sent += 1
            url = (_server_root(endpoint.url) if at_root else endpoint.url.rstrip("/")) + path
            self.stats["requests"] += 1
            try:
                response = await self.http.post(url, json=body)
            except httpx.TimeoutException:
                raise Retry(f"timed out after {self.timeout:g} s") from None
            except httpx.TransportError as e:
                raise Retry(f"connection error ({type(e).__name__}: {e})".replace(" ()", "")) from None
            self.stats["bytes_received"] += len(response.content)
            code = response.status_code
            if code == 200:
                try:
                    result = parse(response.json())
                    endpoint.tokens_in += tokens
                    return result
                except (ValueError, KeyError, IndexError, TypeError, _BadResponse) as e:
                    raise Retry(f"bad response ({type(e).__name__}: {e})") from None
            if missing_ok and code in (404, 405, 422):
                return None
            if not retryable_status(code):
                raise Refused(url, code, _error_message(response))
            raise Retry(f"HTTP {code}: {_error_message(response)}", retry_after_seconds(response.headers))

        try:
            result, _ = await self.pool.call(attempt, retries)
        except RequestFailed as e:
            url = (_server_root(e.url) if at_root else e.url.rstrip("/")) + path
            raise DistillError(f"{url}: the teacher server failed {e.attempts} times, last: {e.reason}") from None
        finally:
            self.stats["retries"] += sent - 1
        return result

    async def _tokenize(self, text: str, retries: int | None = None) -> tuple[str, list[int]] | None:
        """(server kind, the server's ids for ``text``) from its tokenize endpoint; None if it has none."""
        if self.server in (None, "vllm"):
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
            data = await self._post("/tokenize", body, at_root=True, missing_ok=True, retries=retries)
            if isinstance(data, dict) and isinstance(data.get("tokens"), list):
                return "vllm", data["tokens"]
        if self.server in (None, "llama-cpp-python"):
            body = {"model": self.model, "input": text}
            data = await self._post("/extras/tokenize", body, at_root=True, missing_ok=True, retries=retries)
            if isinstance(data, dict) and isinstance(data.get("tokens"), list):
                return "llama-cpp-python", data["tokens"]
        return None

    # ------------------------------------------------------------ the once-per-run check

    async def check(self) -> None:
        """Reachable, the student's tokenizer, log-probs, and top-k within the server's limit; else one line.

        Several endpoints are each checked and must be servers of one kind.
        """
        import httpx

        if len(self.pool.endpoints) > 1:
            pinned = [self._pinned(e.url) for e in self.pool.endpoints]
            await asyncio.gather(*(client.check() for client in pinned))
            kinds = {client.server for client in pinned}
            if len(kinds) > 1:
                raise DistillError("the teacher endpoints are different servers (" + ", ".join(
                    f"{c.base_url}: {c.server}" for c in pinned) + "); serve the teacher the same way on each")
            self.server = kinds.pop()
            return

        try:
            await self.http.get(f"{self.base_url}/models", timeout=min(self.timeout, 15.0))
        except httpx.TransportError as e:
            raise DistillError(f"{self.base_url}: cannot reach the teacher server ({type(e).__name__}: {e}); start "
                               f"it (README: 'KD with a served teacher') or check --teacher-url") from None
        text = self._probe_text()
        ours = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        found = await self._tokenize(text, retries=CHECK_RETRIES)
        self.server = found[0] if found else "vllm"
        if found:
            theirs = self._without_added_bos(found[1], ours)
            at = first_mismatch(ours, theirs)
        else:  # the round trip gives no id for the first token
            theirs = await self._round_trip(text)
            at = first_mismatch(ours[1:], theirs[1:])
            at = None if at is None else at + 1
        if at is not None:
            raise DistillError(self._other_tokenizer(ours, theirs, at))
        await self._probe_logprobs(ours[:PROBE_SCORED])

    def _pinned(self, url: str) -> "ServedClient":
        """This client on one of its endpoints only (sharing its connections and counts), to check that one."""
        pinned = copy.copy(self)
        pinned.base_url = url.rstrip("/")
        pinned.pool = EndpointPool([url], max_retries=self.pool.max_retries, retry_backoff=self.pool.retry_backoff)
        return pinned

    def _without_added_bos(self, theirs: list[int], ours: list[int]) -> list[int]:
        """The server's ids less the BOS llama.cpp adds itself where the GGUF says so (add_bos_token)."""
        return theirs[1:] if theirs[:1] == [self.bos] and len(theirs) == len(ours) + 1 else theirs

    def _probe_text(self) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(PROBE, tokenize=False)
            except Exception:  # noqa: BLE001  a template that refuses this conversation (a system turn, roles)
                pass
        return "\n\n".join(m["content"] for m in PROBE)

    async def _round_trip(self, text: str) -> list[int]:
        """A server without a tokenize endpoint: the probe as text, and the ids it scored (the first is not given)."""
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "prompt_logprobs": 0,
                "add_special_tokens": False}

        def scored_ids(data: dict) -> list[int]:
            entries = data["choices"][0].get("prompt_logprobs")
            if not entries:
                raise DistillError(self._no_logprobs())
            if any(len(e) != 1 for e in entries[1:]):
                raise _BadResponse("prompt_logprobs=0 gave more than the actual token")
            return [-1] + [int(next(iter(e))) for e in entries[1:]]

        return await self._post("/completions", body, scored_ids, retries=CHECK_RETRIES)

    async def _probe_logprobs(self, ids: list[int]) -> None:
        """One short scoring request: refuses a server without log-probs or with a lower top-k limit."""
        try:
            rows = await self.score(ids, retries=CHECK_RETRIES)
        except Refused as e:
            limit = LIMIT.search(e.message)
            if limit and int(limit.group(1)) < self.top_k:
                raise DistillError(
                    f"{self.base_url}: the server gives at most {limit.group(1)} log-probs per position, fewer than "
                    f"the top-{self.top_k} asked for; ask for --top-k {limit.group(1)} or fewer, or restart vLLM "
                    f"with --max-logprobs {self.top_k}") from None
            raise
        if not bool(rows.known.any()):
            raise DistillError(self._no_logprobs())

    def _no_logprobs(self) -> str:
        return (f"{self.base_url}: the server returned no log-probs for the prompt's tokens (model '{self.model}'), "
                f"so it cannot score tokens for KD; serve the teacher with vLLM (prompt_logprobs) or "
                f"llama-cpp-python (logits_all, its default)")

    def _other_tokenizer(self, ours: list[int], theirs: list[int], at: int) -> str:
        mine = f"id {ours[at]} {self.vocab.text([ours[at]])!r}" if at < len(ours) else "no more tokens"
        server = f"id {theirs[at]}" if at < len(theirs) else "no more tokens"
        after = f" (after {self.vocab.text(ours[max(0, at - 4):at])!r})" if at else ""
        advice = ("for a teacher of another tokenizer name it with --teacher-tokenizer (a directory or hub id), and "
                  "KD aligns the two" if self.role == "student" else
                  "give the served model's own tokenizer as the teacher's (--teacher-tokenizer)")
        return (f"{self.base_url}: the served model '{self.model}' tokenizes differently from {self.role} "
                f"'{self.student}': at token {at} of a probe text the server has {server} where the {self.role} has "
                f"{mine}{after}; {advice}")

    # ------------------------------------------------------------ scoring

    async def score(self, ids: list[int], positions: list[int] | None = None,
                    retries: int | None = None) -> ScoredRows:
        """The teacher at ``positions`` (default all) of ``ids``; position t is about token t + 1."""
        ids = [int(i) for i in ids]
        positions = list(range(len(ids) - 1)) if positions is None else [int(t) for t in positions]
        if positions and not 0 <= min(positions) <= max(positions) < len(ids) - 1:
            raise ValueError(f"positions must lie in 0..{len(ids) - 2}")
        async with self._slots:
            if self.server == "llama-cpp-python":
                rows = await self._score_text(ids, positions, retries)
            else:
                body = {"model": self.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": self.top_k,
                        "temperature": 1.0, "top_p": 1.0}
                rows = await self._post("/completions", body, lambda data: self._vllm_rows(data, ids, positions),
                                        retries=retries, tokens=len(ids))
        return self._pack(rows)

    def _vllm_rows(self, data: dict, ids: list[int], positions: list[int]) -> list:
        """vLLM: ``prompt_logprobs[t]`` is the distribution over token t (None for the first), keyed by id."""
        entries = data["choices"][0].get("prompt_logprobs")
        if entries is None:
            raise DistillError(self._no_logprobs())
        if len(entries) < len(ids):
            raise _BadResponse(f"prompt_logprobs for {len(entries)} of {len(ids)} tokens")
        rows = []
        for t in positions:
            entry = entries[t + 1]
            if entry is None:
                rows.append(None)
                continue
            found = {int(i): float(v["logprob"] if isinstance(v, dict) else v) for i, v in entry.items()}
            if len(found) < min(self.top_k, self.vocab_size):
                raise DistillError(f"{self.base_url}: the server returned {len(found)} log-probs per position where "
                                   f"top-{self.top_k} was asked for; ask for --top-k {len(found)} or fewer")
            rows.append((found, found.get(ids[t + 1], math.nan)))
        return rows

    async def _score_text(self, ids: list[int], positions: list[int], retries: int | None) -> list:
        """llama-cpp-python: the ids as text, checked to tokenise back to exactly these ids."""
        text = self.vocab.text(ids)
        _, prompt = await self._tokenize(text, retries)
        body_ids = self._without_added_bos(prompt, ids)  # with its own BOS the teacher sees that first
        at = first_mismatch(ids, body_ids)
        if at is not None:
            theirs = f"id {body_ids[at]}" if at < len(body_ids) else "no more tokens"
            raise DistillError(
                f"{self.base_url}: llama-cpp-python takes prompts as text and splits this {len(ids)}-token sequence "
                f"differently at token {at} ({theirs} where the student has id {ids[at]} "
                f"{self.vocab.text(ids[at:at + 1])!r}); distill never re-tokenises a sequence, so it cannot be scored "
                f"here; serve the teacher with vLLM, which takes token ids")
        body = {"model": self.model, "prompt": text, "echo": True, "logprobs": self.top_k, "max_tokens": 1,
                "temperature": 0.0}
        return await self._post("/completions", body, lambda data: self._echo_rows(data, prompt, ids, positions),
                                retries=retries, tokens=len(ids))

    def _echo_rows(self, data: dict, prompt: list[int], ids: list[int], positions: list[int]) -> list:
        """llama-cpp-python 0.3.x ``echo`` log-probs -> rows, with its quirks.

        It evaluates ``prompt`` (= ids, or its BOS + ids) and lists one entry per token, where
        entry j pairs token ``prompt[j]`` with the distribution computed *after* token
        ``prompt[j - strip]``, ``strip`` being 1 when it dropped a leading BOS from the list
        (the SmolLM2/ChatML case: the chat text starts with BOS) and 0 otherwise. So:

        - quirk 1: tokens equal to BOS anywhere get no entry (``if token == bos: continue``);
        - quirk 2 (strip = 0, e.g. a prompt without a leading BOS): each entry's ``token_logprobs``
          is its own token's log-prob one position later, not its log-prob; only its top-k are
          trusted (they are the distribution over the next token), and the actual token's log-prob
          is read from them where it is among them (else unknown);
        - quirk 3: the first listed entry has no log-probs (set to None, "as OpenAI does");
        - quirk 4: ``top_logprobs`` also holds the entry's own token with its ``token_logprobs``
          value (same distribution, so harmless), keyed by text; prints shared by several tokens
          ('' for control tokens and most byte fragments) cannot be mapped and stay in the tail.

        The printed tokens are checked against ``prompt`` first, so a server that lists entries
        otherwise is refused rather than misread; where the entry's token is the actual token
        (strip = 1), its ``token_logprobs`` is checked against its top-k value.
        """
        logprobs = data["choices"][0].get("logprobs") or {}
        tops, printed, token_lps = logprobs.get("top_logprobs"), logprobs.get("tokens"), logprobs.get("token_logprobs")
        if tops is None or printed is None:
            raise DistillError(self._no_logprobs())
        strip = int(prompt[0] == self.bos)
        listed = [j for j in range(strip, len(prompt)) if prompt[j] != self.bos]  # quirk 1
        if len(printed) < len(listed) or len(tops) < len(listed):
            raise _BadResponse(f"{len(printed)} echoed tokens for a {len(prompt)}-token prompt")
        for entry, j in enumerate(listed):
            if printed[entry] not in self.vocab.forms[prompt[j]]:
                raise DistillError(
                    f"{self.base_url}: the server echoed token {j} as {printed[entry]!r} where "
                    f"{self.vocab.text(prompt[j:j + 1])!r} was expected: its response layout is not the one this "
                    f"adapter reads (llama-cpp-python 0.3.x), so its log-probs cannot be placed")
        offset = len(prompt) - len(ids)
        entry_for = {j - strip - offset: entry for entry, j in enumerate(listed)}
        rows = []
        for t in positions:
            entry = entry_for.get(t)
            if entry is None or tops[entry] is None:  # quirks 1 and 3
                rows.append(None)
                continue
            found = {}
            for text, lp in tops[entry].items():
                if (i := self.vocab.id_of(text)) is not None:
                    found[i] = float(lp)
            actual = ids[t + 1]
            if strip:  # the entry's token is the actual token: token_logprobs is its log-prob
                sampled = float(token_lps[entry])
                if abs(found.get(actual, sampled) - sampled) > 1e-4:
                    raise DistillError(
                        f"{self.base_url}: the server's token_logprobs ({sampled:.4f}) and its top_logprobs "
                        f"({found[actual]:.4f}) disagree at token {t + 1}: its log-probs are not laid out as this "
                        f"adapter reads them (llama-cpp-python 0.3.x)")
                found[actual] = sampled
            else:  # quirk 2
                sampled = found.get(actual, math.nan)
            rows.append((found, sampled))
        return rows

    def _pack(self, rows: list) -> ScoredRows:
        """(found {id: log-prob}, sampled log-prob) or None per position -> top-k tensors."""
        import torch

        k = self.top_k
        ids = torch.zeros(len(rows), k, dtype=torch.int64)
        logprobs = torch.full((len(rows), k), FLOOR, dtype=torch.float32)
        log_tail = torch.zeros(len(rows), dtype=torch.float32)
        sampled = torch.full((len(rows),), math.nan, dtype=torch.float32)
        known = torch.zeros(len(rows), dtype=torch.bool)
        for r, row in enumerate(rows):
            if row is None:
                ids[r] = torch.arange(k)
                continue
            found, sampled[r] = row
            known[r] = True
            if (bad := next((i for i in found if not 0 <= i < self.vocab_size), None)) is not None:
                raise DistillError(f"{self.base_url}: the server returned token id {bad}, outside the vocabulary of "
                                   f"{self.role} '{self.student}' ({self.vocab_size} rows): another tokenizer")
            kept = sorted(found.items(), key=lambda a: -a[1])[:k]
            tail = 1.0 - math.fsum(math.exp(lp) for _, lp in kept)
            log_tail[r] = math.log(tail) if tail > math.exp(FLOOR) else FLOOR
            pad = (i for i in range(self.vocab_size) if i not in found)
            kept += [(next(pad), FLOOR) for _ in range(k - len(kept))]
            ids[r] = torch.tensor([i for i, _ in kept], dtype=torch.int64)
            logprobs[r] = torch.tensor([lp for _, lp in kept])
        return ScoredRows(ids, logprobs, log_tail, sampled, known)


class ServedTeacher:
    """``teachers.Teacher`` backed by a served model; its requests run on a background event loop.

    - ``scores(inputs, mask, example_index)`` -> ``kd_losses.SparseTeacher`` (top-k + tail bucket)
      at the batch's target positions, rows in batch order (padded or packed batches);
    - ``sampled_logprobs(inputs, mask)`` -> (targets,) tensor: the teacher's log-prob of each
      actual target token (for the sampled-token estimator log p_s(y) - log p_t(y), also with
      ``top_k=0`` where a server gives only that);
    - ``submit(inputs, mask)`` -> ``concurrent.futures.Future`` of the batch's :class:`ScoredRows`,
      to start scoring while the student works (the two above wait on it).
    """

    def __init__(self, *, base_url: str | list[str], model: str, top_k: int, tokenizer, student: str,
                 vocab_size: int, endpoint: Endpoint, role: str = "student"):
        self.client = ServedClient(base_url=base_url, model=model, top_k=top_k, tokenizer=tokenizer,
                                   student=student, vocab_size=vocab_size, endpoint=endpoint, role=role)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="served-teacher", daemon=True)
        self._thread.start()
        try:
            self._run(self.client.__aenter__())
            self._run(self.client.check())  # once per run
        except BaseException:
            self.close()
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, inputs: dict, mask, example_index=None):
        """Start scoring a batch; the future's result is its :class:`ScoredRows` (target rows, batch order)."""
        return self.submit_sequences(batch_sequences({k: v.cpu() if hasattr(v, "cpu") else v
                                                      for k, v in inputs.items()}, mask.cpu()))

    def submit_sequences(self, sequences: list[tuple[list[int], list[int]]]):
        """Start scoring (token ids, positions) pairs; a future of their :class:`ScoredRows`, in order."""
        async def score_all() -> ScoredRows:
            parts = await asyncio.gather(*(self.client.score(ids, positions) for ids, positions in sequences))
            rows = ScoredRows.cat(parts)
            if not bool(rows.known.all()):
                raise DistillError(f"{self.client.base_url}: the server gives no log-probs for "
                                   f"{int((~rows.known).sum())} target positions (llama-cpp-python omits a "
                                   f"sequence's first position and every BOS token)")
            return rows

        return asyncio.run_coroutine_threadsafe(score_all(), self._loop)

    def scores(self, inputs: dict, mask, example_index=None, index=None, scored=None):
        """The teacher at the batch's target positions (on ``mask``'s device): a sparse teacher (top-k
        plus tail), or with ``top_k=0`` one known only by the target tokens' log-probs. ``index`` is
        not needed: the server's rows come in ``mask``'s order."""
        if self.client.top_k < 1:
            from distill.kd_losses import SampledTokenTeacher

            return SampledTokenTeacher(self.sampled_logprobs(inputs, mask, scored))
        rows = (scored or self.submit(inputs, mask)).result()
        return ScoredRows(*(x.to(mask.device) for x in vars(rows).values())).sparse()

    def sampled_logprobs(self, inputs: dict, mask, scored=None):
        """log p_teacher(actual token) at each target position, in batch order (nan: the server did not say)."""
        return (scored or self.submit(inputs, mask)).result().sampled.to(mask.device)

    def close(self) -> None:
        if self.client.http is not None:
            self._run(self.client.__aexit__())
            self.client.http = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class AlignedServedTeacher:
    """A served teacher of another tokenizer: per batch the server scores the teacher's own tokens for
    the same text (``align.TeacherSide``: its chat template; for a rollout, vLLM's ``prompt_logprobs``
    of the teacher's tokenization of the student's sampled text), the actual token's log-prob (which
    vLLM always gives) goes into each row's top-k, and the rows are projected onto the student's target
    positions (``align.project``). The server is checked to tokenize as the teacher's tokenizer does."""

    def __init__(self, served: ServedTeacher, side, student_rows: int):
        import torch

        from distill.teachers.align import vocabulary_map

        self.served, self.side, self.student_rows = served, side, student_rows
        self.vocab_map = torch.from_numpy(vocabulary_map(side.teacher, side.student, served.client.vocab_size))

    @property
    def counts(self):
        """The student tokens taught so far by kind (``align.describe`` says it in a line)."""
        return self.side.counts

    @classmethod
    def connect(cls, *, side, student_rows: int, base_url: str | list[str], model: str, top_k: int,
                endpoint: Endpoint) -> "AlignedServedTeacher":
        if top_k < 1:
            raise DistillError("a served teacher of another tokenizer needs its top-k (--top-logprobs 1 or more): "
                               "the sampled-token estimator compares log-probs of one token, and the two tokenizers' "
                               "tokens differ")
        tokenizer = side.teacher_tokenizer
        served = ServedTeacher(base_url=base_url, model=model, top_k=top_k, tokenizer=tokenizer,
                               student=side.teacher.name, vocab_size=len(tokenizer), role="teacher", endpoint=endpoint)
        return cls(served, side, student_rows)

    def scores(self, inputs: dict, mask, example_index=None, index=None):
        import numpy as np
        import torch

        from distill.teachers.align import TeacherSide, project, with_realized

        sequences = self.side.sequences(inputs, mask, example_index)
        scored = self.served.submit_sequences([(s.ids, s.positions) for s in sequences]).result()
        realized = torch.from_numpy(np.concatenate([s.realized for s in sequences]).astype(np.int64))
        rows = with_realized(scored.ids, scored.logprobs, scored.log_tail, realized, scored.sampled)
        plan = TeacherSide.plan(sequences, one_hot=example_index is not None, index=index)
        device = mask.device
        rows = type(rows)(*(x.to(device) for x in vars(rows).values()))
        return project(rows, plan, self.vocab_map.to(device), self.student_rows)

    def close(self) -> None:
        self.served.close()
