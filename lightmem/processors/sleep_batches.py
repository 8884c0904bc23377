"""The sleep worker's offset arithmetic for one batch, pure: where each partition commits and
where it is read again.

A partition commits up to its first offset that must be read again: an entry *held* (its
tenant's window is closed), held by an earlier batch, or *incomplete* (not indexed yet, or its
target failed or never started before the window closed). Everything before that offset is
done; everything from it on is read again (the worker seeks there, except for held entries,
which are rewound when the window changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["CommitPlan", "commit_plan", "incomplete_offsets"]


@dataclass(frozen=True)
class CommitPlan:
    """Per partition: the offset to commit, and where to seek to read the rest again."""

    commit: dict[int, int] = field(default_factory=dict)
    rewind: dict[int, int] = field(default_factory=dict)
    #: The first held offset per partition after this batch (earlier batches' included).
    held: dict[int, int] = field(default_factory=dict)


def commit_plan(
    batch_ends: Mapping[int, int],
    held: Mapping[int, int],
    earlier_held: Mapping[int, int],
    incomplete: Mapping[int, Iterable[int]],
) -> CommitPlan:
    """The commit and rewind points of one batch.

    Args:
        batch_ends: Per (still assigned) partition, one past the batch's last offset.
        held: Per partition, the first offset this batch held.
        earlier_held: Per partition, the first offset an earlier batch held (not yet
            released by a window change).
        incomplete: Per partition, the offsets this batch must read again.

    Returns:
        ``commit[p]`` = the first offset to read again (or the batch end); ``rewind[p]`` set
        when that offset is an incomplete one (held ones are rewound on a window change).
    """
    commit: dict[int, int] = {}
    rewind: dict[int, int] = {}
    held_after = dict(earlier_held)
    for p, end in batch_ends.items():
        first_incomplete = min(incomplete.get(p, ()), default=None)
        stops = [o for o in (held.get(p), earlier_held.get(p), first_incomplete)
                 if o is not None]
        point = min([end, *stops])
        commit[p] = point
        if p in held:
            held_after[p] = min(earlier_held.get(p, held[p]), held[p])
        if first_incomplete is not None and point == first_incomplete:
            rewind[p] = point
    return CommitPlan(commit=commit, rewind=rewind, held=held_after)


def incomplete_offsets(
    waits: Mapping[str, Iterable[tuple[int, int]]], done: Iterable[str]
) -> dict[int, set[int]]:
    """The (partition -> offsets) whose entries wait for a target that is not done.

    Args:
        waits: Target id -> the (partition, offset) of the newer entries it waits for.
        done: The targets whose outcome is durable.
    """
    finished = set(done)
    out: dict[int, set[int]] = {}
    for target, offsets in waits.items():
        if target in finished:
            continue
        for p, o in offsets:
            out.setdefault(p, set()).add(o)
    return out
