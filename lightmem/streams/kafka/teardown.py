"""Remove a throwaway deployment: its topics, consumer groups and Elasticsearch indices.

Benchmarks and tests build private deployments (unique topic prefix, ingest group, alias) on shared
servers; this is the one way they clean up after themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightmem.settings import Settings
from lightmem.streams.kafka.topics import delete_topics, kafka_config

__all__ = ["remove_deployment"]


def remove_deployment(
    settings: Settings,
    *,
    topic_prefixes: Sequence[str] = (),
    groups: Sequence[str] = (),
    alias: str | None = None,
    es: Any = None,
) -> None:
    """Delete every topic whose name starts with one of ``topic_prefixes``, the consumer
    ``groups`` (their members must be gone), and the indices and template under ``alias``
    (through the client ``es``). Parts that do not exist are ignored.

    Raises:
        TopicAdminError: some topics could not be deleted.
    """
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_config(settings))
    if topic_prefixes:
        ours = [t for t in admin.list_topics(timeout=30).topics
                if t.startswith(tuple(topic_prefixes))]
        delete_topics(settings, ours)
    if groups:
        for future in admin.delete_consumer_groups(list(groups), request_timeout=30).values():
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - a group that never committed does not exist
                pass
    if alias is not None and es is not None:
        es.indices.delete(index=f"{alias}*", ignore_unavailable=True, allow_no_indices=True)
        es.options(ignore_status=404).indices.delete_index_template(name=f"{alias}-template")
