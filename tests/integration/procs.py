"""Worker subprocesses of the integration tests (``python -m lightmem worker|sleep-worker``).

Workers run as real processes, exactly as deployed, so that a test can ``kill -9`` one and
read its log. Shared by the streaming, metrics and sleep tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Worker"]


@dataclass
class Worker:
    """A worker process in its own session (process group) with its log file."""

    name: str
    proc: subprocess.Popen
    log: Path
    #: Log size when dump_stacks() asked for the stack dumps (None: never asked).
    dumped_at: int | None = None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the log; after a dump_stacks(), only its log records (the
        stage state), not the stack dumps that would push everything else out."""
        text = self.text()
        before, after = text, ""
        if self.dumped_at is not None:
            raw = text.encode()
            before = raw[: self.dumped_at].decode(errors="replace")
            after = raw[self.dumped_at :].decode(errors="replace")
        lines = before.splitlines() + [
            ln for ln in after.splitlines() if ln.startswith(("[", "{")) and "] task " not in ln]
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(lines[-n:])

    def dump_stacks(self) -> None:
        """Ask a live worker to log its stage state and every thread's stack
        (SIGUSR2, SIGUSR1: see lightmem.streams.ingest); diagnostics for a timeout."""
        if self.proc.poll() is not None:
            return
        size = self.log.stat().st_size
        self.dumped_at = size
        os.kill(self.proc.pid, signal.SIGUSR2)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.log.stat().st_size == size:
            time.sleep(0.2)
        # The dumps are written by two handlers; give the second a moment to finish.
        time.sleep(1.0)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not stopped within a minute; the exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode
