"""The three stream stages as plain steps over record batches, without any Kafka client.

Each stage turns a batch of raw inbound records (bytes, with topic/partition/offset) and the
table slots it touches into the records to produce and the slots to write back
(:class:`StepResult`); the ingest worker only moves bytes and commits (see :mod:`.step` for
the delivery semantics and failure sorting). One module per stage: :mod:`.sensory`,
:mod:`.short_term`, :mod:`.index_sink`; what they share in :mod:`.step`. This module
re-exports their public names.
"""

from lightmem.streams.ingest.index_sink import IndexSink
from lightmem.streams.ingest.sensory import SensorySlot, SensoryStage
from lightmem.streams.ingest.short_term import ShortTermStage, TopicSlot
from lightmem.streams.ingest.step import (
    ORIGIN_HEADER,
    ORIGINS_HEADER,
    REDELIVERY_HEADER,
    SUMMARIZER_SOURCE,
    Inbound,
    Outbound,
    StepResult,
    is_transient,
)

__all__ = [
    "Inbound",
    "Outbound",
    "StepResult",
    "SensorySlot",
    "TopicSlot",
    "SensoryStage",
    "ShortTermStage",
    "IndexSink",
    "is_transient",
    "REDELIVERY_HEADER",
    "SUMMARIZER_SOURCE",
    "ORIGINS_HEADER",
    "ORIGIN_HEADER",
]
