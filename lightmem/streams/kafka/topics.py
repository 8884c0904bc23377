"""Kafka topics of the streaming deployment, and the client configuration every Kafka client
here is built from.

Topics (DESIGN.md section 2); the partition key keeps what must stay ordered together::

    lightmem.turns.v1            key tenant/conversation  chat turns in; the source of truth
                                                           for replay (kept for
                                                           settings.turns_retention, 7 days)
    lightmem.segments.v1         key tenant/conversation  topic segments (sensory stage out)
    lightmem.entries.v1          key tenant/user          memory entries (short-term stage out)
    lightmem.memory-changes.v2   key tenant/user/memory/change
                                                           every add/update/delete (audit);
                                                           compacted, so an erasure
                                                           tombstones a scope's changes; the
                                                           partition is the scope's
                                                           (:mod:`.change_log`)
    lightmem.dlq.v1              key = the source key      dead letters, nothing is dropped
    lightmem.sleep-control.v1    key = command scope       sleep-window commands (compacted)
    lightmem.erasures.v1         key = the erased scope    erasure ledger (compacted): every
                                                           stage, sleep worker and replay drops
                                                           what an erasure covers

``lightmem.memory-changes.v1`` (key tenant/user, never compacted) is the changes topic of
earlier versions: nothing writes or reads it any more; ``lightmem topics migrate-changes``
copies it into v2 (:func:`~lightmem.streams.kafka.change_log.migrate_changes`).

Turns, segments, entries and memory changes share one partition count
(``settings.kafka_partitions``): the ingest workers' changelog-backed tables are
co-partitioned with them.

A *topic prefix* (``Topics(prefix=...)``, or ``settings.kafka_topic_prefix``, env
``LIGHTMEM_KAFKA_TOPIC_PREFIX``) puts a whole deployment's topics under one namespace, e.g. one
per test run.

Sizes: ``settings.max_event_bytes`` is the one size limit of a turn. The turns topic accepts
such a record (:func:`turns_max_message_bytes`), and the DLQ topic and every producer that may
write a dead letter accept the dead letter of such a record (:func:`dead_letter_max_bytes`).
A replay run keeps reading the deployment's turns topic but writes its segments, entries,
changes and dead letters to topics of its own (:meth:`Topics.for_replay`), so that it never
mixes with the live pipeline.

Secrets (SASL password) go into the client configuration and nowhere else: use
:func:`redacted` before logging a configuration.

Exceptions::

    Exception
     └── TopicAdminError    some topics could not be created/deleted; ``failures`` lists all
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lightmem.settings import Settings

__all__ = [
    "TopicSpec",
    "Topics",
    "TopicAdminError",
    "TopicsResult",
    "topic_specs",
    "changes_topic_configs",
    "create_topics",
    "delete_topics",
    "kafka_config",
    "redacted",
    "topic_prefix",
    "turns_max_message_bytes",
    "dead_letter_max_bytes",
]

#: Base names; the deployment's prefix goes in front.
TURNS = "lightmem.turns.v1"
SEGMENTS = "lightmem.segments.v1"
ENTRIES = "lightmem.entries.v1"
#: v2: one key per change, compacted (erasable); v1: keyed by scope, kept forever (legacy).
MEMORY_CHANGES = "lightmem.memory-changes.v2"
MEMORY_CHANGES_V1 = "lightmem.memory-changes.v1"
DLQ = "lightmem.dlq.v1"
SLEEP_CONTROL = "lightmem.sleep-control.v1"
ERASURES = "lightmem.erasures.v1"

#: Dead letters carry the original event (base64) plus the reason: allow bigger records
#: than the broker default (1 MiB) so that an oversized turn can always be dead-lettered.
#: The floor of :func:`dead_letter_max_bytes`.
DLQ_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The broker's default ``message.max.bytes``: a topic is never made stricter than this, so
#: producers batching up to librdkafka's default ``batch.size`` (1,000,000) always fit.
BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: Room for what a record batch adds to the value: batch and record headers, key, headers.
RECORD_OVERHEAD_BYTES = 64 * 1024
_FOREVER = "-1"


#: The memory-changes topic's segments roll at the first write after this (1 h): only closed
#: segments are compacted, so a tombstoned change's bytes are cleanable about this long after
#: the erasure at most (the erasure's own ``erase`` change is such a write).
CHANGES_SEGMENT_MS = 3_600_000
#: Compact as soon as 1 % of the log is dirty: an erasure's tombstones are a tiny share of a
#: large history, and the default (50 %) would leave the erased text there for long.
CHANGES_MIN_CLEANABLE_DIRTY_RATIO = "0.01"
#: And in any case within a day (KIP-354), whatever the dirty ratio.
CHANGES_MAX_COMPACTION_LAG_MS = 86_400_000
#: A tombstone stays a day after compaction: a consumer mirroring the topic that reads it
#: within a day also deletes its copy.
CHANGES_DELETE_RETENTION_MS = 86_400_000


def changes_topic_configs() -> dict[str, str]:
    """Topic configs of the memory-changes topic (v2: compacted, cleaned promptly)."""
    return {
        "cleanup.policy": "compact",
        "segment.ms": str(CHANGES_SEGMENT_MS),
        "min.cleanable.dirty.ratio": CHANGES_MIN_CLEANABLE_DIRTY_RATIO,
        "max.compaction.lag.ms": str(CHANGES_MAX_COMPACTION_LAG_MS),
        "delete.retention.ms": str(CHANGES_DELETE_RETENTION_MS),
    }


@dataclass(frozen=True)
class TopicSpec:
    """One topic: name, partitions and topic-level configs."""

    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)


def turns_retention_ms(settings: Settings) -> str:
    """``retention.ms`` of the turns, segments and entries topics (``settings.turns_retention``
    seconds; -1 = forever)."""
    s = settings.turns_retention
    return _FOREVER if s < 0 else str(s * 1000)


#: Topics whose retention ``create_topics`` keeps in line with the settings when they exist.
RETAINED = ("turns", "segments", "entries")


def topic_prefix(settings: Settings) -> str:
    """The deployment's topic prefix: ``settings.kafka_topic_prefix`` (env
    ``LIGHTMEM_KAFKA_TOPIC_PREFIX``; empty = none)."""
    return settings.kafka_topic_prefix


def turns_max_message_bytes(settings: Settings) -> int:
    """``max.message.bytes`` of the turns topic: a turn of ``max_event_bytes`` fits, and the
    broker's default is kept as a floor (a larger turn from another producer still reaches
    the sensory stage, which dead-letters it with the reason instead of the broker refusing
    it)."""
    return max(settings.max_event_bytes + RECORD_OVERHEAD_BYTES, BROKER_DEFAULT_MAX_MESSAGE_BYTES)


def dead_letter_max_bytes(settings: Settings) -> int:
    """The largest dead letter: the DLQ topic's ``max.message.bytes`` and the producers'
    ``message.max.bytes``.

    A dead letter of a turn the turns topic accepted holds its bytes in base64 (4/3), a
    preview of at most :data:`~lightmem.streams.kafka.producer.RAW_PREVIEW_CHARS` characters and
    the reason: twice the turns topic's limit covers it, with :data:`DLQ_MAX_MESSAGE_BYTES`
    as the floor (dead letters of segments and entries).
    """
    return max(2 * turns_max_message_bytes(settings), DLQ_MAX_MESSAGE_BYTES)


@dataclass(frozen=True)
class Topics:
    """The topic names one pipeline run reads and writes.

    Args:
        prefix: Prepended to every name (default none).
        stage_prefix: Prepended, after ``prefix``, to every name except the turns topic and
            the sleep-control and erasures topics (a replay run's private namespace;
            default none).
    """

    prefix: str = ""
    stage_prefix: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, prefix: str | None = None) -> Topics:
        """Topics of the deployment ``settings`` describe; ``prefix`` overrides its prefix."""
        return cls(prefix=topic_prefix(settings) if prefix is None else prefix)

    def for_replay(self, run: str) -> Topics:
        """Same turns topic; private segments/entries/changes/DLQ topics for replay ``run``."""
        return replace(self, stage_prefix=f"replay.{run}.")

    def _stage(self, base: str) -> str:
        return f"{self.prefix}{self.stage_prefix}{base}"

    @property
    def turns(self) -> str:
        return f"{self.prefix}{TURNS}"

    @property
    def segments(self) -> str:
        return self._stage(SEGMENTS)

    @property
    def entries(self) -> str:
        return self._stage(ENTRIES)

    @property
    def memory_changes(self) -> str:
        return self._stage(MEMORY_CHANGES)

    @property
    def memory_changes_v1(self) -> str:
        """The legacy changes topic (read only by the migration and the erasure's check)."""
        return self._stage(MEMORY_CHANGES_V1)

    @property
    def dlq(self) -> str:
        return self._stage(DLQ)

    @property
    def sleep_control(self) -> str:
        return f"{self.prefix}{SLEEP_CONTROL}"

    @property
    def erasures(self) -> str:
        """The erasure ledger: the deployment's, also for a replay run (never private)."""
        return f"{self.prefix}{ERASURES}"

    def all(self) -> list[str]:
        return [self.turns, self.segments, self.entries, self.memory_changes, self.dlq,
                self.sleep_control, self.erasures]

    def stage_topics(self) -> list[str]:
        """The topics a replay run owns (everything but turns and sleep control)."""
        return [self.segments, self.entries, self.memory_changes, self.dlq]


def topic_specs(settings: Settings, topics: Topics) -> list[TopicSpec]:
    """Partition counts and configs of every topic of ``topics``.

    Args:
        settings: ``kafka_partitions`` sets the pipeline topics' partition count.
        topics: The names.

    Returns:
        One spec per topic, in :meth:`Topics.all` order.
    """
    n = settings.kafka_partitions
    keep = {"cleanup.policy": "delete", "retention.ms": _FOREVER}
    # Raw user text: kept for ``turns_retention`` (erasure cannot delete single records).
    raw = {"cleanup.policy": "delete", "retention.ms": turns_retention_ms(settings)}
    return [
        # The source of truth: replay/backfill reads it from the beginning, for as long as
        # the retention keeps it.
        TopicSpec(topics.turns, n,
                  {**raw, "max.message.bytes": str(turns_max_message_bytes(settings))}),
        # Intermediate: only needed until the next stage consumed it.
        TopicSpec(topics.segments, n, raw),
        # The sleep-time group replays entries (within the retention).
        TopicSpec(topics.entries, n, raw),
        # Compacted, one key per change: an erasure tombstones the scope's changes.
        TopicSpec(topics.memory_changes, n, changes_topic_configs()),
        TopicSpec(topics.dlq, 1,
                  {**keep, "max.message.bytes": str(dead_letter_max_bytes(settings))}),
        TopicSpec(topics.sleep_control, 1, {"cleanup.policy": "compact"}),
        # One record per erased scope (the latest request), kept forever by compaction.
        TopicSpec(topics.erasures, 1, {"cleanup.policy": "compact"}),
    ]


# -- client configuration ------------------------------------------------------------------


_SECRET_KEYS = {"sasl.password", "ssl.key.password", "sasl_plain_password"}


def kafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """confluent-kafka (librdkafka) configuration with the security settings passed through.

    Args:
        settings: Bootstrap servers, security protocol, SASL mechanism/user/password, CA file.
        **extra: More librdkafka properties (``group.id``, ``enable.idempotence``, ...); keys
            may use ``_`` for ``.`` (``group_id``).

    Returns:
        The configuration dict. It holds the SASL password in clear text: never log it
        without :func:`redacted`.

    Raises:
        ValueError: an unknown security protocol (the value is named; credentials never are).
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
        raise ValueError(
            f"kafka_security_protocol: must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL "
            f"(got {settings.kafka_security_protocol!r})")
    if protocol.startswith("SASL"):
        if settings.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        if settings.kafka_sasl_username is not None:
            conf["sasl.username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if protocol in {"SSL", "SASL_SSL"} and settings.kafka_ssl_cafile is not None:
        conf["ssl.ca.location"] = str(settings.kafka_ssl_cafile)
    conf.update({k.replace("_", "."): v for k, v in extra.items()})
    return conf


def redacted(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``conf`` with every secret replaced by ``'***'`` (safe to log or print)."""
    return {k: ("***" if k in _SECRET_KEYS and v is not None else v) for k, v in conf.items()}


# -- admin -----------------------------------------------------------------------------------


class TopicAdminError(Exception):
    """Some topic operations failed; ``failures`` maps topic name to reason (all of them)."""

    def __init__(self, action: str, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        lines = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.failures.items()))
        super().__init__(f"could not {action} {len(self.failures)} topic(s): {lines}")


@dataclass
class TopicsResult:
    """What :func:`create_topics` did, per topic."""

    created: list[str] = field(default_factory=list)
    existed: list[str] = field(default_factory=list)
    #: Existing topics whose partition count differs from the spec (not changed).
    mismatched: dict[str, str] = field(default_factory=dict)
    #: Existing topics whose retention was changed to the settings': name -> "old -> new".
    altered: dict[str, str] = field(default_factory=dict)


def _admin(settings: Settings) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(kafka_config(settings))


def create_topics(
    settings: Settings,
    topics: Topics | None = None,
    *,
    only: Iterable[str] | None = None,
    timeout_s: float = 30.0,
) -> TopicsResult:
    """Create the pipeline's topics; topics that exist already are left as they are.

    Args:
        settings: Connection, partitions and replication factor.
        topics: The names (default: the deployment's, :meth:`Topics.from_settings`).
        only: Create just these names (e.g. a replay's stage topics).
        timeout_s: Per-operation timeout.

    Returns:
        Which topics were created and which existed; an existing topic whose partition
        count differs from the spec is listed in ``mismatched`` (a warning, not an error).

    Raises:
        TopicAdminError: some topics could not be created (every failure is listed).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    topics = topics or Topics.from_settings(settings)
    wanted = set(only) if only is not None else None
    specs = [s for s in topic_specs(settings, topics) if wanted is None or s.name in wanted]
    admin = _admin(settings)
    new = [
        NewTopic(
            s.name,
            num_partitions=s.partitions,
            replication_factor=settings.kafka_replication_factor,
            config=dict(s.configs),
        )
        for s in specs
    ]
    result = TopicsResult()
    failures: dict[str, str] = {}
    if not new:
        return result
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                result.existed.append(name)
            else:
                failures[name] = error.str()
        else:
            result.created.append(name)
    if result.existed:
        metadata = admin.list_topics(timeout=timeout_s)
        by_name = {s.name: s for s in specs}
        for name in result.existed:
            meta = metadata.topics.get(name)
            have = len(meta.partitions) if meta is not None else None
            if have is not None and have != by_name[name].partitions:
                result.mismatched[name] = (
                    f"has {have} partitions, the spec says {by_name[name].partitions}"
                )
    if failures:
        raise TopicAdminError("create", failures)
    retained = {getattr(topics, n) for n in RETAINED}
    _align_retention(admin, [s for s in specs if s.name in result.existed
                             and s.name in retained], result, timeout_s)
    if result.created:
        _wait_for_leaders(admin, result.created, timeout_s)
    return result


def _align_retention(admin: Any, specs: list[TopicSpec], result: TopicsResult,
                     timeout_s: float) -> None:
    """Set ``retention.ms`` of existing topics to their spec (incremental: nothing else of
    their configuration changes)."""
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
    )

    if not specs:
        return
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    described = admin.describe_configs(resources, request_timeout=timeout_s)
    failures = {}
    for spec, res in zip(specs, resources, strict=True):
        want = spec.configs["retention.ms"]
        have = described[res].result(timeout=timeout_s + 5)["retention.ms"].value
        if have == want:
            continue
        alter = ConfigResource(ConfigResource.Type.TOPIC, spec.name, incremental_configs=[
            ConfigEntry("retention.ms", want,
                        incremental_operation=AlterConfigOpType.SET)])
        try:
            admin.incremental_alter_configs([alter], request_timeout=timeout_s)[alter].result(
                timeout=timeout_s + 5)
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            failures[spec.name] = f"retention.ms: {exc}"
            continue
        result.altered[spec.name] = f"retention.ms {have} -> {want}"
    if failures:
        raise TopicAdminError("alter", failures)


def _wait_for_leaders(admin: Any, names: list[str], timeout_s: float) -> None:
    """Block until every partition of ``names`` has a leader: a topic that was just created
    answers NOT_LEADER_FOR_PARTITION for a moment, which the next client would trip over."""
    import time

    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending:
        metadata = admin.list_topics(timeout=timeout_s)
        for name in list(pending):
            meta = metadata.topics.get(name)
            if meta is not None and meta.error is None and meta.partitions and all(
                    p.leader >= 0 and p.error is None for p in meta.partitions.values()):
                pending.discard(name)
        if pending:
            if time.monotonic() > deadline:
                raise TopicAdminError("create", {n: f"no leader after {timeout_s:.0f}s"
                                                 for n in sorted(pending)})
            time.sleep(0.1)  # metadata polling interval


def delete_topics(settings: Settings, names: Iterable[str], *, timeout_s: float = 30.0) -> None:
    """Delete topics; names that do not exist are ignored.

    Raises:
        TopicAdminError: some topics could not be deleted (every failure is listed).
    """
    from confluent_kafka import KafkaError, KafkaException

    names = list(names)
    if not names:
        return
    admin = _admin(settings)
    failures: dict[str, str] = {}
    futures = admin.delete_topics(names, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                failures[name] = error.str()
    if failures:
        raise TopicAdminError("delete", failures)
