"""Sleep-time work planning shared by the embedded runtime and the Kafka sleep workers.

:mod:`lightmem.processors.update` decides and applies one target at a time; this module adds
the two things a *replayable*, *concurrent* run needs on top of it:

* **Idempotence on replay** (:func:`unreflected`, :func:`consolidate_pending`). A sleep
  worker killed after it updated a target but before it committed its offsets replays the
  same entries. An update appends every newer entry's source turns to the target
  (:func:`~lightmem.processors.update.apply_decision`), so "all of this entry's source turns
  are already behind the target" means "this entry was folded in already": such entries are
  not offered again, and a target with none left is skipped without an LLM call. A deleted
  target is simply gone (``consolidate_target`` returns None). Together: a redelivered entry
  is never applied twice.
* **A deterministic order under concurrency** (:func:`schedule_targets`). Targets are
  independent except when one target is also a *newer* entry of another: the older target
  reads it, so it must read it before it changes. ``schedule_targets`` makes every target wait
  for the targets that read it, which is exactly the order of a sequential run (oldest target
  first); everything else runs in parallel.

Pure: the store comes in through the :class:`~lightmem.processors.store.MemoryStore` protocol.

Exceptions: none of its own (see :func:`~lightmem.processors.update.consolidate_target`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from lightmem.schemas import MemoryChange, MemoryEntry

from .store import MemoryStore
from .update import Consolidator, consolidate_target

__all__ = ["TargetWork", "schedule_targets", "unreflected", "consolidate_pending", "Outcome"]


@dataclass(frozen=True)
class TargetWork:
    """One target to revisit, with what it waits for."""

    target_id: str
    #: Newer entries whose queues list the target (oldest first).
    newer_ids: tuple[str, ...]
    #: Targets that must be finished first (they read this target as a newer entry).
    after: frozenset[str]


def schedule_targets(targets: Mapping[str, Sequence[tuple[str, float]]]) -> list[TargetWork]:
    """Order ``targets`` (from :func:`~lightmem.processors.update.targets_from_queues`) for a
    concurrent run that ends where a sequential, oldest-first run ends.

    Args:
        targets: ``{target_id: [(newer_id, score), ...]}``, targets oldest first.

    Returns:
        One :class:`TargetWork` per target, in the input order. ``after`` holds the targets
        that list this one among their newer entries: they read it, so it waits for them.
    """
    readers: dict[str, set[str]] = {}
    for target_id, newer in targets.items():
        for newer_id, _ in newer:
            if newer_id in targets:
                readers.setdefault(newer_id, set()).add(target_id)
    return [
        TargetWork(t, tuple(n for n, _ in newer), frozenset(readers.get(t, ())))
        for t, newer in targets.items()
    ]


def unreflected(target: MemoryEntry, newer: Sequence[MemoryEntry]) -> list[MemoryEntry]:
    """The entries of ``newer`` that the target does not reflect yet.

    An entry is reflected when every one of its source turns is already among the target's:
    an update merged it (``apply_decision`` appends the newer entries' turns), or it stems
    from the very turns the target was extracted from and so adds no newer evidence.
    """
    have = set(target.source_turn_ids)
    return [n for n in newer if not set(n.source_turn_ids) <= have]


@dataclass(frozen=True)
class Outcome:
    """What revisiting one target did."""

    target_id: str
    #: The change written (update/delete), or None.
    change: MemoryChange | None
    #: Why nothing changed: "gone", "reflected" (replayed work), or "decided" (ignore).
    skipped: str | None = None


def consolidate_pending(
    store: MemoryStore,
    consolidator: Consolidator,
    embedder: Callable[[Sequence[str]], np.ndarray],
    target_id: str,
    newer_ids: Sequence[str],
    now: datetime,
    max_conflict_retries: int = 3,
) -> Outcome:
    """:func:`~lightmem.processors.update.consolidate_target` for the newer entries the
    target does not reflect yet (see :func:`unreflected`): replaying work is free.

    Args:
        store: The memory store.
        consolidator: One chat call per attempt.
        embedder: Re-embeds an updated fact.
        target_id: The older entry.
        newer_ids: Newer entries whose queues list it.
        now: When the change is made (timezone-aware).
        max_conflict_retries: Extra attempts after a version conflict (default 3).

    Returns:
        The outcome; ``change`` is None when the target is gone, reflects every newer entry
        already, or the model said ignore.

    Raises:
        VersionConflict: still conflicting after the retries.
        LLMError: from the chat model; nothing was written in that attempt.
    """
    stored = {e.id: e for e in store.get([target_id, *newer_ids])}
    target = stored.get(target_id)
    if target is None:
        return Outcome(target_id, None, "gone")
    pending = unreflected(target, [stored[i] for i in newer_ids if i in stored and i != target_id])
    if not pending:
        return Outcome(target_id, None, "reflected")
    change = consolidate_target(store, consolidator, embedder, target_id,
                                [n.id for n in pending], now, max_conflict_retries)
    return Outcome(target_id, change, None if change is not None else "decided")
