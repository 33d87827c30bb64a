"""A small OpenAI-compatible chat server for eval tests and the eval overhead benchmark.

It answers from a script: for each problem (matched by the start of the user message) a list of
final answers, one per sample; sample i is picked by the request's ``seed`` (``seed - base_seed``),
so the test knows exactly how many of the k samples are right, and a client that sent the same
seed k times would get the same answer k times. ``null`` in the list means a response cut off
before any answer (``finish_reason: "length"``). Every request's seed is kept in ``seen``.

    python tests/servers/eval_server.py --script script.json --port 8011 --latency 0.05
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from http_base import BackgroundServer


class EvalServer(BackgroundServer):
    def __init__(self, script: dict, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0):
        self.script = script
        self.latency = latency
        self.seen: list[dict] = []  # {"problem", "seed", "max_tokens", "temperature", "top_p"}
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True

    def answer(self, body: dict) -> dict:
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        problem = next((p for p in self.script["problems"] if user.startswith(p)), None)
        seed = body.get("seed")
        with self._lock:
            self.seen.append({"problem": problem, "seed": seed, "max_tokens": body.get("max_tokens"),
                              "temperature": body.get("temperature"), "top_p": body.get("top_p")})
        answers = self.script["problems"].get(problem) or [self.script.get("default", "0")]
        index = (seed - self.script.get("base_seed", 0)) if seed is not None else 0
        final = answers[index % len(answers)]
        if final is None:
            text, finish, tokens = "<think>\nLet me think about this. " * 8, "length", body.get("max_tokens", 1)
        else:
            text = f"<think>\nWorking it out.\n</think>\n\nThe final answer is $\\boxed{{{final}}}$."
            finish, tokens = "stop", len(text.split())
        return {
            "id": f"chatcmpl-{len(self.seen)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": tokens,
                      "total_tokens": len(user.split()) + tokens},
        }

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    model = {"id": server.script.get("model", "test-model"), "object": "model"}
                    if server.script.get("max_model_len"):
                        model["max_model_len"] = server.script["max_model_len"]
                    self._send(200, {"object": "list", "data": [model]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if server.latency:
                    time.sleep(server.latency)
                self._send(200, server.answer(body))

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", required=True, help="JSON: {problems: {prefix: [answers]}, base_seed, model, max_model_len}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args()
    with open(args.script) as f:
        server = EvalServer(json.load(f), args.latency, args.host, args.port)
    print(f"serving {server.base_url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
