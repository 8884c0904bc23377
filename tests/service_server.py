"""Start ``python -m lightmem serve`` as a real process on a free port (the service tests).

Like httpx's own ``tests/conftest.py``: the real server, called over real HTTP, ready when
``/ready`` answers 200 (its models loaded in the lifespan). Never a sleep to synchronize:
the wait polls readiness with a deadline and fails at once if the process died.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Server", "free_port", "start_server", "stop_server"]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: list[str], *, log: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 300.0) -> Server:
    """Run ``lightmem serve ARGS --port <free>``; return once ``/ready`` says 200."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                # No model beyond MiniLM: the service's logic is under test, not compression.
                "LIGHTMEM_COMPRESSOR": "none", "LIGHTMEM_TORCH_THREADS": "1",
                **(env or {})}
    full_env.pop("LIGHTMEM_LLM_BASE_URL", None)
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "lightmem", "serve", "--port", str(port),
                             *args], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"lightmem serve exited {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise TimeoutError(f"lightmem serve not ready in {timeout_s:.0f}s:\n"
                               f"{server.output()}")
        time.sleep(0.2)  # polling interval of a readiness wait, not a synchronization


def stop_server(server: Server) -> int:
    """SIGTERM, wait for the process; returns its exit status."""
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)
    return server.proc.returncode
