"""An OpenAI-compatible chat server that misbehaves on purpose, for ``distill generate`` tests.

Each request is keyed by its user message and seed; the key's hash picks a fault schedule from
``schedules`` and attempt *i* of that key suffers fault *i* of it, then succeeds. So every
fault type is hit, retries are what fix it, and a rerun sees the same behaviour. Faults:

- ``429``: Too Many Requests with ``Retry-After: <retry_after>``
- ``500``: an internal server error
- ``slow``: answers after ``slow_seconds`` (longer than the client's timeout in tests), unless the
  client hangs up first (then it is no longer in flight: ``max_in_flight`` counts open requests)
- ``drop``: closes the connection without answering

The chain of thought comes back the way ``reasoning`` says: ``reasoning_content`` (DeepSeek),
``reasoning`` (vLLM), ``think`` (inline ``<think>…</think>``) or ``none``. With ``api_key``
set, other keys get 401; a model other than ``model`` gets 404.

    python tests/servers/fault_server.py --port 8012 --latency 0.2 --no-faults   # the benchmark
"""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import socket
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from http_base import BackgroundServer

DEFAULT_SCHEDULES = ([], ["429"], ["500", "500"], [], ["slow"], ["drop"], ["429", "drop"], [])
REASONING = "Let me think. 6 times 7 is 42."
ANSWER = "The answer is $\\boxed{42}$."


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of new connections must not overflow the listen backlog


class FaultServer(BackgroundServer):
    def __init__(self, *, schedules=DEFAULT_SCHEDULES, latency: float = 0.0, retry_after: str = "1",
                 slow_seconds: float = 3.0, reasoning: str = "reasoning_content",
                 api_key: str | None = None, model: str = "fault-model", always_fail: str | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        self.schedules = [list(s) for s in schedules] or [[]]
        self.latency, self.retry_after, self.slow_seconds = latency, retry_after, slow_seconds
        self.reasoning, self.api_key, self.model = reasoning, api_key, model
        self.always_fail = always_fail  # user messages containing this always get a 500
        self.attempts: Counter = Counter()
        self.faults: Counter = Counter()
        self.completed: Counter = Counter()  # key -> 200 replies sent
        self.last_429: dict = {}
        self.retry_gaps: list[float] = []  # seconds between a 429 and that key's next attempt
        self.bodies: list[dict] = []  # chat requests that got past auth and model checks
        self.posts = 0  # every chat request
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.httpd = _Server((host, port), self._handler())

    def request_key(self, body: dict) -> tuple:
        """What identifies a request across its retries: the user message and the seed."""
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        return user, body.get("seed")

    def route(self, path: str):
        """The answer for a POST path: ``body -> (status, JSON)``; None for no such route."""
        if path.endswith("/chat/completions"):
            return lambda body: (200, self.completion(body))
        return None

    def plan(self, body: dict) -> tuple[tuple, str | None]:
        """(key, fault for this attempt or None); counts the attempt."""
        key = self.request_key(body)
        now = time.monotonic()
        with self._lock:
            self.bodies.append(body)
            attempt = self.attempts[key]
            self.attempts[key] += 1
            if key in self.last_429:
                self.retry_gaps.append(now - self.last_429.pop(key))
        if self.always_fail and self.always_fail in str(key[0]):
            return key, "500"
        digest = int(hashlib.sha256(json.dumps(key).encode()).hexdigest(), 16)
        schedule = self.schedules[digest % len(self.schedules)]
        return key, schedule[attempt] if attempt < len(schedule) else None

    def completion(self, body: dict) -> dict:
        message = {"role": "assistant", "content": ANSWER}
        if self.reasoning in ("reasoning_content", "reasoning"):
            message[self.reasoning] = REASONING
        elif self.reasoning == "think":
            message["content"] = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        tokens = message["content"].split() + message.get(self.reasoning, "").split()
        if body.get("logprobs") and body.get("top_logprobs"):
            k = int(body["top_logprobs"])
            choice["logprobs"] = {"content": [
                {"token": t, "logprob": -0.5, "bytes": None,
                 "top_logprobs": [{"token": t if j == 0 else f"alt{j}", "logprob": -0.5 - j, "bytes": None}
                                  for j in range(k + 1)]}  # one more than asked, as llama.cpp does
                for t in tokens]}
        return {"id": f"chatcmpl-{len(self.bodies)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10 + len(tokens)}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # reply headers and body go out at once, as a real server does
            protocol_version = "HTTP/1.1"  # keep-alive, like real API servers

            def log_message(self, *args):
                pass

            def reply(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                 **(headers or {})}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (timeout): fine

            def error(self, code: int, message: str, headers: dict | None = None) -> None:
                self.reply(code, {"error": {"message": message, "type": "fault", "code": code}}, headers)

            def authorised(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self.error(401, "Authentication Fails, Your api key is invalid")
                    return False
                return True

            def do_GET(self):
                if not self.authorised():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self.reply(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self.error(404, f"no route {self.path}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server._lock:
                    server.posts += 1
                if not self.authorised():
                    return
                respond = server.route(self.path)
                if respond is None:
                    return self.error(404, f"no route {self.path}")
                if body.get("model") != server.model:
                    return self.error(404, f"Model Not Exist: {body.get('model')}")
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.answer(body, respond)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def answer(self, body: dict, respond) -> None:
                key, fault = server.plan(body)
                if fault:
                    with server._lock:
                        server.faults[fault] += 1
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "slow":
                    # late, but a client that gives up first hangs up: then nothing is in flight any more
                    if select.select([self.connection], [], [], server.slow_seconds)[0]:
                        self.close_connection = True
                        return
                else:
                    time.sleep(server.latency)
                if fault == "429":
                    with server._lock:
                        server.last_429[key] = time.monotonic()
                    return self.error(429, "Rate limit reached", {"Retry-After": server.retry_after})
                if fault == "500":
                    return self.error(500, "Internal server error (injected)")
                status, reply = respond(body)
                if status == 200:
                    with server._lock:
                        server.completed[key] += 1
                self.reply(status, reply)

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--no-faults", action="store_true", help="answer every request (benchmarks)")
    parser.add_argument("--reasoning", default="reasoning_content",
                        choices=["reasoning_content", "reasoning", "think", "none"])
    args = parser.parse_args()
    server = FaultServer(schedules=[[]] if args.no_faults else DEFAULT_SCHEDULES, latency=args.latency,
                         reasoning=args.reasoning, host=args.host, port=args.port)
    print(f"serving {server.base_url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
