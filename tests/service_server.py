"""Start ``python -m lightmem serve`` as a real process on a free port (the service tests).

Like httpx's own ``tests/conftest.py``: the real server, called over real HTTP, ready when
``/ready`` answers 200 (its models loaded in the lifespan). Never a sleep to synchronize:
the wait polls readiness with a deadline and fails at once if the process died.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from lightmem.ops.bench.serve import Service

__all__ = ["Server", "free_port", "start_server", "stop_server"]


#: The service process of the tests is the bench's (one way to start and stop it).
Server = Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: list[str], *, log: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 300.0) -> Server:
    """Run ``lightmem serve ARGS --port <free>``; return once ``/ready`` says 200."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                # No model beyond MiniLM: the service's logic is under test, not compression.
                "LIGHTMEM_COMPRESSOR": "none", "LIGHTMEM_TORCH_THREADS": "1",
                **(env or {})}
    full_env.pop("LIGHTMEM_LLM_BASE_URL", None)
    return Service.start(args, env=full_env, log=log, timeout_s=timeout_s)


def stop_server(server: Server) -> int:
    """SIGTERM, wait for the process; returns its exit status."""
    return server.stop()
