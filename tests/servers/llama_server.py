"""Start the real llama-cpp-python OpenAI-compatible server on 127.0.0.1 for API-teacher tests.

If the server dies (a llama.cpp built for another CPU dies with SIGILL on its first matrix
multiply), ``check`` fails the test with its exit signal and the tail of its log, instead of
leaving distill's "cannot reach the teacher endpoint" three layers up as the only clue.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

LOG_TAIL_LINES = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """``with LlamaCppServer(gguf) as server:`` serves ``server.base_url`` once /v1/models answers."""

    def __init__(self, gguf: Path, n_ctx: int = 2048, timeout: float = 120.0):
        self.gguf, self.n_ctx, self.timeout = Path(gguf), n_ctx, timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = self.gguf.parent / f"llama-server-{self.port}.log"

    def __enter__(self) -> "LlamaCppServer":
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(self.n_ctx)],
            stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check()
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not start in {self.timeout:.0f} s\n{self.log_tail()}")
                time.sleep(0.25)

    def check(self) -> None:
        """Fail the running test if the server process has died."""
        code = self.proc.poll()
        if code is None:
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        hint = (" (SIGILL: llama.cpp was built for another CPU; scripts/setup.sh builds it portably)"
                if code in (-signal.SIGILL, 128 + signal.SIGILL) else "")
        pytest.fail(f"llama_cpp.server died with {how}{hint}\n{self.log_tail()}", pytrace=False)

    def log_tail(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"last {len(lines)} lines of {self.log_path}:\n" + "\n".join(lines)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
