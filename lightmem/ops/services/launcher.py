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

from concurrent.futures import ThreadPoolExecutor

from .config import (
    DEFAULT_ES_VERSION,
    DEFAULT_KAFKA_VERSION,
    PrerequisiteError,
    Progress,
    ServiceError,
    ServiceName,
    ServicesConfig,
    ServiceStatus,
    StartError,
    es_url,
    kafka_bootstrap,
)
from .elasticsearch_server import ElasticsearchServer
from .kafka_server import KafkaServer
from .server import LocalServer

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
