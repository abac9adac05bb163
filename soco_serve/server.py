"""Start and stop a real ``vllm serve`` on 127.0.0.1: a harness for scripts, tests and benchmarks
(the demo, the server tests, ``benchmarks/serving.py``), not part of the plugin.

CPU defaults, and why (the figures are in the platform notes and docs/results.md):

* ``--dtype float32``: such CPUs have no native bf16, and float32 decodes faster there;
* ``--enforce-eager``: torch.compile adds to start-up what a handful of requests (the tests, the
  demo) never win back; for throughput drop it (vLLM's compiled mode decodes faster on CPU;
  ``benchmarks/serving.py`` does);
* ``--kv-cache-memory-bytes 256M --max-model-len 4096``: a fixed, small KV cache (vLLM refuses to
  start when one request of the full context would not fit);
* ``--distributed-executor-backend uni`` and ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one process;
* ``VLLM_HOST_IP=127.0.0.1``: otherwise vLLM's internal queue binds a non-loopback address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
CPU_FLAGS = ("--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "256M", "--max-model-len", "4096",
             "--distributed-executor-backend", "uni")


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    exe = Path(sys.executable).with_name("vllm")
    return str(exe) if exe.exists() else "vllm"


class VllmServer:
    """``with VllmServer(dir, load_format="soco") as s: ... s.base_url ...``"""

    def __init__(self, model: str | os.PathLike, *, load_format: str | None = "soco", args: Sequence[str] = CPU_FLAGS,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 port: int | None = None, startup_timeout: float = 600.0):
        self.model = str(model)
        self.port = port or free_port()
        self.cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), *args,
                    *(["--load-format", load_format] if load_format else []), *extra_args]
        self.env = {**os.environ, **CPU_ENV, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/vllm-serve-{self.port}.log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> "VllmServer":
        """Launch and wait until ``/health`` answers; raise :class:`ServerFailed` if it never does."""
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"vllm serve exited with {self.proc.returncode} before becoming healthy:\n{self._tail()}")
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise ServerFailed(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n{self._tail()}")

    def wait_exit(self, timeout: float = 600.0) -> int:
        """For servers expected to fail: wait for the process to end, never healthy meanwhile."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if self.healthy():
                raise AssertionError("vllm serve became healthy")
            time.sleep(0.5)
        if self.proc.poll() is None:
            self.stop()
            raise TimeoutError(f"vllm serve still running after {timeout:.0f} s")
        return self.proc.returncode

    def launch(self) -> "VllmServer":
        """Start without waiting for health (see :meth:`wait_exit`)."""
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (vLLM's clean shutdown), then SIGKILL to the whole process group if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
