"""Sleep-time update: queues, targets, decisions, applying them, optimistic concurrency."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightmem.processors.llm import ChatMessage, Completion, UsageMeter
from lightmem.processors.store import ScoredEntry, VersionConflict
from lightmem.processors.update import (
    UNPARSEABLE,
    Consolidator,
    Decision,
    UpdateQueue,
    UpdateQueueBuilder,
    apply_decision,
    build_queues,
    consolidate_target,
    is_older,
    parse_decision,
    targets_from_queues,
)
from lightmem.schemas import ChangeOp, EntryMode, MemoryEntry, stable_id

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)  # a Monday
NOW = datetime(2023, 7, 1, 3, 0, tzinfo=UTC)


def entry(
    id: str,
    fact: str = "fact",
    when: datetime = T0,
    *,
    tenant: str = "acme",
    user: str = "u1",
    version: int = 1,
    sources: list[str] | None = None,
    embedding: list[float] | None = None,
    seq: int | None = None,
) -> MemoryEntry:
    return MemoryEntry(
        id=id,
        tenant=tenant,
        user=user,
        conversation="c1",
        topic_id="topic",
        speaker="Caroline",
        fact=fact,
        event_time=when,
        ingest_time=when,
        source_turn_ids=sources or [f"turn-{id}"],
        original_text=f"original {fact}",
        compressed_text=f"compressed {fact}",
        mode=EntryMode.llm,
        version=version,
        embedding=embedding,
        turn_seq=seq,
    )


def hit(e: MemoryEntry, score: float) -> ScoredEntry:
    return ScoredEntry(entry=e, score=score)


class InMemoryStore:
    """A dict-backed MemoryStore: exact cosine kNN with numpy, versioned writes."""

    def __init__(self, entries: Sequence[MemoryEntry] = ()) -> None:
        self.entries: dict[str, MemoryEntry] = {}
        self.upsert(entries)

    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        for e in entries:
            self.entries[e.id] = e

    def search(
        self,
        tenant: str,
        user: str,
        vector: Sequence[float],
        k: int,
        *,
        not_after: datetime | None = None,
    ) -> list[ScoredEntry]:
        pool = [
            e
            for e in self.entries.values()
            if e.tenant == tenant
            and e.user == user
            and e.embedding is not None
            and (not_after is None or e.event_time <= not_after)
        ]
        if not pool:
            return []
        q = np.asarray(vector, dtype=np.float64)
        m = np.asarray([e.embedding for e in pool], dtype=np.float64)
        scores = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
        order = np.argsort(-scores, kind="stable")[:k]
        return [ScoredEntry(entry=pool[i], score=float(scores[i])) for i in order]

    def get(self, ids: Sequence[str]) -> list[MemoryEntry]:
        return [self.entries[i] for i in ids if i in self.entries]

    def _check(self, entry_id: str, expected_version: int) -> None:
        stored = self.entries.get(entry_id)
        if stored is None or stored.version != expected_version:
            raise VersionConflict(entry_id)

    def replace(self, entry: MemoryEntry, *, expected_version: int) -> None:
        self._check(entry.id, expected_version)
        self.entries[entry.id] = entry

    def delete(self, entry_id: str, *, expected_version: int) -> None:
        self._check(entry_id, expected_version)
        del self.entries[entry_id]


class RacingStore(InMemoryStore):
    """Another writer edits the target just before each of our first ``races`` writes."""

    def __init__(self, entries: Sequence[MemoryEntry], races: int) -> None:
        super().__init__(entries)
        self.races = races

    def _race(self, entry_id: str) -> None:
        if self.races > 0:
            self.races -= 1
            stored = self.entries[entry_id]
            self.entries[entry_id] = stored.model_copy(
                update={"version": stored.version + 1, "fact": f"{stored.fact} (edited)"}
            )

    def replace(self, entry: MemoryEntry, *, expected_version: int) -> None:
        self._race(entry.id)
        super().replace(entry, expected_version=expected_version)

    def delete(self, entry_id: str, *, expected_version: int) -> None:
        self._race(entry_id)
        super().delete(entry_id, expected_version=expected_version)


class FakeChat:
    """A ChatModel that replays scripted replies and records every call."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[list[ChatMessage], str, str]] = []
        self.meter = UsageMeter()

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        purpose: str,
        tenant: str,
        json_mode: bool = False,
        max_tokens: int | None = None,
    ) -> Completion:
        self.calls.append((list(messages), purpose, tenant))
        text = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        completion = Completion(text=text, prompt_tokens=10, completion_tokens=5, latency_s=0.0)
        self.meter.record(purpose, tenant, completion)
        return completion


def fake_embed(texts: Sequence[str]) -> np.ndarray:
    # Deterministic, text-dependent unit vectors: enough to check that a re-embed happened.
    rows = []
    for t in texts:
        rng = np.random.default_rng(zlib.crc32(t.encode()))
        v = rng.normal(size=8)
        rows.append(v / np.linalg.norm(v))
    return np.asarray(rows, dtype=np.float32)


# --------------------------------------------------------------------------- queues


def test_queue_keeps_only_older_entries_of_the_same_scope() -> None:
    e = entry("e", when=T0 + timedelta(days=2))
    older = entry("older", when=T0)
    newer = entry("newer", when=T0 + timedelta(days=3))  # a store that ignored not_after
    other_user = entry("other-user", when=T0, user="u2")
    other_tenant = entry("other-tenant", when=T0, tenant="globex")
    queue = UpdateQueueBuilder().build(
        e,
        [
            hit(e, 1.0),
            hit(newer, 0.99),
            hit(other_user, 0.98),
            hit(other_tenant, 0.97),
            hit(older, 0.9),
        ],
    )
    assert queue == UpdateQueue(entry_id="e", scope=e.scope, items=[("older", 0.9)])


def test_an_older_entry_never_gets_a_newer_one_as_target() -> None:
    old, new = entry("a", when=T0), entry("b", when=T0 + timedelta(hours=1))
    builder = UpdateQueueBuilder()
    assert builder.build(old, [hit(new, 0.95)]).items == []
    assert builder.build(new, [hit(old, 0.95)]).items == [("a", 0.95)]


def test_same_time_entries_list_each_other_one_way_only() -> None:
    a, b = entry("a", when=T0), entry("b", when=T0)
    builder = UpdateQueueBuilder()
    a_queue, b_queue = builder.build(a, [hit(b, 0.9)]), builder.build(b, [hit(a, 0.9)])
    # The id breaks the tie: "a" counts as older, so only b's queue lists a.
    assert a_queue.items == []
    assert b_queue.items == [("a", 0.9)]


def test_same_time_entries_are_ordered_by_their_turns_not_their_ids() -> None:
    # One LoCoMo session dates every turn alike. Turn 7 says Caroline moved to Seattle after
    # turn 3 said Boston: the later turn is the newer fact, whatever the hash ids say.
    boston = entry("z-boston", "Caroline lives in Boston.", T0, seq=3)
    seattle = entry("a-seattle", "Caroline moved to Seattle.", T0, seq=7)
    assert is_older(boston, seattle) and not is_older(seattle, boston)
    builder = UpdateQueueBuilder()
    assert builder.build(seattle, [hit(boston, 0.9)]).items == [("z-boston", 0.9)]
    assert builder.build(boston, [hit(seattle, 0.9)]).items == []
    # Facts of one turn, and entries written before turn_seq existed, fall back to the id.
    assert is_older(entry("a", seq=5), entry("b", seq=5))
    assert is_older(entry("z"), entry("a", seq=0))


def test_same_time_delete_goes_from_the_later_turn_to_the_earlier() -> None:
    vec = [1.0, 0.0, 0.0]
    boston = entry("z-boston", "Caroline lives in Boston.", T0, seq=3, embedding=vec)
    seattle = entry("a-seattle", "Caroline moved to Seattle.", T0, seq=7, embedding=vec)
    store = InMemoryStore([boston, seattle])
    queues = build_queues(store, UpdateQueueBuilder(), [boston, seattle])
    consolidator = Consolidator(FakeChat('{"action": "delete", "reason": "moved"}'))
    targets = consolidator.targets(queues, {e.id: e for e in (boston, seattle)})
    assert list(targets) == ["z-boston"]
    for target, newer in targets.items():
        consolidate_target(store, consolidator, fake_embed, target, [n for n, _ in newer], NOW)
    assert sorted(store.entries) == ["a-seattle"]


def test_update_keeps_the_targets_place_in_time() -> None:
    target = entry("t", "Caroline lives in Boston.", T0, seq=3)
    newer = entry("n", "Caroline moved to Seattle.", T0, seq=7)
    updated, _ = apply_decision(
        target, Decision("update", "Caroline lives in Seattle.", "moved"), [newer], NOW)
    assert updated is not None and updated.turn_seq == 3 and updated.event_time == T0


def test_same_instant_in_different_timezones_is_a_tie() -> None:
    plus2 = timezone(timedelta(hours=2))
    b = entry("b", when=datetime(2023, 5, 8, 18, 0, tzinfo=plus2))
    a = entry("a", when=datetime(2023, 5, 8, 16, 0, tzinfo=UTC))
    assert is_older(a, b) and not is_older(b, a)


def test_queue_keeps_the_best_keep_by_score() -> None:
    e = entry("e", when=T0 + timedelta(days=30))
    cands = [hit(entry(f"t{i:02d}", when=T0 + timedelta(days=i)), i / 20) for i in range(15)]
    queue = UpdateQueueBuilder(top_k=20, keep=10).build(e, list(reversed(cands)))
    assert [t for t, _ in queue.items] == [f"t{i:02d}" for i in range(14, 4, -1)]
    scores = [s for _, s in queue.items]
    assert scores == sorted(scores, reverse=True)


def test_top_k_bounds_the_queue_and_the_search() -> None:
    e = entry("e", when=T0 + timedelta(days=30))
    cands = [hit(entry(f"t{i}", when=T0), 0.5 + i / 100) for i in range(6)]
    builder = UpdateQueueBuilder(top_k=3, keep=3)
    assert builder.search_k == 4  # the entry finds itself too
    assert [t for t, _ in builder.build(e, cands).items] == ["t5", "t4", "t3"]
    with pytest.raises(ValueError, match="keep"):
        UpdateQueueBuilder(top_k=5, keep=6)
    with pytest.raises(ValueError, match="top_k"):
        UpdateQueueBuilder(top_k=0, keep=0)


def test_queue_deduplicates_and_drops_non_finite_scores() -> None:
    e = entry("e", when=T0 + timedelta(days=1))
    t, u = entry("t"), entry("u")
    queue = UpdateQueueBuilder().build(e, [hit(t, 0.7), hit(t, 0.9), hit(u, float("nan"))])
    assert queue.items == [("t", 0.9)]


@settings(max_examples=60, deadline=None)
@given(
    times=st.lists(st.integers(min_value=0, max_value=3), min_size=2, max_size=7),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_no_pair_ever_lists_each_other(times: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    entries = [entry(f"e{i}", when=T0 + timedelta(hours=h)) for i, h in enumerate(times)]
    builder = UpdateQueueBuilder(top_k=10, keep=10)
    listed: set[tuple[str, str]] = set()
    for e in entries:
        # Hand every entry every other one, newer ones included, as a careless kNN would.
        cands = [hit(o, float(rng.uniform(0.5, 1.0))) for o in entries]
        for target_id, _ in builder.build(e, cands).items:
            listed.add((e.id, target_id))
    by_id = {e.id: e for e in entries}
    for newer_id, target_id in listed:
        assert (target_id, newer_id) not in listed
        assert is_older(by_id[target_id], by_id[newer_id])


def test_build_queues_runs_the_knn_with_the_time_bound() -> None:
    base = [1.0, 0.0, 0.0]
    e1 = entry("e1", "Caroline lives in Boston.", T0, embedding=base)
    e2 = entry("e2", "Caroline moved to Seattle.", T0 + timedelta(days=1), embedding=[0.9, 0.1, 0])
    e3 = entry("e3", "Melanie paints.", T0 + timedelta(days=2), embedding=[0.0, 0.0, 1.0])
    store = InMemoryStore([e1, e2, e3])
    q1, q2, q3 = build_queues(store, UpdateQueueBuilder(), [e1, e2, e3])
    assert q1.items == []
    assert [t for t, _ in q2.items] == ["e1"] and q2.items[0][1] == pytest.approx(0.9939, abs=1e-3)
    # Unrelated facts still enter the queue (the threshold is applied later); equal
    # scores are ordered by id.
    assert [t for t, _ in q3.items] == ["e1", "e2"]
    assert all(abs(s) < 1e-6 for _, s in q3.items)


def test_build_queues_embeds_entries_that_arrive_without_vectors() -> None:
    e1 = entry("e1", "x", T0, embedding=fake_embed(["x"])[0].tolist())
    bare = entry("e2", "x", T0 + timedelta(days=1))  # same text, so the same vector
    store = InMemoryStore([e1])
    (queue,) = build_queues(store, UpdateQueueBuilder(), [bare], embed=fake_embed)
    assert queue.items[0][0] == "e1" and queue.items[0][1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="e2"):
        build_queues(store, UpdateQueueBuilder(), [bare])


# --------------------------------------------------------------------------- targets


def test_targets_apply_the_threshold_inclusively() -> None:
    t = entry("t", when=T0)
    n1, n2 = entry("n1", when=T0 + timedelta(days=1)), entry("n2", when=T0 + timedelta(days=2))
    by_id = {e.id: e for e in (t, n1, n2)}
    queues = [
        UpdateQueue("n2", "acme/u1", [("t", 0.8)]),
        UpdateQueue("n1", "acme/u1", [("t", 0.79)]),
    ]
    assert targets_from_queues(queues, by_id, threshold=0.8) == {"t": [("n2", 0.8)]}
    assert targets_from_queues(queues, by_id, threshold=0.9) == {}
    assert targets_from_queues(queues, by_id, threshold=0.5) == {"t": [("n1", 0.79), ("n2", 0.8)]}


def test_targets_collect_every_newer_entry_oldest_first() -> None:
    a = entry("a", when=T0)
    b = entry("b", when=T0 + timedelta(days=1))
    c = entry("c", when=T0 + timedelta(days=2))
    by_id = {e.id: e for e in (a, b, c)}
    queues = [
        UpdateQueue("c", "acme/u1", [("b", 0.95), ("a", 0.85)]),
        UpdateQueue("b", "acme/u1", [("a", 0.9)]),
        UpdateQueue("a", "acme/u1", []),
    ]
    targets = targets_from_queues(queues, by_id)
    assert list(targets) == ["a", "b"]
    assert targets["a"] == [("b", 0.9), ("c", 0.85)]
    assert targets["b"] == [("c", 0.95)]


def test_targets_recheck_time_scope_and_existence() -> None:
    t = entry("t", when=T0)
    newer_other_user = entry("x", when=T0 + timedelta(days=1), user="u2")
    older_than_target = entry("o", when=T0 - timedelta(days=1))
    by_id = {e.id: e for e in (t, newer_other_user, older_than_target)}
    forged = [
        UpdateQueue("x", "acme/u2", [("t", 0.99)]),  # another user's entry
        UpdateQueue("o", "acme/u1", [("t", 0.99)]),  # an older entry listing a newer one
        UpdateQueue("gone", "acme/u1", [("t", 0.99)]),  # the newer entry was deleted
        UpdateQueue("o", "acme/u1", [("deleted-target", 0.99)]),
    ]
    assert targets_from_queues(forged, by_id) == {}


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("reply", "action", "new_fact"),
    [
        (
            '{"action": "update", "new_fact": "Caroline lives in Seattle.", "reason": "moved"}',
            "update",
            "Caroline lives in Seattle.",
        ),
        ('```json\n{"action": "delete", "reason": "contradicted"}\n```', "delete", None),
        ('Sure! Here it is:\n```\n{"Action": "IGNORE"}\n```\nHope it helps.', "ignore", None),
        (
            '{"ACTION": "Merge", "New_Fact": "  Caroline   adopted a dog. "}',
            "update",
            "Caroline adopted a dog.",
        ),
        ('{"action": "remove"}', "delete", None),
        ('{"action": "none"}', "ignore", None),
        ('{"action": "keep"}', "ignore", None),
        ('{"action": "no-op"}', "ignore", None),
        (
            '{"event": "UPDATE", "text": "Caroline has two dogs."}',
            "update",
            "Caroline has two dogs.",
        ),
        ('[{"action": "delete"}]', "delete", None),
        ('{"decision": {"action": "update", "new_fact": "Merged."}}', "update", "Merged."),
        ('I think {"action": "update", "fact": "X is Y."} is right.', "update", "X is Y."),
    ],
)
def test_parse_decision_reads_messy_replies(reply: str, action: str, new_fact: str | None) -> None:
    decision = parse_decision(reply)
    assert decision.action == action
    assert decision.new_fact == new_fact


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "delete",  # a bare word is not a decision we act on
        "The memory should be DELETED because it is wrong.",
        "{action: delete}",  # not JSON
        '{"action": "delete"',  # truncated
        "42",
        '["delete"]',
        '{"reason": "no action given"}',
        '{"action": "frobnicate"}',
        '{"action": 3}',
    ],
)
def test_parse_decision_never_deletes_on_garbage(reply: str) -> None:
    decision = parse_decision(reply)
    assert decision.action == "ignore"
    assert decision.reason.startswith(UNPARSEABLE)
    assert decision.new_fact is None


@pytest.mark.parametrize("reply", ['{"action": "update"}', '{"action": "update", "new_fact": " "}'])
def test_update_without_new_fact_is_ignored(reply: str) -> None:
    assert parse_decision(reply) == Decision("ignore", reason="update without new_fact")


# --------------------------------------------------------------------------- deciding


def test_decide_makes_one_call_with_dated_facts() -> None:
    target = entry("t", "Caroline lives in Boston.", T0, tenant="acme")
    newer = [
        entry("n2", "Caroline bought a house in Seattle.", T0 + timedelta(days=26)),
        entry("n1", "Caroline moved to Seattle.", T0 + timedelta(days=24)),
    ]
    chat = FakeChat('{"action": "delete", "reason": "she moved"}')
    decision = Consolidator(chat).decide(target, newer)
    assert decision == Decision("delete", reason="she moved")
    assert len(chat.calls) == 1
    messages, purpose, tenant = chat.calls[0]
    assert (purpose, tenant) == ("consolidate", "acme")
    assert chat.meter.total(purpose="consolidate", tenant="acme").calls == 1
    prompt = messages[-1].content
    assert "[2023-05-08, Monday] Caroline lives in Boston." in prompt
    # Newer facts are listed oldest first with their own dates.
    assert prompt.index("[2023-06-01, Thursday] Caroline moved to Seattle.") < prompt.index(
        "[2023-06-03, Saturday] Caroline bought a house in Seattle."
    )
    assert "JSON" in messages[0].content


def test_decide_skips_the_call_without_newer_entries() -> None:
    target = entry("t", when=T0 + timedelta(days=1))
    chat = FakeChat('{"action": "delete"}')
    consolidator = Consolidator(chat)
    older = entry("o", when=T0)
    other_scope = entry("x", when=T0 + timedelta(days=5), user="u2")
    assert consolidator.decide(target, [older, other_scope, target]).action == "ignore"
    assert chat.calls == []


def test_decide_treats_a_no_op_update_as_ignore() -> None:
    target = entry("t", "Caroline lives in Boston.", T0)
    chat = FakeChat('{"action": "update", "new_fact": "Caroline lives in  Boston."}')
    decision = Consolidator(chat).decide(target, [entry("n", when=T0 + timedelta(days=1))])
    assert decision.action == "ignore"


def test_consolidator_threshold_feeds_targets() -> None:
    t, n = entry("t", when=T0), entry("n", when=T0 + timedelta(days=1))
    queues = [UpdateQueue("n", "acme/u1", [("t", 0.85)])]
    by_id = {"t": t, "n": n}
    assert Consolidator(FakeChat("{}"), threshold=0.8).targets(queues, by_id) == {
        "t": [("n", 0.85)]
    }
    assert Consolidator(FakeChat("{}"), threshold=0.9).targets(queues, by_id) == {}


# --------------------------------------------------------------------------- applying


def test_apply_update_bumps_version_and_merges_sources() -> None:
    target = entry("t", "Caroline has a dog.", T0, version=3, embedding=[1.0, 0.0])
    n1 = entry("n1", "The dog is called Rex.", T0 + timedelta(days=1), sources=["s1", "turn-t"])
    n2 = entry("n2", "Rex is three.", T0 + timedelta(days=2), sources=["s2"])
    decision = Decision("update", new_fact="Caroline has a three-year-old dog, Rex.", reason="r")
    updated, change = apply_decision(target, decision, [n2, n1], NOW)
    assert updated is not None and change is not None
    assert updated.fact == "Caroline has a three-year-old dog, Rex."
    assert updated.version == 4
    assert updated.embedding is None
    assert updated.source_turn_ids == ["turn-t", "s1", "s2"]
    assert updated.original_text.splitlines() == [
        "original Caroline has a dog.",
        "original The dog is called Rex.",
        "original Rex is three.",
    ]
    assert updated.event_time == target.event_time and updated.ingest_time == NOW
    assert (updated.id, updated.tenant, updated.user) == (target.id, target.tenant, target.user)
    assert change.op is ChangeOp.update
    assert change.change_id == stable_id("t", "update", 4)
    # Change records are audit records: the entries without their vectors.
    assert change.before == target.model_copy(update={"embedding": None})
    assert change.after == updated
    assert change.caused_by == ["n1", "n2"]
    assert change.reason == "r" and change.at == NOW
    # Deterministic: replaying the same decision gives the same change.
    assert apply_decision(target, decision, [n2, n1], NOW)[1] == change


def test_apply_delete_and_ignore() -> None:
    target = entry("t", when=T0, version=2)
    newer = [entry("n", when=T0 + timedelta(days=1))]
    gone, change = apply_decision(target, Decision("delete", reason="contradicted"), newer, NOW)
    assert gone is None and change is not None
    assert change.op is ChangeOp.delete
    assert change.before == target.model_copy(update={"embedding": None})
    assert change.after is None
    assert change.change_id == stable_id("t", "delete", 3)
    assert change.caused_by == ["n"]
    assert apply_decision(target, Decision("ignore"), newer, NOW) == (target, None)
    # An "update" that somehow lost its fact never blanks the memory.
    assert apply_decision(target, Decision("update"), newer, NOW) == (target, None)


def test_apply_rejects_a_naive_clock() -> None:
    target = entry("t", when=T0)
    with pytest.raises(ValueError):
        apply_decision(
            target, Decision("delete"), [entry("n", when=T0 + timedelta(1))], datetime(2023, 7, 1)
        )


# --------------------------------------------------------------------------- store round


def seeded(races: int = 0) -> tuple[InMemoryStore, MemoryEntry, MemoryEntry]:
    target = entry(
        "t", "Caroline has a dog.", T0, embedding=fake_embed(["Caroline has a dog."])[0].tolist()
    )
    newer = entry(
        "n",
        "The dog is called Rex.",
        T0 + timedelta(days=1),
        embedding=fake_embed(["The dog is called Rex."])[0].tolist(),
    )
    store = RacingStore([target, newer], races) if races else InMemoryStore([target, newer])
    return store, target, newer


def test_consolidate_target_updates_and_reembeds() -> None:
    store, target, newer = seeded()
    chat = FakeChat('{"action": "update", "new_fact": "Caroline has a dog called Rex."}')
    change = consolidate_target(store, Consolidator(chat), fake_embed, "t", ["n"], NOW)
    assert change is not None and change.op is ChangeOp.update
    stored = store.get(["t"])[0]
    assert stored.fact == "Caroline has a dog called Rex." and stored.version == 2
    assert stored.embedding == pytest.approx(fake_embed([stored.fact])[0].tolist())
    assert stored.embedding is not None
    assert change.after == stored.model_copy(update={"embedding": None})
    assert len(chat.calls) == 1


def test_consolidate_target_deletes() -> None:
    store, _, _ = seeded()
    change = consolidate_target(
        store, Consolidator(FakeChat('{"action": "delete"}')), fake_embed, "t", ["n"], NOW
    )
    assert change is not None and change.op is ChangeOp.delete
    assert store.get(["t", "n"]) == [store.entries["n"]]


def test_consolidate_target_ignore_and_missing_target_write_nothing() -> None:
    store, target, newer = seeded()
    chat = FakeChat('{"action": "ignore"}')
    assert consolidate_target(store, Consolidator(chat), fake_embed, "t", ["n"], NOW) is None
    assert store.entries == {"t": target, "n": newer}
    assert consolidate_target(store, Consolidator(chat), fake_embed, "gone", ["n"], NOW) is None
    # The newer entry is gone: no call at all.
    calls = len(chat.calls)
    assert consolidate_target(store, Consolidator(chat), fake_embed, "t", ["gone"], NOW) is None
    assert len(chat.calls) == calls


def test_consolidate_target_rereads_and_redoes_after_a_conflict() -> None:
    store, _, _ = seeded(races=1)
    chat = FakeChat(
        '{"action": "update", "new_fact": "first try"}',
        '{"action": "update", "new_fact": "Caroline has a dog called Rex."}',
    )
    change = consolidate_target(store, Consolidator(chat), fake_embed, "t", ["n"], NOW)
    assert change is not None
    assert len(chat.calls) == 2
    # The second decision saw the other writer's text and was applied on its version.
    assert "Caroline has a dog. (edited)" in chat.calls[1][0][-1].content
    assert change.before is not None and change.before.version == 2
    stored = store.get(["t"])[0]
    assert (stored.fact, stored.version) == ("Caroline has a dog called Rex.", 3)
    assert change.change_id == stable_id("t", "update", 3)


def test_consolidate_target_gives_up_after_the_retries() -> None:
    store, _, _ = seeded(races=10)
    chat = FakeChat('{"action": "delete"}')
    with pytest.raises(VersionConflict, match="'t'"):
        consolidate_target(
            store, Consolidator(chat), fake_embed, "t", ["n"], NOW, max_conflict_retries=2
        )
    assert len(chat.calls) == 3
    assert "t" in store.entries  # never deleted


def test_end_to_end_queue_targets_consolidate() -> None:
    facts = [
        ("a", "Caroline lives in Boston.", [1.0, 0.0, 0.0]),
        ("b", "Caroline moved to Seattle.", [0.95, 0.05, 0.0]),
        ("c", "Melanie paints sunsets.", [0.0, 0.0, 1.0]),
    ]
    entries = [
        entry(i, f, T0 + timedelta(days=d), embedding=v) for d, (i, f, v) in enumerate(facts)
    ]
    store = InMemoryStore(entries)
    queues = build_queues(store, UpdateQueueBuilder(), entries)
    consolidator = Consolidator(FakeChat('{"action": "delete", "reason": "moved"}'))
    targets = consolidator.targets(queues, {e.id: e for e in entries})
    assert targets.keys() == {"a"}
    changes = [
        consolidate_target(store, consolidator, fake_embed, t, [n for n, _ in newer], NOW)
        for t, newer in targets.items()
    ]
    assert [c.op for c in changes if c] == [ChangeOp.delete]
    assert sorted(store.entries) == ["b", "c"]


def test_many_pairs_never_cycle() -> None:
    # Every ordered pair at one instant: the strict order still yields a DAG.
    es = [entry(f"e{i}", when=T0) for i in range(5)]
    builder = UpdateQueueBuilder()
    queues = [builder.build(e, [hit(o, 0.9) for o in es]) for e in es]
    edges = {(q.entry_id, t) for q in queues for t, _ in q.items}
    assert len(edges) == 10  # C(5, 2): each pair exactly once
    assert not any((target, newer) in edges for newer, target in edges)
    # ...and it is a total order: e4 lists all four others, e0 lists none.
    assert sorted(len(q.items) for q in queues) == [0, 1, 2, 3, 4]
