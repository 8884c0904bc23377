"""``lightmem bench segment``: the boundary metric, the B1 variants and the spliced buffers.

Everything here is pure (no model): the metric on hand-made boundary lists, the detectors on
hand-made signals, the buffers from hand-made exchange pools.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from lightmem.ops.bench.segment import (
    Counts,
    Signals,
    SpliceKind,
    b1_boundaries,
    boundary_counts,
    build_buffers,
    coverage,
    detector_outputs,
    match_count,
    score,
)
from lightmem.processors.segment import Exchange
from lightmem.schemas import Role, SegmentTurn

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


# -- metric ---------------------------------------------------------------------------------


def test_exact_match_counts_hits_false_cuts_and_misses() -> None:
    c = boundary_counts([3, 7, 9], [3, 8], tolerance=0)
    assert (c.tp, c.fp, c.fn) == (1, 2, 1)
    assert c.precision == pytest.approx(1 / 3)
    assert c.recall == pytest.approx(1 / 2)
    assert c.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_tolerance_widens_the_match_window() -> None:
    assert match_count([4], [3], tolerance=0) == 0
    assert match_count([4], [3], tolerance=1) == 1
    assert match_count([5], [3], tolerance=1) == 0
    assert match_count([1], [3], tolerance=2) == 1


def test_matching_is_one_to_one() -> None:
    # Two cuts beside one splice: one hit, one false cut (not two hits).
    c = boundary_counts([4, 6], [5], tolerance=1)
    assert (c.tp, c.fp, c.fn) == (1, 1, 0)
    # One cut between two splices confirms only one of them.
    c = boundary_counts([5], [4, 6], tolerance=1)
    assert (c.tp, c.fp, c.fn) == (1, 0, 1)


def test_matching_is_maximal_not_nearest_first() -> None:
    # Nearest-first would pair 3-3 and leave 4 unmatched (2 is too far from 4);
    # the maximum matching pairs 2-3 and 3-4.
    assert match_count([2, 3], [3, 4], tolerance=1) == 2


def test_duplicates_count_once() -> None:
    c = boundary_counts([3, 3], [3], tolerance=0)
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)


def test_empty_predictions_and_truths() -> None:
    assert boundary_counts([], [2, 5], tolerance=3) == Counts(tp=0, fp=0, fn=2)
    none = boundary_counts([], [], tolerance=0)
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="tolerance"):
        match_count([1], [1], tolerance=-1)


def test_counts_are_summed_micro_average() -> None:
    total = Counts()
    total.add(boundary_counts([2], [2], 0))  # 1 hit
    total.add(boundary_counts([1, 4, 6], [9], 0))  # 3 false cuts, 1 miss
    assert (total.tp, total.fp, total.fn) == (1, 3, 1)
    assert total.precision == pytest.approx(0.25)
    assert total.recall == pytest.approx(0.5)


def test_coverage_is_the_fraction_of_positions_near_b1() -> None:
    # n = 11 exchanges -> positions 1..10; B1 at 5 with tolerance 1 covers 4, 5, 6.
    assert coverage([5], 11, 1) == pytest.approx(3 / 10)
    assert coverage([5], 11, 0) == pytest.approx(1 / 10)
    assert coverage([3, 8], 11, 3) == pytest.approx(1.0)
    assert coverage([], 11, 3) == 0.0
    assert coverage([1], 1, 3) == 0.0


# -- detectors ------------------------------------------------------------------------------


def matrix_with_adjacent(a: list[float]) -> np.ndarray:
    """An n x n matrix whose sub-diagonal M[k, k-1] is a[k] (a[0] unused)."""
    n = len(a)
    m = np.zeros((n, n))
    for k in range(1, n):
        m[k, k - 1] = a[k]
    return m


def test_b1_modes_minima_maxima_and_the_references_shift() -> None:
    # M[k, k-1]: a dip at k = 3 (the new topic's first exchange) flanked by peaks at 2 and 4.
    m = matrix_with_adjacent([0.0, 0.5, 0.9, 0.1, 0.8, 0.6, 0.7, 0.4])
    assert b1_boundaries(m, "min") == [3, 5]
    assert b1_boundaries(m, "max") == [2, 4, 6]
    # The reference reads outer[k] = M[k+1, k] and reports k: each maximum one earlier.
    assert b1_boundaries(m, "shifted-max") == [1, 3, 5]


def test_detector_outputs_combine_b1_and_b2() -> None:
    a = [np.nan, 0.5, 0.9, 0.1, 0.8, 0.6, 0.7, 0.4]
    sims = np.array([np.nan, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.15])  # B2 at tau 0.2: 3, 7
    sig = Signals(attention=np.array(a), matrix=matrix_with_adjacent(a), similarity=sims)
    found = detector_outputs(sig)
    assert found["B2"] == [3, 7]
    assert found["B1 min"] == [3, 5]
    assert found["B min tol 0"] == [3]
    assert found["B min tol 3"] == [3, 7]  # 7 is within 3 of 5
    assert found["B max tol 0"] == [3, 7]  # nothing confirmed: the fallback is B2
    assert found["B max tol 0 no-fallback"] == []


def test_score_sums_over_buffers_and_reports_fallbacks() -> None:
    a = [np.nan, 0.5, 0.9, 0.1, 0.8, 0.6, 0.7, 0.4]
    sims = np.array([np.nan, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.15])
    sig = Signals(attention=np.array(a), matrix=matrix_with_adjacent(a), similarity=sims)
    buffers = build_buffers(_pools(), "conversation", 2, count_tokens=_words, budget=40)
    # Override the truth: the scoring reads only the boundaries and n from the signals.
    fake = [replace(b, boundaries=(3,)) for b in buffers]
    scores = score(fake, [sig, sig])
    assert scores["B2"].counts[0] == Counts(tp=2, fp=2, fn=0)
    assert scores["B min tol 0"].counts[0] == Counts(tp=2, fp=0, fn=0)
    assert scores["B max tol 0"].fallbacks == 2
    assert scores["B min tol 0"].fallbacks == 0
    assert scores["B min tol 0"].b2_kept == 2 and scores["B min tol 0"].b2_offered == 4


# -- spliced buffers ------------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


def _exchange(conv: str, session: str, i: int) -> Exchange:
    def turn(role: Role, text: str) -> SegmentTurn:
        return SegmentTurn(
            turn_id=f"{conv}-{session}-{i}-{role.value}",
            role=role,
            speaker="a" if role == Role.user else "b",
            event_time=T0,
            original_text=text,
            compressed_text=text,
        )

    # 4 user words per exchange, so a budget of 40 holds 10 exchanges.
    return Exchange(turns=(turn(Role.user, f"{conv} {session} {i} x"), turn(Role.assistant, "ok")))


def _pools() -> dict[tuple[str, str], list[Exchange]]:
    return {
        (c, s): [_exchange(c, s, i) for i in range(12)]
        for c in ("c1", "c2", "c3")
        for s in ("s1", "s2")
    }


def _origin(ex: Exchange) -> tuple[str, str]:
    conv, session, *_ = ex.turns[0].compressed_text.split()
    return conv, session


@pytest.mark.parametrize("kind", ["conversation", "session"])
def test_spliced_buffers_mark_every_change_of_source(kind: SpliceKind) -> None:
    buffers = build_buffers(
        _pools(), kind, 25, count_tokens=_words, budget=40, piece_min=2, piece_max=4, seed=7
    )
    assert len(buffers) == 25
    for buf in buffers:
        origins = [_origin(ex) for ex in buf.exchanges]
        changes = [k for k in range(1, len(origins)) if origins[k] != origins[k - 1]]
        assert list(buf.boundaries) == changes
        assert changes, "every buffer holds at least one splice"
        assert len(buf.sources) == len(changes) + 1
        if kind == "session":
            assert len({c for c, _ in origins}) == 1
        else:
            assert all(origins[k][0] != origins[k - 1][0] for k in changes)
        # Filled like the sensory buffer: up to the budget, and the next exchange would not fit.
        assert sum(_words(ex.user_text) for ex in buf.exchanges) <= 40
        assert len(buf.exchanges) == 10


def test_spliced_buffers_are_reproducible_by_seed() -> None:
    one = build_buffers(_pools(), "session", 5, count_tokens=_words, budget=40, seed=3)
    two = build_buffers(_pools(), "session", 5, count_tokens=_words, budget=40, seed=3)
    other = build_buffers(_pools(), "session", 5, count_tokens=_words, budget=40, seed=4)
    assert [b.sources for b in one] == [b.sources for b in two]
    assert [b.sources for b in one] != [b.sources for b in other]


def test_spliced_buffers_need_two_sources() -> None:
    single = {("c1", "s1"): [_exchange("c1", "s1", i) for i in range(12)]}
    with pytest.raises(ValueError, match="two"):
        build_buffers(single, "conversation", 1, count_tokens=_words)
    with pytest.raises(ValueError, match="two"):
        build_buffers(single, "session", 1, count_tokens=_words)
