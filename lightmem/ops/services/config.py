"""The local servers' configuration (ports, versions, folders), their status record and the
launcher's errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightmem.settings import ServicesSettings

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
