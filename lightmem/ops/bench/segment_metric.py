"""``bench segment``'s metric, pure: boundary matches within a tolerance, the B1 variants and
their coverage of B2, the detectors' outputs on one buffer and their scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from lightmem.processors.segment import (
    attention_boundaries,
    combine_boundaries,
    similarity_boundaries,
)

if TYPE_CHECKING:
    from lightmem.ops.bench.segment_buffers import SplicedBuffer

B1Mode = Literal["min", "max", "shifted-max"]
SpliceKind = Literal["conversation", "session"]
#: B1 variants compared: local minima (the code's), local maxima (DESIGN's formula) and the
#: reference implementation's maxima of M[k+1, k] reported as boundary k.
B1_MODES: tuple[B1Mode, ...] = ("min", "max", "shifted-max")
#: B1/B2 tolerances of the combination (0 = the paper's strict intersection).
TOLERANCES: tuple[int, ...] = (0, 1, 3)
#: Boundary-match tolerances of the scoring (exchanges between a cut and the splice).
MATCH_TOLERANCES: tuple[int, ...] = (0, 1)
SPLICE_KINDS: tuple[SpliceKind, ...] = ("conversation", "session")



# -- metric (pure) ----------------------------------------------------------------------------


@dataclass
class Counts:
    """Boundary hits, false cuts and missed boundaries, summed over buffers (micro average)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: Counts) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    @property
    def precision(self) -> float:
        """Hits / predicted cuts; 0 when nothing was predicted (no cut earns no credit)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """Hits / true boundaries; 0 when there were none."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
        }


def match_count(predicted: Iterable[int], true: Iterable[int], tolerance: int) -> int:
    """Largest one-to-one matching of predicted to true boundaries within ``tolerance``.

    Greedy over both sorted lists: each true boundary takes the earliest unused prediction
    in ``[t - tolerance, t + tolerance]``. With equal-width windows sorted by position this
    is a maximum matching, so a cut can confirm at most one boundary and vice versa.

    Args:
        predicted: Predicted boundaries (duplicates count once).
        true: True boundaries (duplicates count once).
        tolerance: Largest ``|predicted - true|`` that counts as a hit (0 = exact).

    Returns:
        The number of matched pairs.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance: must be >= 0 (got {tolerance!r})")
    preds = sorted(set(predicted))
    matched = i = 0
    for t in sorted(set(true)):
        while i < len(preds) and preds[i] < t - tolerance:
            i += 1  # too early for this boundary, hence for every later one
        if i < len(preds) and preds[i] <= t + tolerance:
            matched += 1
            i += 1
    return matched


def boundary_counts(predicted: Iterable[int], true: Iterable[int], tolerance: int) -> Counts:
    """Hits, false cuts and misses of one buffer's predicted boundaries.

    Args:
        predicted: Predicted boundaries.
        true: True boundaries.
        tolerance: Boundary-match tolerance (see :func:`match_count`).

    Returns:
        The buffer's :class:`Counts`.
    """
    preds, trues = set(predicted), set(true)
    hits = match_count(preds, trues, tolerance)
    return Counts(tp=hits, fp=len(preds) - hits, fn=len(trues) - hits)


def b1_boundaries(m: np.ndarray, mode: B1Mode) -> list[int]:
    """B1 from a sentence attention matrix, in one of the compared modes.

    ``"shifted-max"`` is the reference implementation: it scans ``outer[k] = M[k+1, k]``
    for local maxima and reports k, i.e. the cut one exchange *before* a local maximum of
    ``M[k, k-1]``.

    Args:
        m: The n x n sentence attention matrix.
        mode: ``"min"``, ``"max"`` or ``"shifted-max"``.

    Returns:
        Sorted boundaries (a cut before exchange k), all in 1..n-1.
    """
    if mode == "shifted-max":
        return [k - 1 for k in attention_boundaries(m, extremum="max")]
    return attention_boundaries(m, extremum=mode)


def coverage(b1: Sequence[int], n: int, tolerance: int) -> float:
    """Fraction of the possible cut positions 1..n-1 within ``tolerance`` of some B1 cut.

    What the tolerant intersection can remove: a B2 cut at a covered position is kept, so
    coverage near 1 means B1 filters nothing.

    Args:
        b1: B1 boundaries.
        n: Exchanges in the buffer.
        tolerance: The combination's tolerance.

    Returns:
        The covered fraction (0 when n < 2).
    """
    if n < 2:
        return 0.0
    covered = sum(1 for k in range(1, n) if any(abs(k - j) <= tolerance for j in b1))
    return covered / (n - 1)


@dataclass(frozen=True)
class Signals:
    """The model outputs of one buffer that every detector reads."""

    #: ``M[k, k-1]`` for k = 0..n-1 (index 0 is NaN).
    attention: np.ndarray
    #: The sentence attention matrix M, as the segmenter passes it to B1.
    matrix: np.ndarray
    #: ``cos(e[k-1], e[k])`` for k = 0..n-1 (index 0 is NaN).
    similarity: np.ndarray

    @property
    def n(self) -> int:
        return len(self.similarity)


def detector_outputs(
    signals: Signals,
    *,
    b1_modes: Sequence[B1Mode] = B1_MODES,
    tolerances: Sequence[int] = TOLERANCES,
    tau_start: float = 0.2,
) -> dict[str, list[int]]:
    """Every compared detector's boundaries for one buffer.

    Keys: ``B2``, ``B1 <mode>``, ``B <mode> tol <t>`` (fallback to B2, the segmenter's
    default) and ``B <mode> tol <t> no-fallback``. B is empty when B2 is, as in
    :meth:`~lightmem.processors.segment.TopicSegmenter.boundaries`.
    """
    b2, _ = similarity_boundaries(signals.similarity, tau_start=tau_start)
    found: dict[str, list[int]] = {"B2": b2}
    for mode in b1_modes:
        b1 = b1_boundaries(signals.matrix, mode) if signals.n >= 4 else []
        found[f"B1 {mode}"] = b1
        for tol in tolerances:
            found[f"B {mode} tol {tol}"] = combine_boundaries(b1, b2, tolerance=tol)
            found[f"B {mode} tol {tol} no-fallback"] = combine_boundaries(
                b1, b2, tolerance=tol, fallback_to_b2=False
            )
    return found


# -- scoring ----------------------------------------------------------------------------------


@dataclass
class DetectorScore:
    """One detector on one buffer set: counts per match tolerance and diagnostics."""

    counts: dict[int, Counts] = field(default_factory=dict)
    cuts: int = 0
    #: Buffers where the combination kept no B2 cut and fell back to B2 (B rows only).
    fallbacks: int = 0
    #: B2 cuts offered to / kept by the intersection (B rows only).
    b2_offered: int = 0
    b2_kept: int = 0
    #: Sum over buffers of the fraction of positions within tolerance of B1 (B rows only).
    coverage_sum: float = 0.0


def parse_b(name: str) -> tuple[str, int] | None:
    """``"B min tol 3 ..."`` -> ``("min", 3)``; None for a non-combined row."""
    parts = name.split()
    if parts[0] != "B":
        return None
    return parts[1], int(parts[3])


def score(
    buffers: Sequence[SplicedBuffer],
    signals: Sequence[Signals],
    *,
    match_tolerances: Sequence[int] = MATCH_TOLERANCES,
    tau_start: float = 0.2,
) -> dict[str, DetectorScore]:
    """Score every detector on every buffer (micro average over the set).

    Args:
        buffers: The spliced buffers.
        signals: Their model outputs, in the same order.
        match_tolerances: Boundary-match tolerances to score at.
        tau_start: B2's first threshold (the segmenter's for its B2 input).

    Returns:
        Scores by detector name (see :func:`detector_outputs`).
    """
    scores: dict[str, DetectorScore] = {}
    for buf, sig in zip(buffers, signals, strict=True):
        found = detector_outputs(sig, tau_start=tau_start)
        b2 = found["B2"]
        for name, cuts in found.items():
            s = scores.setdefault(name, DetectorScore())
            s.cuts += len(cuts)
            for w in match_tolerances:
                s.counts.setdefault(w, Counts()).add(boundary_counts(cuts, buf.boundaries, w))
            parsed = parse_b(name)
            if parsed is None:
                continue
            mode, tol = parsed
            b1 = found[f"B1 {mode}"]
            kept = combine_boundaries(b1, b2, tolerance=tol, fallback_to_b2=False)
            s.b2_offered += len(b2)
            s.b2_kept += len(kept)
            s.fallbacks += int(bool(b2) and not kept)
            s.coverage_sum += coverage(b1, sig.n, tol)
    return scores
