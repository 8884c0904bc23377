"""``lightmem bench segment``: boundary precision / recall of the topic segmenter's detectors.

The measurement behind the segmentation defaults (B1 extremum, B1/B2 tolerance). Test
buffers are built from LoCoMo conversations with *known* boundaries, by splicing runs of
exchanges from different sources into one sensory buffer, filled to the encoder window as
the real buffer is (user tokens <= ``--budget``):

- ``conversation``: consecutive pieces come from different conversations (other speakers,
  other lives: the easy case);
- ``session``: every piece comes from the same conversation, consecutive pieces from
  different sessions (same two speakers, other days: closer to a real topic change).

Each piece is a run of ``--piece-min``..``--piece-max`` consecutive exchanges starting at a
random exchange of its session; the splice points are the true boundaries. Within-session
topic shifts are *not* scored: LoCoMo has no turn-level topic labels (its ``observation``
facts name turns but not topics, ``event_summary`` and ``session_summary`` name no turns),
and labels derived from MiniLM similarities would grade B2 against itself. So a cut inside a
piece counts as a false positive even where the topic really changed: precision here is a
lower bound, recall is exact.

The detectors run on the real segmenter inputs (the same
:class:`~lightmem.streams.models.components.Components` the workers build): B1 reads the
attention matrix of the exchanges' user texts
(:class:`~lightmem.processors.segment.MiniLMAttention`), B2 the embeddings of whole exchanges.
Per buffer the model runs once; every detector variant is then scored on the same signals:

- B1 alone with local minima of ``M[k, k-1]``, local maxima (DESIGN's formula) and the
  reference implementation's shifted maxima (a maximum of ``M[k+1, k]`` reported as k);
- B2 alone (``tau`` rising 0.2 .. 0.5);
- B = the tolerant intersection at tolerance 0, 1, 3, with and without the fallback to B2.

Scores are micro-averaged over buffers (true positives, false positives and misses summed)
at two boundary-match tolerances: exact (a predicted cut must fall before the same exchange)
and within one exchange; matching is one-to-one, so two cuts beside one splice are one hit
and one false positive.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, load_locomo
from lightmem.processors.segment import (
    Exchange,
    adjacent_attention,
    adjacent_similarity,
    attention_boundaries,
    combine_boundaries,
    group_exchanges,
    similarity_boundaries,
    to_segment_turn,
)
from lightmem.schemas import Role, TurnEvent
from lightmem.settings import load_settings

__all__ = [
    "B1_MODES",
    "TOLERANCES",
    "MATCH_TOLERANCES",
    "SPLICE_KINDS",
    "B1Mode",
    "SpliceKind",
    "Counts",
    "SplicedBuffer",
    "Signals",
    "match_count",
    "boundary_counts",
    "b1_boundaries",
    "coverage",
    "detector_outputs",
    "build_buffers",
    "score",
    "segment_command",
]

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

err = Console(stderr=True)
out = Console()


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


def _parse_b(name: str) -> tuple[str, int] | None:
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
            parsed = _parse_b(name)
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


# -- the command ------------------------------------------------------------------------------


def _floats(values: np.ndarray) -> list[float | None]:
    """A signal for the JSON report (NaN, the first exchange's missing value, as null)."""
    return [None if np.isnan(x) else round(float(x), 5) for x in values]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def _signals(attention: Callable[[Sequence[str]], np.ndarray],
             embed: Callable[[Sequence[Exchange]], np.ndarray], buf: SplicedBuffer) -> Signals:
    """Run the segmenter's two models once over a buffer (B1: user texts, B2: exchanges as
    the segmenter embeds them, see :meth:`~lightmem.processors.segment.TopicSegmenter.embed`)."""
    m = attention([ex.user_text for ex in buf.exchanges])
    e = embed(buf.exchanges)
    return Signals(attention=adjacent_attention(m), matrix=m, similarity=adjacent_similarity(e))


def _table_rows(names: Iterable[str]) -> list[str]:
    """Rows of the printed table: B2, B1 per mode, B (with fallback) per mode and tolerance;
    the no-fallback variants go to the JSON only (they cut nothing when B1 disagrees)."""
    return [n for n in names if not n.endswith("no-fallback")]


def segment_command(
    data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    limit: Annotated[int, typer.Option(min=1, help="Spliced buffers per splice kind")] = 200,
    conversations: Annotated[
        int | None, typer.Option(min=2, help="Only the first N conversations (faster runs)")
    ] = None,
    kinds: Annotated[
        str, typer.Option(help="Splice kinds, comma-separated: conversation, session")
    ] = "conversation,session",
    budget: Annotated[int, typer.Option(min=32, max=512, help="User tokens per buffer")] = 512,
    piece_min: Annotated[int, typer.Option(min=1, help="Fewest exchanges per piece")] = 3,
    piece_max: Annotated[int, typer.Option(min=1, help="Most exchanges per piece")] = 8,
    compressor: Annotated[
        str, typer.Option(help="none | entropy | minilm | llmlingua2: pre-compress the turns "
                          "first")
    ] = "none",
    b2_input: Annotated[
        str, typer.Option(help="What B2 embeds: exchanges (compressed exchange text) | turns "
                          "(original turns, one embedding each, as the minilm compressor's "
                          "pass gives them)")
    ] = "exchanges",
    tau_start: Annotated[
        float | None, typer.Option(help="B2's first threshold (default: the segmenter's for "
                                   "--b2-input)")
    ] = None,
    rate: Annotated[float, typer.Option(min=0.05, max=1.0, help="Compression rate r")] = 0.6,
    seed: Annotated[int, typer.Option(help="Random seed of the splices")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON report here")
    ] = None,
) -> None:
    """Boundary precision / recall of B1, B2 and B on spliced LoCoMo buffers."""
    from lightmem.processors.segment import B2_TAU_START, TopicSegmenter
    from lightmem.processors.turn_embeddings import TurnEmbeddings
    from lightmem.streams.models.components import Components

    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = [k for k in wanted if k not in SPLICE_KINDS]
    if bad or not wanted:
        err.print(f"[red]--kinds: unknown {bad} (choose from {', '.join(SPLICE_KINDS)})[/red]")
        raise typer.Exit(2)
    if piece_min > piece_max:
        err.print("[red]--piece-min must be <= --piece-max[/red]")
        raise typer.Exit(2)
    if b2_input not in B2_TAU_START:
        err.print(f"[red]--b2-input: {b2_input!r} (choose from {', '.join(B2_TAU_START)})[/red]")
        raise typer.Exit(2)
    tau = B2_TAU_START[b2_input] if tau_start is None else tau_start
    try:
        samples = load_locomo(data, limit=conversations)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    settings = load_settings(
        data_dir=Path(tempfile.mkdtemp(prefix="lightmem-bench-")),
        compressor=compressor,
        compression_rate=rate,
        torch_threads=threads,
    )
    parts = Components(settings)
    seg = parts.segmenter  # the workers' own MiniLM attention (B1) and embedder (B2)
    if b2_input == "turns":
        turn_embeddings = TurnEmbeddings(parts.encoder.attention_model, parts.encoder.tokenizer)
        seg = TopicSegmenter(seg.attention, turn_embeddings, b2_input="turns", tau_start=tau)
    turns = [t for s in samples for t in s.turns]
    compressed: dict[tuple[str, str], str] | None = None
    t0 = time.perf_counter()
    if compressor != "none":
        err.print(f"compressing {len(turns)} turns ({compressor}, r={rate}) ...")
        texts = parts.compressor.compress([t.text for t in turns])
        compressed = {(t.conversation, t.turn_id): c.compressed for t, c in
                      zip(turns, texts, strict=True)}
    compress_s = time.perf_counter() - t0
    pools = exchange_pools(turns, compressed)

    report: dict[str, Any] = {
        "data": str(data),
        "conversations": len(samples),
        "compressor": compressor,
        "rate": rate if compressor != "none" else None,
        "b2_input": b2_input,
        "tau_start": tau,
        "budget_user_tokens": budget,
        "piece_exchanges": [piece_min, piece_max],
        "seed": seed,
        "b1_modes": list(B1_MODES),
        "tolerances": list(TOLERANCES),
        "match_tolerances": list(MATCH_TOLERANCES),
        "scoring": "micro average over buffers; one-to-one matching of cuts to splices within "
                   "the match tolerance (exchanges); cuts inside a piece count as false "
                   "positives (LoCoMo has no within-session topic labels)",
        "compress_s": round(compress_s, 2),
        "sets": {},
    }
    all_scores: dict[str, dict[str, DetectorScore]] = {}
    for kind in wanted:
        buffers = build_buffers(
            pools, kind, limit, count_tokens=parts.encoder.count_tokens,
            budget=budget, piece_min=piece_min, piece_max=piece_max, seed=seed,
        )
        signals: list[Signals] = []
        t1 = time.perf_counter()
        # One bar per kind: a re-entered Progress would print the finished bars again.
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err) as progress:
            task = progress.add_task(f"{kind} splices", total=len(buffers))
            for buf in buffers:
                signals.append(_signals(seg.attention, seg.embed, buf))
                progress.advance(task)
        model_s = time.perf_counter() - t1
        scores = score(buffers, signals, tau_start=tau)
        all_scores[kind] = scores
        n_true = sum(len(b.boundaries) for b in buffers)
        n_ex = sum(len(b.exchanges) for b in buffers)
        report["sets"][kind] = {
            "buffers": len(buffers),
            "exchanges_per_buffer": round(n_ex / max(len(buffers), 1), 2),
            "true_boundaries_per_buffer": round(n_true / max(len(buffers), 1), 2),
            "model_s": round(model_s, 2),
            "detectors": {
                name: {
                    "cuts_per_buffer": round(s.cuts / len(buffers), 3),
                    **{f"match_{w}": c.as_dict() for w, c in s.counts.items()},
                    **(
                        {
                            "b2_kept_fraction": round(s.b2_kept / s.b2_offered, 4)
                            if s.b2_offered else None,
                            "fallback_fraction": round(s.fallbacks / len(buffers), 4),
                            "b1_coverage": round(s.coverage_sum / len(buffers), 4),
                        }
                        if _parse_b(name) else {}
                    ),
                }
                for name, s in scores.items()
            },
            "buffers_detail": [
                {
                    "sources": list(b.sources),
                    "boundaries": list(b.boundaries),
                    "n": len(b.exchanges),
                    "attention": _floats(sig.attention),
                    "similarity": _floats(sig.similarity),
                }
                for b, sig in zip(buffers, signals, strict=True)
            ],
        }
    _print(report, all_scores, wanted)
    if out_path is not None:
        out_path.write_text(json.dumps(report, indent=1) + "\n")
        err.print(f"wrote {out_path}")


def _print(report: dict[str, Any], all_scores: Mapping[str, Mapping[str, DetectorScore]],
           kinds: Sequence[str]) -> None:
    """The side-by-side table: per splice kind, P / R / F1 exact and F1 within one exchange,
    then how much B1 filters (B2 cuts kept by the intersection, fallbacks, coverage)."""
    # Wide enough for both splice kinds side by side when piped to a file (rich would wrap
    # every row at its 80-column default there).
    console = out if out.is_terminal else Console(width=140)
    sets = report["sets"]
    head = ", ".join(
        f"{k}: {sets[k]['buffers']} buffers, {sets[k]['exchanges_per_buffer']} exchanges, "
        f"{sets[k]['true_boundaries_per_buffer']} splices each" for k in kinds
    )
    comp = report["compressor"] if report["compressor"] == "none" else (
        f"{report['compressor']} r={report['rate']}")
    table = Table(title=f"bench segment (compressor {comp}; B2 input {report['b2_input']}, "
                        f"tau from {report['tau_start']}; {head})\n"
                        "P/R/F1: exact match; F1±1: cut within one exchange of the splice")
    table.add_column("detector")
    for k in kinds:
        for col in ("cuts", "P", "R", "F1", "F1±1"):
            table.add_column(f"{k[:4]} {col}", justify="right")
    names = _table_rows(all_scores[kinds[0]])
    for name in names:
        row = [name]
        for k in kinds:
            s = all_scores[k][name]
            c0, c1 = s.counts[0], s.counts[1]
            nb = sets[k]["buffers"]
            row += [f"{s.cuts / nb:.1f}", _pct(c0.precision), _pct(c0.recall), _pct(c0.f1),
                    _pct(c1.f1)]
        # A rule under B2 and under each B1 mode's group (its B1 row, then its B rows).
        table.add_row(*row, end_section=name == "B2" or name.endswith(f"tol {TOLERANCES[-1]}"))
    console.print(table)
    diag = Table(title="how much B1 filters B2 (B rows): % of B2 cuts kept by the intersection, "
                       "% buffers falling back to B2, % positions within tolerance of a B1 cut")
    diag.add_column("combination")
    for k in kinds:
        for col in ("B2 kept", "fallback", "B1 cover"):
            diag.add_column(f"{k[:4]} {col}", justify="right")
    for name in names:
        if _parse_b(name) is None:
            continue
        row = [name]
        for k in kinds:
            s = all_scores[k][name]
            nb = sets[k]["buffers"]
            row += [_pct(s.b2_kept / s.b2_offered) if s.b2_offered else "-",
                    _pct(s.fallbacks / nb), _pct(s.coverage_sum / nb)]
        diag.add_row(*row)
    console.print(diag)
