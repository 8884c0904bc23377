"""Process plumbing of the launcher: liveness (psutil), process groups, Java and Maven
lookup, cross-process locks (filelock)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil
from filelock import FileLock

from .config import (
    _DEPENDENCY_PLUGIN,
    PrerequisiteError,
    Progress,
    ServiceError,
)

# --------------------------------------------------------------------------- processes


def _started_at(pid: int) -> float | None:
    """Creation time (seconds since the epoch) of a live, non-zombie process, else None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def _same_process(pid: int, state: dict) -> bool:
    """Whether ``pid`` is still the process the state file recorded (not a recycled pid)."""
    started = _started_at(pid)
    if started is None:
        return False
    if "created_at" in state:
        return state["created_at"] == started
    ticks = state.get("start_ticks")  # written by a launcher before psutil: clock ticks
    return ticks is not None and abs(
        ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time() - started) < 0.05


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["status"]):
        try:
            if (os.getpgid(proc.pid) == pgid
                    and proc.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)):
                pids.append(proc.pid)
        except (OSError, psutil.Error):  # exited meanwhile
            continue
    return pids


def _rss_bytes(pids: Sequence[int]) -> int | None:
    total = 0
    found = False
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
            found = True
        except psutil.Error:
            continue
    return total if found else None


def _cmdline_has(pid: int, marker: str) -> bool:
    """Whether ``marker`` is in the process's command line (False once it exited)."""
    try:
        return marker in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _reap(pid: int) -> None:
    # A server started by this very Python process stays a zombie until it is waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal_group(
    pgid: int, sig: signal.Signals, wait_s: float, members: Callable[[int], list[int]]
) -> bool:
    """Signal a process group; True once ``members(pgid)`` is empty, False at the deadline."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return True
    except PermissionError as exc:
        raise ServiceError(
            f"no permission to signal process group {pgid}: stop it as the user who started it"
        ) from exc
    procs = []
    for pid in members(pgid):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    # wait_procs reaps our own children (a server started by this very process) as well.
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    _reap(pgid)
    return not alive and not members(pgid)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _java_major(java_home: Path) -> int | None:
    release = java_home / "release"
    try:
        match = re.search(r'^JAVA_VERSION="([^"]+)"', release.read_text(), re.MULTILINE)
    except OSError:
        match = None
    version = match.group(1) if match else None
    if version is None:
        try:
            out = subprocess.run(
                [str(java_home / "bin" / "java"), "-version"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stderr
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = re.search(r'version "([^"]+)"', out)
        version = found.group(1) if found else None
    if not version:
        return None
    head = version.split(".")
    major = int(head[1]) if head[0] == "1" and len(head) > 1 else int(re.sub(r"\D.*", "", head[0]))
    return major


def _find_java_home(explicit: Path | None, min_major: int, purpose: str) -> Path:
    """Pick a JDK: the explicit one, else ``java`` on PATH, else any under /usr/lib/jvm, /opt."""
    if explicit is not None:
        if not (explicit / "bin" / "java").exists():
            raise PrerequisiteError(f"{purpose}: no bin/java under the JDK {str(explicit)!r}")
        major = _java_major(explicit)
        if major is None or major < min_major:
            raise PrerequisiteError(
                f"{purpose}: needs Java {min_major}+, {str(explicit)!r} is {major}"
            )
        return explicit
    candidates: list[Path] = []
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve().parent.parent)
    for base in (Path("/usr/lib/jvm"), Path("/opt")):
        if base.is_dir():
            candidates.extend(sorted(p for p in base.iterdir() if (p / "bin" / "java").exists()))
    for home in candidates:
        major = _java_major(home)
        if major is not None and major >= min_major:
            return home
    raise PrerequisiteError(
        f"{purpose}: no Java {min_major}+ found (looked at java on PATH, /usr/lib/jvm, /opt); "
        "set JAVA_HOME or LIGHTMEM_KAFKA_JAVA_HOME / LIGHTMEM_ES_JAVA_HOME"
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise up/down of one server across processes (e.g. parallel pytest workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def _maven_fetch(mvn: str, pom: str, out_dir: Path, progress: Progress, what: str) -> None:
    """Run ``copy-dependencies`` on a generated pom into ``out_dir`` (atomically)."""
    exe = shutil.which(mvn)
    if exe is None:
        raise PrerequisiteError(
            f"{what}: Maven ({mvn!r}) not found; install Maven or set LIGHTMEM_MVN"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (work / "pom.xml").write_text(pom)
        progress(f"{what}: downloading from Maven Central (mvn dependency:copy-dependencies)")
        cmd = [
            exe,
            "-q",
            "-B",
            "-f",
            str(work / "pom.xml"),
            f"org.apache.maven.plugins:maven-dependency-plugin:{_DEPENDENCY_PLUGIN}"
            ":copy-dependencies",
            f"-DoutputDirectory={work / 'lib'}",
            "-DincludeScope=runtime",
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=work, capture_output=True, text=True, timeout=1800, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise PrerequisiteError(f"{what}: Maven did not finish in {exc.timeout:.0f}s") from exc
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip().splitlines()
            raise PrerequisiteError(
                f"{what}: Maven failed (exit {proc.returncode}):\n" + "\n".join(output[-25:])
            )
        work.chmod(0o755)  # mkdtemp made it private; Elasticsearch's user must read it
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _kafka_cluster_id() -> str:
    """A random id as ``kafka-storage random-uuid`` makes it, without starting a JVM.

    16 random bytes in URL-safe base64 without padding; like Kafka's ``Uuid.randomUuid``, never
    one that starts with ``-``, which the command line would read as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _pom(artifact: str, dependencies: Sequence[tuple[str, str, str, str]]) -> str:
    deps = "\n".join(
        "    <dependency><groupId>{}</groupId><artifactId>{}</artifactId>"
        "<version>{}</version><type>{}</type></dependency>".format(*dep)
        for dep in dependencies
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by lightmem.ops.services.launcher: the artifacts of one local server. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>lightmem.local</groupId>
  <artifactId>{artifact}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
</project>
"""
