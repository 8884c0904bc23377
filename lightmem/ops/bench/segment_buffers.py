"""``bench segment``'s test buffers: runs of LoCoMo exchanges from different sources spliced into
one sensory buffer, so that the true boundaries are known.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightmem.ops.bench.segment_metric import SpliceKind  # noqa: E402
from lightmem.processors.segment import (
    Exchange,
    group_exchanges,
    to_segment_turn,
)
from lightmem.schemas import Role, TurnEvent

# -- test buffers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplicedBuffer:
    """A sensory buffer made of pieces of different sources, with the splice points."""

    kind: SpliceKind
    exchanges: tuple[Exchange, ...]
    #: Cut positions (before exchange k) where one piece ends and the next begins.
    boundaries: tuple[int, ...]
    #: Where each piece came from: ``"<conversation>/<session>@<first exchange>"``.
    sources: tuple[str, ...]


#: Exchanges of one session, by (conversation, session).
Pools = Mapping[tuple[str, str], Sequence[Exchange]]


def exchange_pools(
    turns: Iterable[TurnEvent], compressed: Mapping[tuple[str, str], str] | None = None
) -> dict[tuple[str, str], list[Exchange]]:
    """Group LoCoMo turns into exchanges, per (conversation, session).

    Args:
        turns: Turn events in conversation order.
        compressed: Compressed text by (conversation, turn id); None keeps the original.

    Returns:
        The exchanges of every session, in order.
    """
    by_session: dict[tuple[str, str], list[Any]] = {}
    for ev in turns:
        text = None if compressed is None else compressed[(ev.conversation, ev.turn_id)]
        by_session.setdefault((ev.conversation, ev.session), []).append(to_segment_turn(ev, text))
    return {key: group_exchanges(seg_turns) for key, seg_turns in by_session.items()}


def _user_tokens(ex: Exchange, count_tokens: Callable[[str], int]) -> int:
    return sum(count_tokens(t.compressed_text) for t in ex.turns if t.role == Role.user)


def build_buffers(
    pools: Pools,
    kind: SpliceKind,
    count: int,
    *,
    count_tokens: Callable[[str], int],
    budget: int = 512,
    piece_min: int = 3,
    piece_max: int = 8,
    seed: int = 0,
) -> list[SplicedBuffer]:
    """Spliced buffers filled like the sensory buffer: stop before the user turn that would
    push the user tokens past ``budget``.

    Args:
        pools: Exchanges per (conversation, session).
        kind: ``"conversation"`` (pieces of different conversations) or ``"session"``
            (one conversation, consecutive pieces of different sessions).
        count: Buffers to build.
        count_tokens: The encoder's token counter (the budget's unit).
        budget: User tokens per buffer (the sensory budget).
        piece_min: Fewest exchanges in a piece.
        piece_max: Most exchanges in a piece (fewer when its session ends first).
        seed: Random seed (the same seed builds the same buffers).

    Returns:
        Buffers with at least one splice.
    """
    if not 1 <= piece_min <= piece_max:
        raise ValueError(f"need 1 <= piece_min <= piece_max (got {piece_min}, {piece_max})")
    rng = random.Random(seed)
    usable = {k: v for k, v in pools.items() if len(v) >= piece_min}
    conversations = sorted({c for c, _ in usable})
    sessions_of = {c: sorted(s for cc, s in usable if cc == c) for c in conversations}
    if kind == "conversation" and len(conversations) < 2:
        raise ValueError("conversation splices need sessions of at least two conversations")
    if kind == "session":
        conversations = [c for c in conversations if len(sessions_of[c]) >= 2]
        if not conversations:
            raise ValueError("session splices need a conversation with two usable sessions")
    buffers: list[SplicedBuffer] = []
    for _ in range(count * 10):  # bounded: a buffer whose first piece fills it is dropped
        if len(buffers) == count:
            break
        conv = rng.choice(conversations)
        prev: tuple[str, str] | None = None
        exchanges: list[Exchange] = []
        bounds: list[int] = []
        sources: list[str] = []
        held = 0
        full = False
        while not full:
            if kind == "conversation":
                conv = rng.choice([c for c in conversations if prev is None or c != prev[0]])
                key = (conv, rng.choice(sessions_of[conv]))
            else:
                others = [s for s in sessions_of[conv] if prev is None or s != prev[1]]
                key = (conv, rng.choice(others))
            pool = usable[key]
            size = rng.randint(piece_min, piece_max)
            start = rng.randrange(0, len(pool) - piece_min + 1)
            piece = pool[start : start + size]
            taken = 0
            for ex in piece:
                tokens = _user_tokens(ex, count_tokens)
                if held > 0 and held + tokens > budget:  # the sensory buffer's cut rule
                    full = True
                    break
                exchanges.append(ex)
                held += tokens
                taken += 1
            if taken:
                if exchanges[:-taken]:
                    bounds.append(len(exchanges) - taken)
                sources.append(f"{key[0]}/{key[1]}@{start}")
            prev = key
        if bounds:
            buffers.append(SplicedBuffer(kind, tuple(exchanges), tuple(bounds), tuple(sources)))
    return buffers
