"""The ingest worker: the sensory stage, the short-term stage and the index sink on Kafka,
one transaction per batch (:mod:`.worker`), with changelog-backed stage state (:mod:`.state`).
The stages themselves are Kafka-free steps over record batches: :mod:`.sensory`,
:mod:`.short_term`, :mod:`.index_sink`, sharing :mod:`.step` (all re-exported by :mod:`.stages`).
"""

from .state import ChangelogTable, RecoveryError, changelog_topic
from .worker import (
    EXIT_BUG,
    EXIT_KAFKA_FATAL,
    DeploymentConflictError,
    IngestWorker,
    WorkerOptions,
    run_worker,
)

__all__ = [
    "ChangelogTable",
    "RecoveryError",
    "changelog_topic",
    "EXIT_BUG",
    "EXIT_KAFKA_FATAL",
    "DeploymentConflictError",
    "IngestWorker",
    "WorkerOptions",
    "run_worker",
]
