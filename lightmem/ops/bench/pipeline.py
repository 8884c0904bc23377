"""``bench pipeline``: the sensory stage's turns/s beside its bare forward passes.

For each compressor asked for (``--compressor entropy,minilm``), in one run: the same LoCoMo
turns go through compress + sensory buffer + hybrid topic segmentation, and, interleaved
chunk by chunk, the bare forward passes of the same models over the same inputs (the
compressor's :meth:`~lightmem.processors.compress.CompressionBackend.forward_pass`, MiniLM
without attentions over B1's inputs, sentence embeddings over B2's). Interleaving means
pipeline and baseline see the same machine load (other processes on a shared box would
otherwise bias whichever ran first); each compressor is compared with its own baseline.
Model loading and a warm-up are excluded from both.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.schemas import TurnEvent
from lightmem.settings import load_settings

__all__ = ["measure_pipeline", "pipeline_table"]


@dataclass
class _Recorder:
    """Wraps a model callable and records every input it was given, to replay bare."""

    fn: Callable[[Sequence[str]], np.ndarray]
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.fn(texts)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_pipeline(
    events: Sequence[TurnEvent],
    *,
    compressor: str,
    rate: float,
    batch_size: int | None,
    threads: int | None,
    err: Console,
) -> dict[str, Any]:
    """Run the sensory stage over ``events`` with one compressor, beside its bare passes.

    Args:
        events: The turns, in order (several conversations may interleave).
        compressor: Backend name (``entropy``, ``minilm``, ``llmlingua2``, ``none``).
        rate: Compression rate r.
        batch_size: Compressor batch size (None: settings).
        threads: torch threads (None: settings).
        err: Where progress goes.

    Returns:
        The measurements (seconds and turns/s of the pipeline and of the bare passes).
    """
    from lightmem.processors.segment import push, to_segment_turn
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    settings = load_settings(
        data_dir=Path(tempfile.mkdtemp(prefix="lightmem-bench-")),
        compressor=compressor,
        compression_rate=rate,
        compress_batch_size=batch_size,
        torch_threads=threads,
    )
    rt = EmbeddedRuntime(settings)
    err.print(f"loading models ({compressor} compressor, MiniLM segmenter) ...")
    comp, seg = rt.compressor, rt.segmenter
    attention = _Recorder(seg.attention)
    # B2 on turns (TurnEmbeddings): the compressor's pass fills its cache, so only the turns
    # it computes itself (misses: short turns, other compressors) are B2's own model work.
    turns = getattr(seg, "b2_input", "exchanges") == "turns"
    owner = seg.encode if turns else seg
    name = "compute" if turns else "encode"
    encode = _Recorder(getattr(owner, name))
    seg.attention = attention
    setattr(owner, name, encode)
    if turns:
        owner.clear()  # the cache is per process: start cold for each compressor
    try:
        # Warm-up: first calls pay for lazy initialisation (kernels, tokenizer caches).
        comp.compress([e.text for e in events[:8]])
        seg.boundaries([])
        attention.fn(["warm up one", "warm up two"])
        encode.fn(["warm up"])
        return _measure(rt, events, attention, encode, push, to_segment_turn, rate, err)
    finally:
        # The segmenter is shared per process (one MiniLM): leave it as it was.
        seg.attention = attention.fn
        setattr(owner, name, encode.fn)


def _measure(
    rt: Any,
    events: Sequence[TurnEvent],
    attention: _Recorder,
    encode: _Recorder,
    push: Any,
    to_segment_turn: Any,
    rate: float,
    err: Console,
) -> dict[str, Any]:
    comp, seg = rt.compressor, rt.segmenter
    step = rt.settings.ingest_batch_turns
    chunks = [events[i : i + step] for i in range(0, len(events), step)]
    st_model = rt.encoder.sentence_model
    backend = comp.backend
    segments = calls = 0
    compress_s = segment_s = 0.0
    bare_compress_s = bare_attention_s = bare_encode_s = 0.0
    states: dict[str, Any] = {}
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    task = progress.add_task(f"turns ({backend.name})", total=len(events))
    progress.start()
    try:
        for chunk in chunks:
            texts = [e.text for e in chunk]
            c0 = time.perf_counter()
            compressed = comp.compress(texts)
            compress_s += time.perf_counter() - c0
            bare_compress_s += _timed(lambda t=texts: backend.forward_pass(t))
            attention.calls.clear()
            encode.calls.clear()
            s0 = time.perf_counter()
            for ev, c in zip(chunk, compressed, strict=True):
                closed, states[ev.conversation_key] = push(
                    states.get(ev.conversation_key),
                    ev,
                    to_segment_turn(ev, c.compressed),
                    buffer=rt.sensory_buffer,
                    segmenter=seg,
                    idle_timeout=rt.idle_timeout,
                )
                segments += len(closed)
            if chunk is chunks[-1]:
                for state in states.values():
                    segments += len(seg.cut(state, flush=True)[0])
            segment_s += time.perf_counter() - s0
            bare_attention_s += sum(
                _timed(lambda s=s: attention.fn.forward_pass(s)) for s in attention.calls
            )
            bare_encode_s += sum(
                _timed(
                    lambda s=s: st_model.encode(
                        s, batch_size=64, convert_to_numpy=True, show_progress_bar=False
                    )
                )
                for s in encode.calls
            )
            calls += len(attention.calls) + len(encode.calls)
            progress.advance(task, len(chunk))
    finally:
        progress.stop()
    pipeline_s = compress_s + segment_s
    bare_s = bare_compress_s + bare_attention_s + bare_encode_s
    n = len(events)
    return {
        "turns": n,
        "segments": segments,
        "compressor": backend.name,
        "rate": rate,
        "b2_input": getattr(seg, "b2_input", "exchanges"),
        "pipeline_s": round(pipeline_s, 3),
        "pipeline_turns_per_s": round(n / pipeline_s, 2),
        "pipeline_compress_s": round(compress_s, 3),
        "pipeline_segment_s": round(segment_s, 3),
        "bare_s": round(bare_s, 3),
        "bare_turns_per_s": round(n / bare_s, 2),
        "bare_compress_s": round(bare_compress_s, 3),
        "bare_attention_s": round(bare_attention_s, 3),
        "bare_encode_s": round(bare_encode_s, 3),
        "segmenter_model_calls": calls,
        "ratio_pipeline_over_bare": round(bare_s / pipeline_s, 3),
    }


def pipeline_table(results: Sequence[dict[str, Any]]) -> Table:
    """One column per compressor: pipeline and bare seconds, turns/s and their ratio."""
    first = results[0]
    table = Table(title=f"bench pipeline: {first['turns']} LoCoMo turns, r={first['rate']}, "
                        f"B2 input {first.get('b2_input', 'exchanges')}")
    table.add_column("")
    for r in results:
        table.add_column(f"{r['compressor']}: s", justify="right")
        table.add_column("turns/s", justify="right")

    def row(label: str, key: str, per_s: bool) -> None:
        cells: list[str] = []
        for r in results:
            cells.append(f"{r[key]:.2f}")
            cells.append(f"{r['turns'] / r[key]:.1f}" if per_s and r[key] else "")
        table.add_row(label, *cells)

    row("pipeline (compress + buffer + segment)", "pipeline_s", True)
    row("  of which compress", "pipeline_compress_s", True)
    row("  of which buffer + segment", "pipeline_segment_s", False)
    row("bare forward passes (same inputs)", "bare_s", True)
    row("  compressor model", "bare_compress_s", True)
    row("  MiniLM attentions (B1)", "bare_attention_s", False)
    # B2 on turns: only the turns the compressor's pass did not embed (its misses).
    row("  MiniLM embeddings (B2)", "bare_encode_s", False)
    ratio: list[str] = []
    for r in results:
        ratio += ["", f"{r['ratio_pipeline_over_bare']:.2f}"]
    table.add_row("pipeline / bare throughput", *ratio)
    return table
