"""Start, wait for and stop the two servers of the peer comparison.

Ours: ``toolkit serve --predicted-outputs`` on the default model (the int8 ``gqa`` engine),
``TOOLKIT_THREADS`` onnxruntime threads. ``--predicted-outputs`` is the operator's opt-in on a
quantized engine (its verify runs are not bitwise plain decoding, ``runtime/speculative.py``); it
changes only requests that carry ``prediction`` (the editing workload, whose report says whether
the output stayed plain decoding's), not the throughput levels or the prefix-cache runs. The peer: ``llama-server`` on the Q8_0 GGUF with the same threads for decoding and
prefill (``-t``/``-tb``), continuous batching, and ``-np`` slots of ``SLOT_CTX`` tokens each
(``-c`` is the whole KV, split evenly between the slots when the KV is not unified). Issue 13
measured 16 streams with ``-np 16 -c 8192``; every level here gets as many slots as streams
(``peer_plan``) so that no request waits for a slot, and at least ``MIN_CTX`` tokens of context so
that the batch-1 workloads (a ~1,000-token shared prefix, a ~440-token file and its rewrite) fit
one slot. The GGUF has no chat template, so ``--no-jinja --chat-template gemma`` (llama.cpp's built-in
Gemma template, the format ``toolkit.recipes.chat_format`` renders for this model) is named explicitly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SLOT_CTX = 512  # 108 prompt + 128 generated tokens with room; issue 13's -np 16 -c 8192
MIN_CTX = 8192
MODEL_ALIAS = "gemma-3-270m-q8_0"


@dataclass(frozen=True)
class PeerPlan:
    """llama-server's slot count and total context for one concurrency level."""

    parallel: int
    ctx: int

    def describe(self) -> str:
        return f"-np {self.parallel} -c {self.ctx}"


def peer_plan(concurrency: int) -> PeerPlan:
    """As many slots as concurrent streams, ``SLOT_CTX`` each, at least ``MIN_CTX`` in all."""
    parallel = max(1, concurrency)
    return PeerPlan(parallel, max(MIN_CTX, parallel * SLOT_CTX))


def free_port() -> int:
    """A TCP port nobody listens on right now (other benchmarks may share the machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_server_command(binary: Path, gguf: Path, port: int, plan: PeerPlan, threads: int) -> list[str]:
    """The ``llama-server`` command line for ``plan``."""
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(plan.parallel), "-c", str(plan.ctx), "-t", str(threads), "-tb", str(threads),
        "--cont-batching", "--alias", MODEL_ALIAS, "--no-jinja", "--chat-template", "gemma", "--no-webui",
    ]  # fmt: skip


def ours_command(port: int) -> list[str]:
    """``toolkit serve`` on the default model (exported on first use), through this Python."""
    return [sys.executable, "-c", "from toolkit.cli import main; main()", "serve", "--port", str(port), "--predicted-outputs"]


def ours_env(threads: int) -> dict[str, str]:
    """This environment with ``TOOLKIT_THREADS`` set (the onnxruntime intra-op threads)."""
    return {**os.environ, "TOOLKIT_THREADS": str(threads)}


class Server:
    """One started server process, its base URL and log."""

    def __init__(self, label: str, command: list[str], url: str, log: Path, env: dict[str, str] | None = None,
                 health_path: str = "/health"):
        self.label, self.command, self.url, self.log, self.health_path = label, command, url, log, health_path
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the health endpoint until it answers 200; exit with the log's tail if the process dies."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + self.health_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} at {self.url} was not ready after {timeout_s:.0f} s; see {self.log}")

    def model(self) -> str:
        """The first model id of ``GET /v1/models``."""
        import httpx

        return httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
