"""The worker's stall watchdog decision (no servers): which partitions to seek back."""

from __future__ import annotations

import pytest

pytest.importorskip("faust", reason="faust-streaming (the stream extra) is missing")

from lightmem.streams.app import StallDetector  # noqa: E402
from lightmem.streams.lag import PartitionLag  # noqa: E402


def lag(partition: int, committed: int, high: int) -> PartitionLag:
    return PartitionLag("turns", partition, committed, high, high - committed)


def test_a_partition_behind_with_the_same_offset_for_stall_s_is_reported_once() -> None:
    d = StallDetector(15.0)
    assert d.observe(0.0, [lag(3, 87, 241)]) == []
    assert d.observe(14.9, [lag(3, 87, 241)]) == []
    [stalled] = d.observe(15.0, [lag(3, 87, 241)])
    assert (stalled.partition, stalled.high - stalled.lag) == (3, 87)
    # Reported, then forgotten: still stalled after the seek -> reported again later.
    assert d.observe(16.0, [lag(3, 87, 241)]) == []
    assert [p.partition for p in d.observe(31.0, [lag(3, 87, 241)])] == [3]


def test_progress_or_no_lag_is_not_a_stall() -> None:
    d = StallDetector(15.0)
    d.observe(0.0, [lag(0, 10, 20), lag(1, 5, 5)])
    # Partition 0 committed more: the clock starts over; partition 1 has nothing to read.
    assert d.observe(20.0, [lag(0, 12, 20), lag(1, 5, 5)]) == []
    assert d.observe(34.0, [lag(0, 12, 20)]) == []
    assert [p.partition for p in d.observe(35.0, [lag(0, 12, 20)])] == [0]
    # Caught up meanwhile: forgotten.
    d.observe(40.0, [lag(0, 13, 20)])
    d.observe(41.0, [lag(0, 20, 20)])
    assert d.observe(100.0, [lag(0, 20, 20)]) == []


def test_reset_forgets_what_was_seen() -> None:
    d = StallDetector(15.0)
    d.observe(0.0, [lag(2, 1, 9)])
    d.reset()
    assert d.observe(15.0, [lag(2, 1, 9)]) == []
    assert [p.partition for p in d.observe(30.0, [lag(2, 1, 9)])] == [2]
