"""A local server as a process group with a state file: start, health, stop, purge (the
parts Kafka and Elasticsearch share)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from .config import (
    Progress,
    ServiceError,
    ServiceName,
    ServicesConfig,
    ServiceStatus,
    StartError,
)
from .process import (
    _cmdline_has,
    _group_pids,
    _locked,
    _port_open,
    _reap,
    _rss_bytes,
    _same_process,
    _signal_group,
    _started_at,
    _tail,
)

# --------------------------------------------------------------------------- servers


class LocalServer(ABC):
    """One server process managed through a state file; subclasses say how to fetch and run it.

    Args:
        config: versions, ports and folders.
    """

    name: ServiceName
    #: Shown in messages.
    title: str

    def __init__(self, config: ServicesConfig) -> None:
        self.config = config

    # -- layout

    @property
    @abstractmethod
    def version(self) -> str: ...

    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    def dist_dir(self) -> Path:
        return self.config.root / "dist" / f"{self.name}-{self.version}"

    @property
    def run_dir(self) -> Path:
        return self.config.root / "run" / self.name

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def log_path(self) -> Path:
        """The file that receives the server's stdout and stderr."""
        return self.run_dir / f"{self.name}.log"

    @property
    def log_paths(self) -> list[Path]:
        """Every log worth reading when the server misbehaves."""
        return [self.log_path]

    @property
    def external(self) -> str | None:
        """The external address named in the environment, if any."""
        return None

    @property
    @abstractmethod
    def address(self) -> str: ...

    # -- subclass hooks

    @abstractmethod
    def fetch(self, progress: Progress) -> None:
        """Download and unpack the server into :attr:`dist_dir` unless it is already there."""

    @abstractmethod
    def _prepare(self, progress: Progress) -> None:
        """Write configuration and initialise storage before a start."""

    @abstractmethod
    def _command(self) -> tuple[list[str], dict[str, str], dict[str, Any]]:
        """The argv, the environment and extra ``Popen`` keyword arguments of the server."""

    @abstractmethod
    def probe(self, timeout_s: float = 2.0) -> bool:
        """True when the server at :attr:`address` answers its health check."""

    def probe_version(self) -> str | None:
        """The version the running server reports, when it can tell."""
        return None

    def server_pid(self, leader: int) -> int:
        """pid of the server process in the group led by ``leader`` (the launched process)."""
        return leader

    # -- state

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def running_pid(self) -> int | None:
        """pid of our server process when it is alive (a recycled pid does not count)."""
        state = self._read_state()
        if not state:
            return None
        pid = int(state.get("pid", 0))
        if pid <= 0:
            return None
        _reap(pid)
        if not _same_process(pid, state):
            return None
        return pid

    def status(self) -> ServiceStatus:
        """Probe the server and describe it.

        Returns:
            The status; ``healthy`` is the answer of :meth:`probe`.
        """
        pid = self.running_pid()
        state = self._read_state() or {}
        healthy = self.probe()
        version = self.probe_version() if healthy else None
        if version is None and pid is not None:
            version = state.get("version")
        rss = _rss_bytes(_group_pids(pid)) if pid is not None else None
        if self.external:
            detail = "external (from the environment)"
        elif pid is not None:
            detail = "" if healthy else "process alive, health check failing"
        elif healthy:
            detail = "not started by lightmem"
        else:
            detail = ""
        return ServiceStatus(
            name=self.name,
            address=self.address,
            healthy=healthy,
            running=pid is not None,
            pid=self.server_pid(pid) if pid is not None else None,
            group_pid=pid,
            version=version,
            rss_bytes=rss,
            external=self.external is not None,
            log_path=self.log_path if pid is not None or self.log_path.exists() else None,
            detail=detail,
        )

    # -- lifecycle

    def ensure_up(self, progress: Progress | None = None) -> ServiceStatus:
        """Fetch, start and wait for the server; a no-op when it is already healthy.

        Args:
            progress: receives one line per step; defaults to discarding them.

        Returns:
            The healthy status.

        Raises:
            PrerequisiteError: Maven, the JDK or the artifacts are missing.
            StartError: the server exited or was not healthy within ``start_timeout_s``.
        """
        progress = progress or (lambda _msg: None)
        if self.external:
            if self.probe(timeout_s=5.0):
                progress(f"{self.name}: using the external server at {self.address}")
                return self.status()
            raise StartError(
                f"{self.name}: the external server at {self.address} (set in the environment) "
                "is not healthy; lightmem does not start servers for external addresses"
            )
        with _locked(self.config.root / "run" / f"{self.name}.lock"):
            pid = self.running_pid()
            state = self._read_state() or {}
            if pid is not None and state.get("port") != self.port:
                raise StartError(
                    f"{self.name}: pid {pid} from {self.run_dir} already runs on port "
                    f"{state.get('port')}, not {self.port}; run `lightmem services down` first "
                    "or use another LIGHTMEM_SERVICES_DIR"
                )
            if pid is not None and state.get("version") != self.version:
                progress(
                    f"{self.name}: pid {pid} runs {state.get('version')}, not {self.version}; "
                    "`lightmem services down` then `up` to switch"
                )
            if pid is not None:
                if self.probe():
                    progress(f"{self.name}: already healthy (pid {pid})")
                    return self.status()
                progress(f"{self.name}: pid {pid} is running but not healthy yet; waiting")
                self._wait_healthy(pid, None, time.monotonic() + self.config.start_timeout_s)
                return self.status()
            if self.probe():
                progress(f"{self.name}: a server not started by lightmem answers on {self.address}")
                return self.status()
            if _port_open(self.port):
                raise StartError(
                    f"{self.name}: port {self.port} on 127.0.0.1 is taken by another process "
                    f"that is not a healthy {self.title}; stop it or change the port"
                )
            started = time.monotonic()
            self.fetch(progress)
            marker = self.run_dir / "data-version"
            previous = marker.read_text().strip() if marker.exists() else self.version
            if previous != self.version:
                progress(
                    f"{self.name}: the data in {self.run_dir} was written by {previous}; starting "
                    f"{self.version} on it (if that fails: lightmem services down --purge)"
                )
            self._prepare(progress)
            proc = self._spawn()
            progress(
                f"{self.name}: started pid {proc.pid}, waiting for health; log {self.log_path}"
            )
            # The deadline starts after the download, which may take long on a first run.
            self._wait_healthy(proc.pid, proc, time.monotonic() + self.config.start_timeout_s)
            marker.write_text(self.version + "\n")
            elapsed = time.monotonic() - started
            progress(f"{self.name}: healthy at {self.address} after {elapsed:.1f}s")
            return self.status()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv, env, extra = self._command()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        with self.log_path.open("wb") as log, open(os.devnull, "rb") as devnull:
            # A new session: the server outlives this process and is stopped as a group.
            proc = subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
                **extra,
            )
        started = None
        for _ in range(100):
            started = _started_at(proc.pid)
            if started is not None or proc.poll() is not None:
                break
        state = {
            "pid": proc.pid,
            "created_at": started,
            "version": self.version,
            "port": self.port,
            "started_at": time.time(),
            "argv": argv,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)
        return proc

    def _failure(self, reason: str) -> StartError:
        logs = ", ".join(str(p) for p in self.log_paths)
        tail = _tail(self.log_path)
        message = f"{self.name}: {reason}. Logs: {logs}"
        if tail:
            message += f"\n--- last lines of {self.log_path} ---\n{tail}"
        return StartError(message)

    def _wait_healthy(
        self, pid: int, proc: subprocess.Popen[bytes] | None, deadline: float
    ) -> None:
        while True:
            if proc is not None and proc.poll() is not None:
                raise self._failure(f"the server exited with code {proc.returncode} during startup")
            if proc is None and self.running_pid() != pid:
                raise self._failure("the server exited during startup")
            if self.probe(timeout_s=2.0):
                return
            if time.monotonic() >= deadline:
                raise self._failure(
                    f"not healthy after {self.config.start_timeout_s:.0f}s (pid {pid} left running)"
                )
            # The probes block for up to their timeout, so this loop does not spin.
            time.sleep(0.25)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop the server: SIGTERM to its process group, SIGKILL after the deadline.

        Args:
            timeout_s: grace period; defaults to ``stop_timeout_s`` (30 s).

        Returns:
            True when a running server was stopped, False when none was running.

        Raises:
            ServiceError: the process group survived SIGKILL.
        """
        timeout_s = self.config.stop_timeout_s if timeout_s is None else timeout_s
        with _locked(self.config.root / "run" / f"{self.name}.lock"):
            state = self._read_state()
            if not state:
                return False
            pgid = int(state.get("pid", 0))
            # The group may outlive its leader (Elasticsearch's launcher dying before its server
            # JVM): stop whatever is left of it, recognised by our folder on its command line.
            if pgid <= 0 or (self.running_pid() is None and not self._group(pgid)):
                self.state_file.unlink(missing_ok=True)
                return False
            if not _signal_group(pgid, signal.SIGTERM, timeout_s, self._group):
                if not _signal_group(pgid, signal.SIGKILL, 10.0, self._group):
                    raise ServiceError(f"{self.name}: process group {pgid} survived SIGKILL")
            self.state_file.unlink(missing_ok=True)
            return True

    def _group(self, pgid: int) -> list[int]:
        marker = str(self.config.root)
        return [pid for pid in _group_pids(pgid) if _cmdline_has(pid, marker)]

    def purge(self) -> None:
        """Delete the data, logs and configuration of a stopped server (downloads stay)."""
        if self.running_pid() is not None:
            raise ServiceError(f"{self.name}: stop the server before purging its data")
        shutil.rmtree(self.run_dir, ignore_errors=True)
