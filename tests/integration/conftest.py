"""Session fixtures for the integration tests: a real Kafka broker and Elasticsearch node.

Where the servers come from, for each of Kafka and Elasticsearch separately:

1. ``LIGHTMEM_KAFKA_BOOTSTRAP`` / ``LIGHTMEM_ES_URL`` name existing servers: used as they are.
   If the named server does not answer, the tests that need it fail.
2. Otherwise the launcher behind ``lightmem services up`` provides them (downloads from Maven
   Central the first time, then starts in about 5 s for Kafka and 30 s for Elasticsearch).
   A server that was already running is reused and left running. A server this session
   started is stopped at the end of the session, so a test run leaves the machine as it
   found it; set ``LIGHTMEM_SERVICES_KEEP=1`` to leave it running for faster later sessions
   (``lightmem services down`` stops it). Under pytest-xdist the servers are always left
   running, since another worker may still be using them.
3. The tests that need a server are skipped, with the reason, when this machine cannot run it
   (no Java, no Maven, no access to Maven Central, no client library), or when
   ``LIGHTMEM_SERVICES_AUTOSTART=0`` and no local server is already healthy. A launcher that
   has everything it needs and still fails is an error, not a skip: that is a bug to see.

Topic and index names are unique per test, and the factories below delete them afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from lightmem.ops.services import launcher as services


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs real Kafka / Elasticsearch (see tests/integration)"
    )


def _unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unique_id() -> Callable[[str], str]:
    """``unique_id(prefix)``: a topic, index or group name no other test (or run) uses."""
    return _unique_id


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in {"1", "true", "yes", "on"}


@pytest.fixture(scope="session")
def services_config() -> services.ServicesConfig:
    return services.ServicesConfig.from_env()


def _provide(server: services.LocalServer, request: pytest.FixtureRequest) -> str:
    """Address of a healthy server, started through the launcher when needed."""
    env_name = "LIGHTMEM_KAFKA_BOOTSTRAP" if server.name == "kafka" else "LIGHTMEM_ES_URL"
    if server.external:
        if not server.probe(timeout_s=10.0):
            pytest.fail(f"{env_name}={server.external} does not answer", pytrace=False)
        return server.address
    if not _flag("LIGHTMEM_SERVICES_AUTOSTART", True):
        if server.probe():  # started earlier, e.g. by `lightmem services up`
            return server.address
        pytest.skip(
            f"no {server.title} at {server.address}: set {env_name}, run `lightmem services "
            "up`, or drop LIGHTMEM_SERVICES_AUTOSTART=0 so that the tests start one"
        )
    already_up = server.running_pid() is not None or server.probe()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def progress(message: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[services] {message}")

    try:
        server.ensure_up(progress)
    except services.PrerequisiteError as exc:
        pytest.skip(f"cannot run a local {server.title} here: {exc}")
    except services.StartError as exc:
        pytest.fail(f"the local {server.title} did not start:\n{exc}", pytrace=False)
    # Under pytest-xdist another worker may still be using the server: leave it running.
    in_xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if not already_up and not in_xdist and not _flag("LIGHTMEM_SERVICES_KEEP", False):
        request.addfinalizer(server.stop)
    return server.address


@pytest.fixture(scope="session")
def kafka_bootstrap(
    services_config: services.ServicesConfig, request: pytest.FixtureRequest
) -> str:
    """``bootstrap.servers`` of a healthy Kafka broker."""
    pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")
    return _provide(services.KafkaServer(services_config), request)


@pytest.fixture(scope="session")
def es_url(services_config: services.ServicesConfig, request: pytest.FixtureRequest) -> str:
    """URL of a healthy Elasticsearch node."""
    pytest.importorskip("elasticsearch", reason="elasticsearch (the stream extra) is missing")
    return _provide(services.ElasticsearchServer(services_config), request)


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str):  # noqa: ANN201 - confluent_kafka is optional
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def new_topic(kafka_admin) -> Iterator[Callable[..., str]]:  # noqa: ANN001
    """Factory: ``new_topic(partitions=4)`` creates a unique topic, deleted after the test."""
    from confluent_kafka.admin import NewTopic

    created: list[str] = []

    def make(partitions: int = 4) -> str:
        name = _unique_id("lightmem-test")
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=30,
        )
        for future in futures.values():
            future.result(timeout=60)
        created.append(name)
        return name

    yield make
    if created:
        for future in kafka_admin.delete_topics(created, operation_timeout=30).values():
            future.result(timeout=60)


@pytest.fixture
def new_group(kafka_admin) -> Iterator[Callable[[], str]]:  # noqa: ANN001
    """Factory: ``new_group()`` returns a unique consumer group id, deleted after the test.

    Delete only after the group's consumers are closed: a group with members is not deleted.
    """
    from confluent_kafka import KafkaError, KafkaException

    created: list[str] = []

    def make() -> str:
        name = _unique_id("lightmem-test-group")
        created.append(name)
        return name

    yield make
    if created:
        for future in kafka_admin.delete_consumer_groups(created, request_timeout=30).values():
            try:
                future.result(timeout=60)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
                    raise


@pytest.fixture(scope="session")
def es_client(es_url: str):  # noqa: ANN201 - elasticsearch is optional
    from elasticsearch import Elasticsearch

    client = Elasticsearch(es_url, request_timeout=30)
    yield client
    client.close()


@pytest.fixture
def new_index(es_client) -> Iterator[Callable[[], str]]:  # noqa: ANN001
    """Factory: ``new_index()`` returns a unique index name, deleted after the test."""
    created: list[str] = []

    def make() -> str:
        name = _unique_id("lightmem-test")
        created.append(name)
        return name

    yield make
    for name in created:
        es_client.indices.delete(index=name, ignore_unavailable=True)
