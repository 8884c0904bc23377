"""Local Kafka and Elasticsearch servers for tests and development, without Docker.

Both servers come from Maven Central and run as plain local processes on 127.0.0.1:

* Kafka (``org.apache.kafka:kafka_2.13``) as one KRaft node that is broker and controller at
  once, with a static ``controller.quorum.voters``; started with ``java -cp <jars> kafka.Kafka``.
* Elasticsearch (``org.elasticsearch.distribution.integ-test-zip:elasticsearch``, no bundled
  JDK) as a single-node cluster with security off. Elasticsearch refuses to run as root, so
  under root it runs as the system user ``lightmem-es`` (created when missing).

Everything lives in one cache folder (default ``<repo>/.cache/services``, or
``~/.cache/lightmem/services`` outside a source checkout; env ``LIGHTMEM_SERVICES_DIR``)::

    dist/kafka-<ver>/lib/*.jar           downloaded once by ``mvn dependency:copy-dependencies``
    dist/elasticsearch-<ver>/            unzipped integ-test-zip
    run/kafka/                           server.properties, data/, kafka.log, state.json
    run/elasticsearch/                   config/, data/, logs/, elasticsearch.log, state.json

``state.json`` holds the pid (the leader of the server's own process group), the process start
time (so a recycled pid is never mistaken for the server), the version and the ports.

Settings come from the environment through :class:`lightmem.settings.ServicesSettings`
(:meth:`ServicesConfig.from_env`; defaults)::

    LIGHTMEM_SERVICES_DIR             cache folder (see above)
    LIGHTMEM_KAFKA_BOOTSTRAP          an existing Kafka cluster, used instead of the local one
    LIGHTMEM_ES_URL                   an existing Elasticsearch, used instead of the local one
    LIGHTMEM_KAFKA_VERSION            3.9.2
    LIGHTMEM_KAFKA_PORT               9092 (PLAINTEXT listener)
    LIGHTMEM_KAFKA_CONTROLLER_PORT    9093 (KRaft controller listener)
    LIGHTMEM_KAFKA_HEAP_OPTS          -Xms256m -Xmx1g
    LIGHTMEM_KAFKA_AUTO_CREATE_TOPICS false
    LIGHTMEM_KAFKA_JAVA_HOME          JDK for Kafka; else JAVA_HOME, else java on PATH
    LIGHTMEM_ES_VERSION               8.19.21
    LIGHTMEM_ES_PORT                  9200 (HTTP)
    LIGHTMEM_ES_TRANSPORT_PORT        9300
    LIGHTMEM_ES_JAVA_OPTS             -Xms512m -Xmx1g (passed on as ES_JAVA_OPTS)
    LIGHTMEM_ES_JAVA_HOME             JDK 17+ for Elasticsearch; else ES_JAVA_HOME, else as Kafka
    LIGHTMEM_ES_USER                  lightmem-es (only used when running as root)
    LIGHTMEM_MVN                      mvn
    LIGHTMEM_SERVICES_START_TIMEOUT   180 (seconds to become healthy)
    LIGHTMEM_SERVICES_STOP_TIMEOUT    30 (seconds between SIGTERM and SIGKILL)

Exceptions::

    ServiceError
     ├── PrerequisiteError  no Java, no Maven, no download from Maven Central, no user for
     │                      Elasticsearch: this machine cannot run the servers (tests skip)
     └── StartError         a server exited or was not healthy before its deadline, or its
                            port is taken (tests fail: the launcher or the server is broken)
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
from filelock import FileLock

from lightmem.settings import ServicesSettings

__all__ = [
    "DEFAULT_ES_VERSION",
    "DEFAULT_KAFKA_VERSION",
    "ElasticsearchServer",
    "PrerequisiteError",
    "KafkaServer",
    "LocalServer",
    "ServiceError",
    "ServiceName",
    "ServiceStatus",
    "ServicesConfig",
    "StartError",
    "down",
    "es_url",
    "kafka_bootstrap",
    "servers",
    "status",
    "up",
]

#: Kafka 3.9 is the last line with the old protocol versions that Kafka 4.0 removed (KIP-896);
#: it speaks to confluent-kafka (librdkafka), the only Kafka client here.
DEFAULT_KAFKA_VERSION = "3.9.2"
#: Newest 8.19.x integ-test-zip on Maven Central; runs on Java 17 and matches the 8.19 client.
DEFAULT_ES_VERSION = "8.19.21"

#: Pinned so that the fetch does not depend on the Maven version's default plugin binding.
_DEPENDENCY_PLUGIN = "3.8.1"
_LOG4J2_VERSION = "2.24.3"

ServiceName = Literal["kafka", "elasticsearch"]
Progress = Callable[[str], None]


class ServiceError(Exception):
    """Base of every failure to fetch, start or stop a local server."""


class PrerequisiteError(ServiceError):
    """Java, Maven, the download or a user to run Elasticsearch as is not available."""


class StartError(ServiceError):
    """A server exited during startup or was not healthy before the deadline."""


def _default_root(xdg_cache_home: Path | None = None) -> Path:
    # A source checkout (editable install) keeps its cache next to the code, git-ignored;
    # an installed package falls back to the user's cache folder.
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "services"
    return (xdg_cache_home or Path.home() / ".cache") / "lightmem" / "services"


@dataclass(frozen=True)
class ServicesConfig:
    """Where the local servers live, which versions and ports they use, and their limits."""

    #: Cache folder for downloads, configuration, data and logs.
    root: Path = field(default_factory=_default_root)
    #: ``host:port`` of an existing Kafka cluster to use instead of the local server.
    external_kafka_bootstrap: str | None = None
    #: URL of an existing Elasticsearch to use instead of the local server.
    external_es_url: str | None = None
    kafka_version: str = DEFAULT_KAFKA_VERSION
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap_opts: str = "-Xms256m -Xmx1g"
    kafka_auto_create_topics: bool = False
    #: JDK for Kafka; ``None`` means ``JAVA_HOME`` or the ``java`` on PATH.
    kafka_java_home: Path | None = None
    es_version: str = DEFAULT_ES_VERSION
    es_port: int = 9200
    es_transport_port: int = 9300
    es_java_opts: str = "-Xms512m -Xmx1g"
    #: JDK for Elasticsearch (17 or newer); ``None`` means the same choice as for Kafka.
    es_java_home: Path | None = None
    #: The account Elasticsearch runs as when we are root (it refuses to run as root).
    es_user: str = "lightmem-es"
    mvn: str = "mvn"
    start_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> ServicesConfig:
        """Build the configuration from the environment (table in the module docstring),
        read by :class:`lightmem.settings.ServicesSettings`.

        Raises:
            ValueError: a variable is set to an invalid value (named in the message).
        """
        from pydantic import ValidationError

        try:
            s = ServicesSettings()
        except ValidationError as exc:
            problems = "; ".join(
                f"LIGHTMEM_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']} "
                f"(got {e.get('input')!r})" for e in exc.errors())
            raise ValueError(f"invalid services settings: {problems}") from None
        return cls(
            root=s.services_dir or _default_root(s.xdg_cache_home),
            external_kafka_bootstrap=s.kafka_bootstrap,
            external_es_url=s.es_url,
            kafka_version=s.kafka_version or DEFAULT_KAFKA_VERSION,
            kafka_port=s.kafka_port,
            kafka_controller_port=s.kafka_controller_port,
            kafka_heap_opts=s.kafka_heap_opts,
            kafka_auto_create_topics=s.kafka_auto_create_topics,
            kafka_java_home=s.kafka_java_home,
            es_version=s.es_version or DEFAULT_ES_VERSION,
            es_port=s.es_port,
            es_transport_port=s.es_transport_port,
            es_java_opts=s.es_java_opts,
            es_java_home=s.es_java_home or s.kafka_java_home,
            es_user=s.es_user,
            mvn=s.mvn,
            start_timeout_s=s.services_start_timeout,
            stop_timeout_s=s.services_stop_timeout,
        )


def kafka_bootstrap(config: ServicesConfig | None = None) -> str:
    """The Kafka ``bootstrap.servers`` the app and the tests should use.

    Args:
        config: defaults to :meth:`ServicesConfig.from_env`.

    Returns:
        ``LIGHTMEM_KAFKA_BOOTSTRAP`` when set, else the local server (``127.0.0.1:9092``).
    """
    config = config or ServicesConfig.from_env()
    return config.external_kafka_bootstrap or f"127.0.0.1:{config.kafka_port}"


def es_url(config: ServicesConfig | None = None) -> str:
    """The Elasticsearch URL the app and the tests should use.

    Args:
        config: defaults to :meth:`ServicesConfig.from_env`.

    Returns:
        ``LIGHTMEM_ES_URL`` when set, else the local server (``http://127.0.0.1:9200``).
    """
    config = config or ServicesConfig.from_env()
    return config.external_es_url or f"http://127.0.0.1:{config.es_port}"


@dataclass(frozen=True)
class ServiceStatus:
    """What one server looks like right now."""

    name: ServiceName
    #: Bootstrap servers (Kafka) or URL (Elasticsearch) that was probed.
    address: str
    #: Answered the health probe (Kafka metadata; Elasticsearch cluster yellow or green).
    healthy: bool
    #: A process started by this launcher is alive.
    running: bool
    #: pid of the server process itself (Elasticsearch: the server JVM, not its launcher);
    #: None when not ours.
    pid: int | None = None
    version: str | None = None
    #: Resident memory of the whole process group (Elasticsearch runs two JVMs).
    rss_bytes: int | None = None
    #: True when the address comes from LIGHTMEM_KAFKA_BOOTSTRAP / LIGHTMEM_ES_URL.
    external: bool = False
    log_path: Path | None = None
    detail: str = ""
    #: The launched process, leader of the process group that ``down`` stops (the same as
    #: ``pid`` for Kafka; Elasticsearch's launcher JVM).
    group_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["log_path"] = str(self.log_path) if self.log_path else None
        return data


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


class KafkaServer(LocalServer):
    """Kafka in KRaft mode: one node that is both broker and controller."""

    name: ServiceName = "kafka"
    title = "Kafka broker"

    @property
    def version(self) -> str:
        return self.config.kafka_version

    @property
    def port(self) -> int:
        return self.config.kafka_port

    @property
    def external(self) -> str | None:
        return self.config.external_kafka_bootstrap

    @property
    def address(self) -> str:
        return kafka_bootstrap(self.config)

    @property
    def lib_dir(self) -> Path:
        return self.dist_dir / "lib"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def fetch(self, progress: Progress) -> None:
        if any(self.lib_dir.glob(f"kafka_2.13-{self.version}.jar")):
            return
        deps = [("org.apache.kafka", "kafka_2.13", self.version, "jar")]
        # The broker jar leaves the logging backend to the distribution's libs/ folder.
        if int(self.version.split(".")[0]) >= 4:
            deps += [
                ("org.apache.logging.log4j", name, _LOG4J2_VERSION, "jar")
                for name in ("log4j-api", "log4j-core", "log4j-slf4j-impl")
            ]
        else:
            deps += [
                ("org.slf4j", "slf4j-reload4j", "1.7.36", "jar"),
                ("ch.qos.reload4j", "reload4j", "1.2.25", "jar"),
            ]
        _maven_fetch(
            self.config.mvn,
            _pom(f"kafka-{self.version}", deps),
            self.dist_dir,
            progress,
            f"kafka {self.version}",
        )

    def _server_properties(self) -> str:
        c = self.config
        return f"""# Generated by lightmem.ops.services.launcher: a single KRaft node on 127.0.0.1.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{c.kafka_controller_port}
listeners=PLAINTEXT://127.0.0.1:{c.kafka_port},CONTROLLER://127.0.0.1:{c.kafka_controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{c.kafka_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={self.data_dir}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
# One node: internal topics cannot have more replicas; fewer partitions start faster.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable={str(c.kafka_auto_create_topics).lower()}
delete.topic.enable=true
"""

    def _prepare(self, progress: Progress) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "server.properties").write_text(self._server_properties())
        (self.run_dir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.state.change.logger=WARN\n"
        )
        (self.run_dir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.stdout.type = Console\n"
            "appender.stdout.name = STDOUT\n"
            "appender.stdout.layout.type = PatternLayout\n"
            "appender.stdout.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = info\n"
            "rootLogger.appenderRef.stdout.ref = STDOUT\n"
            "logger.request.name = kafka.request.logger\n"
            "logger.request.level = warn\n"
        )
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = _kafka_cluster_id()
        progress(f"kafka: formatting storage in {self.data_dir} (cluster id {cluster_id})")
        java, env = self._java()
        proc = subprocess.run(
            [
                java,
                *self._jvm_flags(),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.run_dir / "server.properties"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise StartError(
                f"kafka: StorageTool format failed (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr).strip()[-3000:]
            )

    def _java(self) -> tuple[str, dict[str, str]]:
        min_major = 11 if self._major() < 4 else 17
        home = _find_java_home(self.config.kafka_java_home, min_major, "kafka")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "JAVA_TOOL"))}
        env["JAVA_HOME"] = str(home)
        return str(home / "bin" / "java"), env

    def _major(self) -> int:
        return int(self.version.split(".")[0])

    def _jvm_flags(self) -> list[str]:
        return [
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.run_dir / 'log4j.properties'}",
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.run_dir / 'logs'}",
            "-cp",
            f"{self.lib_dir}/*",
        ]

    def _command(self) -> tuple[list[str], dict[str, str], dict[str, Any]]:
        java, env = self._java()
        argv = [
            java,
            *self.config.kafka_heap_opts.split(),
            "-server",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            *self._jvm_flags(),
            "kafka.Kafka",
            str(self.run_dir / "server.properties"),
        ]
        return argv, env, {"cwd": str(self.run_dir)}

    def probe(self, timeout_s: float = 2.0) -> bool:
        endpoints = [e.strip().rpartition(":") for e in self.address.split(",") if e.strip()]
        try:
            reachable = any(
                _port_open(int(port), host or "127.0.0.1") for host, _, port in endpoints
            )
        except (ValueError, OSError):
            reachable = True  # an address we cannot parse: let librdkafka judge it
        if not reachable:
            return False  # refused at once: no need to wait for librdkafka's timeout
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError:
            return True  # without the stream extra, an open port is the best evidence
        import logging

        admin = AdminClient(
            {
                "bootstrap.servers": self.address,
                "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000)),
                "logger": logging.getLogger("lightmem.ops.services.librdkafka"),
            }
        )
        try:
            metadata = admin.list_topics(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - KafkaException and timeouts both mean "not yet"
            return False
        return bool(metadata.brokers)


class ElasticsearchServer(LocalServer):
    """Elasticsearch single node from the integ-test-zip, security off, run as a plain user."""

    name: ServiceName = "elasticsearch"
    title = "Elasticsearch node"

    @property
    def version(self) -> str:
        return self.config.es_version

    @property
    def port(self) -> int:
        return self.config.es_port

    @property
    def external(self) -> str | None:
        return self.config.external_es_url

    @property
    def address(self) -> str:
        return es_url(self.config).rstrip("/")

    @property
    def log_paths(self) -> list[Path]:
        return [self.log_path, self.run_dir / "logs" / "lightmem-local.log"]

    def fetch(self, progress: Progress) -> None:
        if (self.dist_dir / "bin" / "elasticsearch").exists():
            return
        download = self.config.root / "dist" / f".download-elasticsearch-{self.version}"
        _maven_fetch(
            self.config.mvn,
            _pom(
                f"elasticsearch-{self.version}",
                [
                    (
                        "org.elasticsearch.distribution.integ-test-zip",
                        "elasticsearch",
                        self.version,
                        "zip",
                    )
                ],
            ),
            download,
            progress,
            f"elasticsearch {self.version}",
        )
        try:
            archive = download / "lib" / f"elasticsearch-{self.version}.zip"
            progress(f"elasticsearch: unpacking {archive.name}")
            self._unzip(archive)
        finally:
            shutil.rmtree(download, ignore_errors=True)

    def _unzip(self, archive: Path) -> None:
        work = Path(tempfile.mkdtemp(prefix=".unzip-", dir=self.dist_dir.parent))
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = zf.extract(info, work)
                    mode = (info.external_attr >> 16) & 0o777
                    if info.is_dir():
                        os.chmod(target, 0o755)
                    else:
                        # zipfile drops the modes: restore them, readable by the server's user.
                        os.chmod(target, (mode | 0o444) if mode else 0o644)
            (top,) = list(work.iterdir())
            top.rename(self.dist_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    #: Main class of the server JVM; ``bin/elasticsearch`` first starts a small launcher JVM
    #: (the process group's leader) that starts this one.
    SERVER_MAIN = "org.elasticsearch.bootstrap.Elasticsearch"

    def server_pid(self, leader: int) -> int:
        """The server JVM's pid; the launcher's while the server has not started yet."""
        for pid in self._group(leader):
            if pid != leader and _cmdline_has(pid, self.SERVER_MAIN):  # not the launcher
                return pid
        return leader

    def _run_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run as when we are root, creating the system user if needed."""
        if os.geteuid() != 0:
            return None
        import grp
        import pwd

        user = self.config.es_user
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            useradd = shutil.which("useradd")
            if useradd is None:
                raise PrerequisiteError(
                    "elasticsearch: refuses to run as root and useradd is missing; "
                    f"create the user {user!r} or run as a non-root user"
                ) from None
            proc = subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise PrerequisiteError(
                    f"elasticsearch: useradd {user!r} failed: {proc.stderr.strip()}"
                ) from None
            entry = pwd.getpwnam(user)
        try:
            gid = grp.getgrgid(entry.pw_gid).gr_gid
        except KeyError:
            gid = entry.pw_gid
        return entry.pw_uid, gid

    def _config_yml(self) -> str:
        c = self.config
        return f"""# Generated by lightmem.ops.services: one node, security off, loopback only.
cluster.name: lightmem-local
node.name: lightmem-es
path.data: {self.run_dir / "data"}
path.logs: {self.run_dir / "logs"}
network.host: 127.0.0.1
http.port: {c.es_port}
transport.port: {c.es_transport_port}
discovery.type: single-node
xpack.security.enabled: false
# A developer's disk may be nearly full: never turn indices read-only for that.
cluster.routing.allocation.disk.threshold_enabled: false
action.destructive_requires_name: false
"""

    def _prepare(self, progress: Progress) -> None:
        ids = self._run_user()
        conf = self.run_dir / "config"
        for sub in ("config", "data", "logs", "tmp"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for src in (self.dist_dir / "config").iterdir():
            dst = conf / src.name
            if src.name == "elasticsearch.yml" or dst.exists():
                continue
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        (conf / "elasticsearch.yml").write_text(self._config_yml())
        if ids is not None:
            uid, gid = ids
            os.chown(self.run_dir, uid, gid)
            for sub in ("config", "data", "logs", "tmp"):
                top = self.run_dir / sub
                os.chown(top, uid, gid)
                if sub in ("config", "tmp"):
                    for dirpath, dirnames, filenames in os.walk(top):
                        for name in dirnames + filenames:
                            os.chown(os.path.join(dirpath, name), uid, gid)
            self._check_access(uid, gid)

    def _check_access(self, uid: int, gid: int) -> None:
        # Every parent folder must be traversable by the unprivileged user.
        probe = subprocess.run(
            [
                "/bin/sh",
                "-c",
                'test -r "$1" && test -w "$2" && test -w "$3"',
                "sh",
                str(self.dist_dir / "lib" / f"elasticsearch-{self.version}.jar"),
                str(self.run_dir / "data"),
                str(self.run_dir / "config"),
            ],
            user=uid,
            group=gid,
            extra_groups=[],
            check=False,
        )
        if probe.returncode != 0:
            raise PrerequisiteError(
                f"elasticsearch: user {self.config.es_user!r} cannot read {self.dist_dir} or "
                f"write {self.run_dir}; make the folders above {self.config.root} "
                "traversable (chmod o+x) or set LIGHTMEM_SERVICES_DIR"
            )

    def _command(self) -> tuple[list[str], dict[str, str], dict[str, Any]]:
        home = _find_java_home(self.config.es_java_home, 17, "elasticsearch")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(self.run_dir),
            "ES_JAVA_HOME": str(home),
            "ES_JAVA_OPTS": self.config.es_java_opts,
            "ES_PATH_CONF": str(self.run_dir / "config"),
            "ES_TMPDIR": str(self.run_dir / "tmp"),
        }
        extra: dict[str, Any] = {"cwd": str(self.run_dir)}
        ids = self._run_user()
        if ids is not None:
            extra.update(user=ids[0], group=ids[1], extra_groups=[])
        return [str(self.dist_dir / "bin" / "elasticsearch")], env, extra

    def _get(self, path: str, timeout_s: float) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.address + path, timeout=timeout_s) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return body if isinstance(body, dict) else None

    def probe(self, timeout_s: float = 2.0) -> bool:
        wait = max(1, int(timeout_s))
        health = self._get(
            f"/_cluster/health?wait_for_status=yellow&timeout={wait}s", timeout_s + 1.0
        )
        return bool(health) and health.get("status") in ("yellow", "green")

    def probe_version(self) -> str | None:
        # The integ-test-zip has no handler for ``GET /``: ask the node itself.
        body = self._get("/_nodes/_local?filter_path=nodes.*.version", 5.0)
        nodes = (body or {}).get("nodes") or {}
        for node in nodes.values():
            return str(node.get("version"))
        return None


# --------------------------------------------------------------------------- facade


def servers(
    config: ServicesConfig | None = None, *, kafka: bool = True, es: bool = True
) -> list[LocalServer]:
    """The selected servers, Kafka first.

    Args:
        config: defaults to :meth:`ServicesConfig.from_env`.
        kafka: include Kafka (default True).
        es: include Elasticsearch (default True).
    """
    config = config or ServicesConfig.from_env()
    chosen: list[LocalServer] = []
    if kafka:
        chosen.append(KafkaServer(config))
    if es:
        chosen.append(ElasticsearchServer(config))
    return chosen


def up(
    config: ServicesConfig | None = None,
    *,
    kafka: bool = True,
    es: bool = True,
    progress: Progress | None = None,
) -> list[ServiceStatus]:
    """Start the selected servers (idempotent) and wait until they are healthy.

    The servers start concurrently (their JVM startups overlap), and every server is attempted
    even when another one fails.

    Args:
        config: defaults to :meth:`ServicesConfig.from_env`.
        kafka: include Kafka (default True).
        es: include Elasticsearch (default True).
        progress: receives one line per step, from worker threads.

    Returns:
        The healthy statuses, Kafka first.

    Raises:
        ServiceError: one or more servers failed; the message lists each failure.
    """
    chosen = servers(config, kafka=kafka, es=es)
    if not chosen:
        return []
    with ThreadPoolExecutor(max_workers=len(chosen), thread_name_prefix="services-up") as pool:
        futures = [pool.submit(server.ensure_up, progress) for server in chosen]
    statuses: list[ServiceStatus] = []
    errors: list[str] = []
    for future in futures:
        try:
            statuses.append(future.result())
        except ServiceError as exc:
            errors.append(str(exc))
    if errors:
        raise ServiceError("\n".join(errors))
    return statuses


def down(
    config: ServicesConfig | None = None, *, kafka: bool = True, es: bool = True
) -> list[ServiceName]:
    """Stop the selected local servers; safe when nothing runs.

    Returns:
        The names of the servers that were running and are now stopped.
    """
    return [s.name for s in servers(config, kafka=kafka, es=es) if s.stop()]


def status(
    config: ServicesConfig | None = None, *, kafka: bool = True, es: bool = True
) -> list[ServiceStatus]:
    """Probe the selected servers.

    Returns:
        One status per server, Kafka first.
    """
    return [s.status() for s in servers(config, kafka=kafka, es=es)]
