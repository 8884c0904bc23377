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

The metric and scoring are in :mod:`.segment_metric`, the spliced test buffers in
:mod:`.segment_buffers`; this module is the command.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, load_locomo
from lightmem.ops.bench.segment_buffers import SplicedBuffer, build_buffers, exchange_pools
from lightmem.ops.bench.segment_metric import (
    B1_MODES,
    MATCH_TOLERANCES,
    SPLICE_KINDS,
    TOLERANCES,
    B1Mode,
    Counts,
    DetectorScore,
    Signals,
    SpliceKind,
    b1_boundaries,
    boundary_counts,
    coverage,
    detector_outputs,
    match_count,
    parse_b,
    score,
)
from lightmem.processors.segment import (
    Exchange,
    adjacent_attention,
    adjacent_similarity,
)
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

err = Console(stderr=True)
out = Console()


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
    b1_layers: Annotated[
        str | None, typer.Option(help="MiniLM layers B1 averages, comma-separated (1 = the "
                                 "first; default: the segmenter's, LIGHTMEM_SEGMENT_B1_LAYERS)")
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
    overrides: dict[str, Any] = {}
    if b1_layers is not None:
        try:
            overrides["segment_b1_layers"] = tuple(
                int(x) for x in b1_layers.split(",") if x.strip()
            )
        except ValueError:
            err.print(f"[red]--b1-layers: {b1_layers!r}: expected layer numbers, "
                      "comma-separated[/red]")
            raise typer.Exit(2) from None
    settings = load_settings(
        data_dir=Path(tempfile.mkdtemp(prefix="lightmem-bench-")),
        compressor=compressor,
        compression_rate=rate,
        torch_threads=threads,
        **overrides,
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
        "b1_layers": list(seg.attention.layers),
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
                        if parse_b(name) else {}
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
    layers = ",".join(map(str, report["b1_layers"]))
    table = Table(title=f"bench segment (compressor {comp}; B1 layers {layers}; "
                        f"B2 input {report['b2_input']}, "
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
        if parse_b(name) is None:
            continue
        row = [name]
        for k in kinds:
            s = all_scores[k][name]
            nb = sets[k]["buffers"]
            row += [_pct(s.b2_kept / s.b2_offered) if s.b2_offered else "-",
                    _pct(s.fallbacks / nb), _pct(s.coverage_sum / nb)]
        diag.add_row(*row)
    console.print(diag)
