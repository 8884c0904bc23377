"""The sleep worker's commit arithmetic (processors/sleep_batches.py), without Kafka."""

from lightmem.processors.sleep_batches import commit_plan, incomplete_offsets


def test_a_complete_batch_commits_its_end_and_rewinds_nothing() -> None:
    plan = commit_plan({0: 10, 1: 4}, held={}, earlier_held={}, incomplete={})
    assert plan.commit == {0: 10, 1: 4} and plan.rewind == {} and plan.held == {}


def test_the_first_incomplete_offset_stops_the_commit_and_is_read_again() -> None:
    plan = commit_plan({0: 10}, held={}, earlier_held={}, incomplete={0: {7, 5}})
    assert plan.commit == {0: 5} and plan.rewind == {0: 5}


def test_a_held_entry_stops_the_commit_but_waits_for_the_window_not_a_seek() -> None:
    plan = commit_plan({0: 10}, held={0: 3}, earlier_held={}, incomplete={0: {6}})
    assert plan.commit == {0: 3} and plan.rewind == {} and plan.held == {0: 3}


def test_an_earlier_batchs_held_entry_keeps_holding_the_commit() -> None:
    plan = commit_plan({0: 20, 1: 9}, held={0: 15}, earlier_held={0: 12, 2: 4},
                       incomplete={1: {8}})
    assert plan.commit == {0: 12, 1: 8} and plan.rewind == {1: 8}
    assert plan.held == {0: 12, 2: 4}  # partition 2 (not in this batch) is kept


def test_entries_waiting_for_failed_targets_are_incomplete() -> None:
    waits = {"t1": [(0, 3), (0, 4)], "t2": [(1, 7)], "t3": [(0, 9)]}
    assert incomplete_offsets(waits, done={"t2"}) == {0: {3, 4, 9}}
    assert incomplete_offsets(waits, done={"t1", "t2", "t3"}) == {}
