"""The ingest-first rule of the sleep workers (no servers: the decision alone)."""

from __future__ import annotations

import pytest

from lightmem.streams.kafka.lag import PartitionLag
from lightmem.streams.sleep.ingest_priority import IngestPriority, ingest_backlog


def test_yields_above_the_threshold_and_resumes_under_half() -> None:
    rule = IngestPriority(200)
    seen = [rule.observe(b) for b in (0, 150, 200, 201, 180, 101, 100, 150, 201, 99)]
    assert seen == [False, False, False, True, True, True, False, False, True, False]


def test_unknown_backlog_keeps_the_last_decision() -> None:
    rule = IngestPriority(10)
    assert rule.observe(None) is False
    assert rule.observe(11) is True
    assert rule.observe(None) is True
    assert rule.observe(5) is False


def test_zero_never_yields() -> None:
    rule = IngestPriority(0)
    assert [rule.observe(b) for b in (0, 10**6, None)] == [False, False, False]


def test_negative_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="yield_above"):
        IngestPriority(-1)


def test_backlog_counts_only_partitions_the_ingest_group_committed_on() -> None:
    lags = [PartitionLag("t", 0, 5, 30, 25), PartitionLag("t", 1, None, 900, 900),
            PartitionLag("s", 0, 0, 7, 7)]
    assert ingest_backlog(lags) == 32
    # No ingest worker ever ran on these topics (entries written by a backfill): no backlog.
    assert ingest_backlog([PartitionLag("t", 0, None, 900, 900)]) is None
    assert ingest_backlog([]) is None
