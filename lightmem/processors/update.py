"""Consolidation (the sleep-time update): update queues, targets, one LLM decision per target,
applying it.

The flow (DESIGN.md section 1, "Long-term memory")::

    entry e --kNN (same scope, event time <= e's)--> UpdateQueueBuilder.build --> UpdateQueue
    queues --targets_from_queues(threshold)--> {target: [(newer, score), ...]}
    target + newer --Consolidator.decide (ONE chat call)--> Decision(update|delete|ignore)
    Decision --apply_decision--> (new entry | None, MemoryChange | None)
    consolidate_target = read from the store + decide + apply with optimistic concurrency

Only newer entries change older ones. "Older" is a strict order on ``(event_time, turn_seq,
id)``: entries of turns with the same event time (a LoCoMo session dates all its turns alike)
are ordered as their source turns arrived (``turn_seq``: the turns-topic offset, or the
embedded runtime's turn count), so a later turn's fact updates or deletes an earlier one and
never the other way round; only facts of one turn (or entries without a ``turn_seq``, which
count as earliest) fall back to the id. Every pair is ordered, so entries never list each
other both ways and no pair can update each other in a cycle. Targets are independent of
one another, so callers may run them in parallel (the Kafka sleep worker: one user scope
per partition).

Everything here except :func:`consolidate_target` and :func:`build_queues` is pure; those
two talk to the store only through the :class:`~lightmem.processors.store.MemoryStore`
protocol.

Exceptions: none of its own. :class:`~lightmem.processors.store.VersionConflict` escapes
:func:`consolidate_target` once its retries are spent; LLM errors propagate from
:meth:`Consolidator.decide` (nothing has been written at that point).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np

from lightmem.processors.llm import ChatMessage, ChatModel
from lightmem.processors.retrieve import render
from lightmem.processors.store import MemoryStore, ScoredEntry, VersionConflict
from lightmem.schemas import ChangeOp, MemoryChange, MemoryEntry, stable_id

__all__ = [
    "Action",
    "UpdateQueue",
    "UpdateQueueBuilder",
    "build_queues",
    "targets_from_queues",
    "Decision",
    "Consolidator",
    "parse_decision",
    "added_change",
    "apply_decision",
    "consolidate_target",
    "is_older",
    "UNPARSEABLE",
]

Action = Literal["update", "delete", "ignore"]

#: Reason given when the model's reply could not be read; the target is left alone.
UNPARSEABLE = "unparseable"


def _order_key(entry: MemoryEntry) -> tuple[datetime, int, str]:
    seq = -1 if entry.turn_seq is None else entry.turn_seq
    return (entry.event_time, seq, entry.id)


def is_older(a: MemoryEntry, b: MemoryEntry) -> bool:
    """True if ``a`` comes strictly before ``b`` in time.

    The order is ``(event_time, turn_seq, id)``: ties on time are broken by the order the
    source turns arrived in (no ``turn_seq`` counts as earliest), then by id, so for two
    distinct entries exactly one is older than the other.
    """
    return _order_key(a) < _order_key(b)


def _same_scope(a: MemoryEntry, b: MemoryEntry) -> bool:
    return a.tenant == b.tenant and a.user == b.user


# --------------------------------------------------------------------------- queues


@dataclass(frozen=True)
class UpdateQueue:
    """The older entries a newer entry may update, most similar first."""

    #: The (newer) entry the queue belongs to.
    entry_id: str
    #: Its scope, ``scope_key(tenant, user)``.
    scope: str
    #: ``(target_id, cosine score)`` pairs, best first; every target is older than the entry.
    items: list[tuple[str, float]]


class UpdateQueueBuilder:
    """Builds an entry's update queue from the kNN candidates a store returned.

    The caller runs the kNN (``k = top_k + 1``, see :attr:`search_k`, same scope, event time
    <= the entry's); the builder re-applies every rule itself, so a store that ignores a
    filter cannot produce a wrong queue: same tenant and user, not the entry itself, only
    strictly older entries (see :func:`is_older`), then the best ``keep`` by score.

    Args:
        top_k: How many similar entries to consider (default 20).
        keep: How many of them the queue keeps (default 10); must be <= ``top_k``.
    """

    def __init__(self, top_k: int = 20, keep: int = 10) -> None:
        if top_k < 1:
            raise ValueError(f"top_k: must be >= 1 (got {top_k!r})")
        if not 1 <= keep <= top_k:
            raise ValueError(f"keep: must be between 1 and top_k={top_k} (got {keep!r})")
        self.top_k = top_k
        self.keep = keep

    @property
    def search_k(self) -> int:
        """k to ask the store for: ``top_k`` plus one, because the entry finds itself."""
        return self.top_k + 1

    def build(self, entry: MemoryEntry, candidates: Sequence[ScoredEntry]) -> UpdateQueue:
        """Build ``entry``'s queue.

        Args:
            entry: The newer entry.
            candidates: kNN hits for ``entry``'s embedding, in any order.

        Returns:
            The queue: at most ``min(top_k, keep)`` targets, best score first (ties by id,
            so the result does not depend on the store's order).
        """
        best: dict[str, float] = {}
        for hit in candidates:
            target = hit.entry
            score = float(hit.score)
            if (
                target.id == entry.id
                or not _same_scope(target, entry)
                or not is_older(target, entry)
                or not math.isfinite(score)
            ):
                continue
            # A store may return an entry twice (shards, replicas): keep its best score.
            if score > best.get(target.id, -math.inf):
                best[target.id] = score
        ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
        return UpdateQueue(
            entry_id=entry.id, scope=entry.scope, items=ranked[: self.top_k][: self.keep]
        )


def build_queues(
    store: MemoryStore,
    builder: UpdateQueueBuilder,
    entries: Sequence[MemoryEntry],
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> list[UpdateQueue]:
    """Run the kNN for each entry and build its queue.

    Args:
        store: The memory store; one ``search`` per entry, bounded by the entry's event time.
        builder: The queue rules.
        entries: Entries to build queues for. Entries read from the topic carry no
            embedding; those are embedded with ``embed`` in one batch.
        embed: Encoder for entries without an embedding (None: they are an error).

    Returns:
        One queue per entry, in input order.
    """
    missing = [i for i, e in enumerate(entries) if e.embedding is None]
    vectors: dict[int, list[float]] = {}
    if missing:
        if embed is None:
            ids = [entries[i].id for i in missing]
            raise ValueError(f"embedding: missing on entries {ids!r} and no embed given")
        matrix = np.asarray(embed([entries[i].fact for i in missing]), dtype=np.float32)
        vectors = {i: row.tolist() for i, row in zip(missing, matrix, strict=True)}
    queues = []
    for i, entry in enumerate(entries):
        vector = vectors[i] if i in vectors else entry.embedding
        assert vector is not None  # filled above
        hits = store.search(
            entry.tenant, entry.user, vector, builder.search_k, not_after=entry.event_time
        )
        queues.append(builder.build(entry, hits))
    return queues


def targets_from_queues(
    queues: Iterable[UpdateQueue],
    entries_by_id: Mapping[str, MemoryEntry],
    threshold: float = 0.8,
) -> dict[str, list[tuple[str, float]]]:
    """Invert the queues: each target with every newer entry that lists it closely enough.

    Args:
        queues: Update queues of the newer entries.
        entries_by_id: The entries the queues refer to. Ids absent here (deleted since the
            queue was built) are skipped; the temporal and scope rules are checked again.
        threshold: Minimum cosine score (inclusive, default 0.8; the design uses 0.8-0.9).

    Returns:
        ``{target_id: [(newer_id, score), ...]}``: targets oldest first, each target's newer
        entries oldest first, so a prompt reads them in the order they happened.
    """
    pairs: dict[str, dict[str, float]] = {}
    for queue in queues:
        newer = entries_by_id.get(queue.entry_id)
        if newer is None:
            continue
        for target_id, score in queue.items:
            # "not >=" rather than "<" also drops NaN scores.
            if not score >= threshold:
                continue
            target = entries_by_id.get(target_id)
            if target is None or not _same_scope(target, newer) or not is_older(target, newer):
                continue
            seen = pairs.setdefault(target_id, {})
            seen[newer.id] = max(seen.get(newer.id, -math.inf), float(score))
    result: dict[str, list[tuple[str, float]]] = {}
    for target_id in sorted(pairs, key=lambda i: _order_key(entries_by_id[i])):
        by_newer = pairs[target_id]
        ordered = sorted(by_newer, key=lambda i: _order_key(entries_by_id[i]))
        result[target_id] = [(i, by_newer[i]) for i in ordered]
    return result


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """What to do with a target after reading the newer entries."""

    #: ``update`` (merge newer detail), ``delete`` (contradicted) or ``ignore``.
    action: Action
    #: The merged fact; set exactly when ``action`` is ``update``.
    new_fact: str | None = None
    #: The model's explanation, or why the reply was not followed.
    reason: str = ""


CONSOLIDATE_SYSTEM_PROMPT = """\
You maintain the long-term memory of an assistant about one user. You get one stored \
memory, the TARGET, and NEWER memories about the same user that look related to it. Each \
memory starts with the date it happened and its weekday. Only the newer memories may change \
the target; do not use outside knowledge. Choose one action for the target:
- "update": the newer memories add to or refine the target. Write new_fact: ONE standalone \
sentence that keeps what is still true in the target and adds the newer detail (write dates \
out, never "yesterday").
- "delete": the newer memories contradict the target or make it obsolete, and they already \
state what is true now.
- "ignore": the target stays as it is (the newer memories repeat it or are about something \
else).
Reply with one JSON object and nothing else:
{"action": "update" | "delete" | "ignore", "new_fact": "<only for update>", "reason": "<short>"}"""

# Words small or chatty models use for the three actions. Keys are normalised with
# _norm_word (lower case, runs of non-letters -> "_").
_ACTION_SYNONYMS: dict[str, Action] = {
    **dict.fromkeys(
        "update updated updating merge merged modify modified edit revise replace amend"
        " combine change refine rewrite".split(),
        "update",
    ),
    **dict.fromkeys(
        "delete deleted remove removed drop discard forget obsolete invalidate"
        " contradicted".split(),
        "delete",
    ),
    **dict.fromkeys(
        "ignore ignored none keep kept noop no_op skip nothing no_change no_changes"
        " unchanged retain leave pass same".split(),
        "ignore",
    ),
}
_ACTION_KEYS = ("action", "decision", "operation", "op", "event", "type")
_FACT_KEYS = tuple(
    "new_fact newfact updated_fact merged_fact new_memory updated_memory fact memory text"
    " content".split()
)
_REASON_KEYS = ("reason", "reasoning", "explanation", "rationale", "why")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


def _norm_word(value: str) -> str:
    return re.sub(r"[^a-z]+", "_", value.lower()).strip("_")


def _first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text``: inside code fences first, then anywhere."""
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for source in sources:
        for start in (i for i, ch in enumerate(source) if ch in "{["):
            try:
                value, _ = _DECODER.raw_decode(source, start)
            except ValueError:
                continue
            # Some models wrap the object in a list: take its first object.
            if isinstance(value, list):
                value = next((v for v in value if isinstance(v, dict)), None)
            if isinstance(value, dict):
                return value
    return None


def _pick(obj: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in obj and obj[key] is not None:
            return obj[key]
    return None


def parse_decision(text: str) -> Decision:
    """Read a consolidation reply. Never raises, and never deletes on an unreadable reply.

    Accepts the JSON object bare, inside code fences or surrounded by prose; keys and
    actions in any case; action synonyms ("merge" -> update, "remove" -> delete, "none",
    "keep" -> ignore, ...). An update without a usable ``new_fact`` becomes ignore.

    Args:
        text: The model's reply.

    Returns:
        The decision; ``ignore`` with reason starting with ``"unparseable"`` when no
        decision could be read.
    """
    obj = _first_json_object(text)
    if obj is None:
        return Decision("ignore", reason=UNPARSEABLE)
    fields = {_norm_word(str(k)): v for k, v in obj.items()}
    raw_action = _pick(fields, _ACTION_KEYS)
    if isinstance(raw_action, dict):
        # {"decision": {"action": ..., "new_fact": ...}}: read the inner object instead.
        fields = {_norm_word(str(k)): v for k, v in raw_action.items()}
        raw_action = _pick(fields, _ACTION_KEYS)
    if not isinstance(raw_action, str):
        return Decision("ignore", reason=f"{UNPARSEABLE}: no action")
    action = _ACTION_SYNONYMS.get(_norm_word(raw_action))
    if action is None:
        return Decision("ignore", reason=f"{UNPARSEABLE}: unknown action {raw_action[:40]!r}")
    raw_reason = _pick(fields, _REASON_KEYS)
    reason = " ".join(str(raw_reason).split()) if raw_reason is not None else ""
    if action != "update":
        return Decision(action, reason=reason)
    raw_fact = _pick(fields, _FACT_KEYS)
    new_fact = " ".join(raw_fact.split()) if isinstance(raw_fact, str) else ""
    if not new_fact:
        return Decision("ignore", reason="update without new_fact")
    return Decision("update", new_fact=new_fact, reason=reason)


def _strictly_newer(target: MemoryEntry, newer: Iterable[MemoryEntry]) -> list[MemoryEntry]:
    """``newer`` restricted to entries of the target's scope that are newer, oldest first,
    without duplicates: the one rule of consolidation is that only newer entries
    change older ones."""
    unique = {n.id: n for n in newer if _same_scope(n, target) and is_older(target, n)}
    return sorted(unique.values(), key=_order_key)


class Consolidator:
    """Decides, with ONE chat call per target, whether newer entries update or delete it.

    Args:
        chat: The chat model; calls are counted under purpose ``consolidate`` and the target's
            tenant.
        threshold: Minimum similarity for a newer entry to be considered (default 0.8),
            used by :meth:`targets`.
        max_tokens: Completion limit per call (default 256).
    """

    def __init__(self, chat: ChatModel, *, threshold: float = 0.8, max_tokens: int = 256):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: must be a cosine in [-1, 1] (got {threshold!r})")
        self.chat = chat
        self.threshold = threshold
        self.max_tokens = max_tokens

    def targets(
        self, queues: Iterable[UpdateQueue], entries_by_id: Mapping[str, MemoryEntry]
    ) -> dict[str, list[tuple[str, float]]]:
        """:func:`targets_from_queues` with this consolidator's threshold."""
        return targets_from_queues(queues, entries_by_id, self.threshold)

    def messages(self, target: MemoryEntry, newer: Sequence[MemoryEntry]) -> list[ChatMessage]:
        """The prompt for one target.

        Args:
            target: The older entry under review.
            newer: Newer entries (already filtered and ordered oldest first).

        Returns:
            System and user messages.
        """
        lines = ["TARGET memory:", render(target), "", "NEWER memories (oldest first):"]
        lines += [f"{i}. {render(n)}" for i, n in enumerate(newer, start=1)]
        lines += ["", "Reply with the JSON object only."]
        return [
            ChatMessage("system", CONSOLIDATE_SYSTEM_PROMPT),
            ChatMessage("user", "\n".join(lines)),
        ]

    def decide(self, target: MemoryEntry, newer: Sequence[MemoryEntry]) -> Decision:
        """Ask the model what to do with ``target`` given ``newer``.

        Entries in ``newer`` that are not strictly newer than ``target`` or belong to another
        scope are dropped first; with none left there is no call and the answer is ignore.

        Args:
            target: The older entry.
            newer: The newer entries whose queues list it.

        Returns:
            The decision. Unreadable replies give ignore (see :func:`parse_decision`), and
            an update that leaves the fact as it was is reported as ignore.

        Raises:
            LLMError: from the chat model; nothing has been changed.
        """
        newer = _strictly_newer(target, newer)
        if not newer:
            return Decision("ignore", reason="no newer entries")
        completion = self.chat.complete(
            self.messages(target, newer),
            purpose="consolidate",
            tenant=target.tenant,
            json_mode=True,
            max_tokens=self.max_tokens,
        )
        decision = parse_decision(completion.text)
        if decision.action == "update" and decision.new_fact == " ".join(target.fact.split()):
            # Re-writing the same text would bump the version and re-embed for nothing.
            reason = "; ".join(filter(None, ["update leaves the fact unchanged", decision.reason]))
            return Decision("ignore", reason=reason)
        return decision


# --------------------------------------------------------------------------- applying


def _join_texts(parts: Iterable[str]) -> str:
    return "\n".join(p for p in parts if p)


def added_change(entry: MemoryEntry, now: datetime) -> MemoryChange:
    """The ``add`` change recorded for an entry written at ingest, by both runtimes
    (deterministic id; without the vector: history and the changes topic never need it)."""
    return MemoryChange(
        change_id=stable_id(entry.id, ChangeOp.add.value, entry.version),
        op=ChangeOp.add,
        memory_id=entry.id,
        tenant=entry.tenant,
        user=entry.user,
        after=entry.model_copy(update={"embedding": None}),
        reason="ingest",
        at=now,
    )


def apply_decision(
    target: MemoryEntry,
    decision: Decision,
    newer: Sequence[MemoryEntry],
    now: datetime,
) -> tuple[MemoryEntry | None, MemoryChange | None]:
    """Turn a decision into the entry to store and the change record to publish.

    Args:
        target: The entry the decision is about, as read (its version is the expected one).
        decision: The consolidator's decision.
        newer: The newer entries the decision was made with (``caused_by``; an update also
            takes their source turns). Entries that are not strictly newer are left out.
        now: When the change is made (timezone-aware); the updated entry's ``ingest_time``.

    Returns:
        - update: ``(new entry, change)``. The new entry has the new fact, ``version + 1``,
          no embedding (the fact changed, so the old vector is wrong: re-embed before
          storing), the newer entries' source turns and texts appended, and the target's
          event time (keeping it keeps the temporal order of queues stable).
        - delete: ``(None, change)`` with ``before = target``.
        - ignore (or an update without a fact): ``(target, None)``.

        ``change_id`` is ``stable_id(memory_id, op, resulting version)`` (a delete counts
        as one more version), so a replayed decision yields the same change id.
    """
    newer = _strictly_newer(target, newer)
    caused_by = [n.id for n in newer]
    if decision.action == "update" and decision.new_fact:
        sources = list(target.source_turn_ids)
        originals, compressed = [target.original_text], [target.compressed_text]
        for n in newer:
            added = [t for t in n.source_turn_ids if t not in sources]
            if added:
                # Only text of turns not already behind the fact, so that repeated updates
                # from the same turns do not duplicate the audit text.
                sources += added
                originals.append(n.original_text)
                compressed.append(n.compressed_text)
        version = target.version + 1
        updated = MemoryEntry.model_validate(
            {
                **target.model_dump(),
                "fact": decision.new_fact,
                "version": version,
                "embedding": None,
                "source_turn_ids": sources,
                "original_text": _join_texts(originals),
                "compressed_text": _join_texts(compressed),
                "ingest_time": now,
            }
        )
        change = MemoryChange(
            change_id=stable_id(target.id, ChangeOp.update.value, version),
            op=ChangeOp.update,
            memory_id=target.id,
            tenant=target.tenant,
            user=target.user,
            before=target,
            after=updated,
            caused_by=caused_by,
            reason=decision.reason,
            at=now,
        )
        return updated, change
    if decision.action == "delete":
        change = MemoryChange(
            change_id=stable_id(target.id, ChangeOp.delete.value, target.version + 1),
            op=ChangeOp.delete,
            memory_id=target.id,
            tenant=target.tenant,
            user=target.user,
            before=target,
            after=None,
            caused_by=caused_by,
            reason=decision.reason,
            at=now,
        )
        return None, change
    return target, None


def consolidate_target(
    store: MemoryStore,
    consolidator: Consolidator,
    embedder: Callable[[Sequence[str]], np.ndarray],
    target_id: str,
    newer_ids: Sequence[str],
    now: datetime,
    max_conflict_retries: int = 3,
) -> MemoryChange | None:
    """Revisit one target: read it and its newer entries, decide, write, report.

    The write is optimistic: ``replace``/``delete`` with the version that was read. If
    another writer got there first (:class:`VersionConflict`), the target and the newer
    entries are read again and the decision is made again on the fresh state (one more
    chat call), since the old decision was about text that no longer exists.

    Args:
        store: The memory store.
        consolidator: Makes the decision (one chat call per attempt).
        embedder: Re-embeds an updated fact before it is stored.
        target_id: The older entry.
        newer_ids: Newer entries whose queues list it (see :func:`targets_from_queues`).
        now: When the change is made (timezone-aware).
        max_conflict_retries: Extra attempts after a version conflict (default 3).

    Returns:
        The change written (update or delete), or None when nothing changed: ignore, the
        target is gone, or no newer entry is left.

    Raises:
        VersionConflict: still conflicting after ``max_conflict_retries`` retries.
        LLMError: from the chat model; nothing was written in that attempt.
    """
    if max_conflict_retries < 0:
        raise ValueError(f"max_conflict_retries: must be >= 0 (got {max_conflict_retries!r})")
    for _attempt in range(max_conflict_retries + 1):
        stored = {e.id: e for e in store.get([target_id, *newer_ids])}
        target = stored.get(target_id)
        if target is None:
            return None  # deleted since the queues were built: nothing to revisit
        newer = [stored[i] for i in newer_ids if i in stored and i != target_id]
        decision = consolidator.decide(target, newer)
        entry, change = apply_decision(target, decision, newer, now)
        if change is None:
            return None
        try:
            if entry is not None:
                vector = np.asarray(embedder([entry.fact]), dtype=np.float32)[0]
                entry = entry.model_copy(update={"embedding": vector.tolist()})
                store.replace(entry, expected_version=target.version)
                # Re-validated (model_copy would skip it) so the record drops the vector.
                change = MemoryChange.model_validate({**change.model_dump(), "after": entry})
            else:
                store.delete(target.id, expected_version=target.version)
        except VersionConflict:
            continue
        return change
    raise VersionConflict(
        f"target {target_id!r}: version still changing after {max_conflict_retries + 1} attempts"
    )
