"""The local Kafka and Elasticsearch launcher (``lightmem services up|down|status``) used by the
tests and a laptop deployment: :mod:`.launcher` is the entry point (its docstring has the
folders, settings and errors); :mod:`.config`, :mod:`.process`, :mod:`.server`,
:mod:`.kafka_server` and :mod:`.elasticsearch_server` are its parts."""

from .launcher import (
    DEFAULT_ES_VERSION,
    DEFAULT_KAFKA_VERSION,
    ElasticsearchServer,
    KafkaServer,
    LocalServer,
    PrerequisiteError,
    ServiceError,
    ServiceName,
    ServicesConfig,
    ServiceStatus,
    StartError,
    down,
    es_url,
    kafka_bootstrap,
    servers,
    status,
    up,
)

__all__ = [
    "DEFAULT_ES_VERSION",
    "DEFAULT_KAFKA_VERSION",
    "ElasticsearchServer",
    "KafkaServer",
    "LocalServer",
    "PrerequisiteError",
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
