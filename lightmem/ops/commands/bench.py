"""``lightmem bench``: throughput measured beside its baseline, in the same run.

``bench pipeline``: turns/s through the sensory stage (compress + sensory buffer + hybrid
topic segmentation) on real LoCoMo turns, beside the bare forward passes of the same models
over the same inputs (the limit the pipeline can approach). Model loading and a warm-up
are excluded from both.

``bench locomo``: evidence recall and memory-building cost on LoCoMo for NaiveRAG, LightMem
(extractive and LLM) and a per-turn extractor, side by side (see :mod:`.bench_locomo`).

``bench stream``: turns/s, latency to searchable and lag per stage through the real Kafka and
Elasticsearch, beside the embedded runtime on the same turns (see :mod:`.bench_stream`).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.ops.bench import sleep as bench_sleep
from lightmem.ops.bench.locomo import locomo_command
from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, load_locomo
from lightmem.ops.bench.segment import segment_command
from lightmem.ops.bench.stream import stream_command
from lightmem.settings import load_settings

app = typer.Typer(help="Benchmarks (numbers beside a baseline, same run).", no_args_is_help=True)
err = Console(stderr=True)
out = Console()

#: ``bench locomo``: recall and build cost on LoCoMo, LightMem beside its baselines.
app.command(name="locomo")(locomo_command)
#: ``bench stream``: the Kafka + Elasticsearch path beside the embedded runtime.
app.command(name="stream")(stream_command)
#: ``bench segment``: boundary precision / recall of B1, B2 and B on spliced LoCoMo buffers.
app.command(name="segment")(segment_command)
#: ``bench sleep``: the sleep-time worker's throughput and its yielding to ingest.
app.command(name="sleep")(bench_sleep.sleep)


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


@app.command()
def pipeline(
    data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    limit: Annotated[int, typer.Option(min=10, help="Turns to process")] = 600,
    rate: Annotated[float, typer.Option(min=0.05, max=1.0, help="Compression rate r")] = 0.6,
    compressor: Annotated[str, typer.Option(help="entropy | llmlingua2 | none")] = "entropy",
    batch_size: Annotated[int | None, typer.Option(help="Compressor batch size")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here")] = None,
) -> None:
    """Sensory-stage throughput (compress + segment) vs the bare model forward passes."""
    from lightmem.processors.segment import push, to_segment_turn
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    try:
        samples = load_locomo(data)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    events = [t for s in samples for t in s.turns][:limit]
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
    encode = _Recorder(seg.encode)
    seg.attention, seg.encode = attention, encode
    # Warm-up: first calls pay for lazy initialisation (kernels, tokenizer caches).
    comp.compress([e.text for e in events[:8]])
    seg.boundaries([])
    attention.fn(["warm up one", "warm up two"])
    encode.fn(["warm up"])
    calls = 0

    err.print(f"{len(events)} turns: pipeline (compress + buffer + segment) and, interleaved "
              "chunk by chunk, the bare forward passes over the same inputs ...")
    step = settings.ingest_batch_turns
    chunks = [events[i : i + step] for i in range(0, len(events), step)]
    st_model = rt.encoder.sentence_model
    backend = comp.backend
    segments = 0
    compress_s = segment_s = 0.0
    bare_compress_s = bare_attention_s = bare_encode_s = 0.0
    states: dict[str, Any] = {}
    # Interleaving pipeline and baseline per chunk means both see the same machine load
    # (other processes on a shared 2-core box would otherwise bias whichever ran first).
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err)
    task = progress.add_task("turns", total=len(events))
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
                    states.get(ev.conversation_key), ev, to_segment_turn(ev, c.compressed),
                    buffer=rt.sensory_buffer, segmenter=seg, idle_timeout=rt.idle_timeout,
                )
                segments += len(closed)
            if chunk is chunks[-1]:
                for state in states.values():
                    segments += len(seg.cut(state, flush=True)[0])
            segment_s += time.perf_counter() - s0
            bare_attention_s += sum(_timed(lambda s=s: attention.fn.forward_pass(s))
                                    for s in attention.calls)
            bare_encode_s += sum(
                _timed(lambda s=s: st_model.encode(s, batch_size=64, convert_to_numpy=True,
                                                   show_progress_bar=False))
                for s in encode.calls
            )
            calls += len(attention.calls) + len(encode.calls)
            progress.advance(task, len(chunk))
    finally:
        progress.stop()
    pipeline_s = compress_s + segment_s
    bare_s = bare_compress_s + bare_attention_s + bare_encode_s
    n = len(events)
    result = {
        "turns": n,
        "segments": segments,
        "compressor": backend.name,
        "rate": rate,
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
    table = Table(title=f"bench pipeline: {n} LoCoMo turns, r={rate}, {backend.name}")
    table.add_column("")
    table.add_column("seconds", justify="right")
    table.add_column("turns/s", justify="right")
    table.add_row("pipeline (compress + buffer + segment)", f"{pipeline_s:.2f}",
                  f"{n / pipeline_s:.1f}")
    table.add_row("  of which compress", f"{compress_s:.2f}", "")
    table.add_row("  of which buffer + segment", f"{segment_s:.2f}", "")
    table.add_row("bare forward passes (same inputs)", f"{bare_s:.2f}", f"{n / bare_s:.1f}")
    table.add_row("  compressor LM", f"{bare_compress_s:.2f}", "")
    table.add_row("  MiniLM attentions (B1)", f"{bare_attention_s:.2f}", "")
    table.add_row("  MiniLM embeddings (B2)", f"{bare_encode_s:.2f}", "")
    table.add_row("pipeline / bare throughput", "", f"{bare_s / pipeline_s:.2f}")
    err.print(table)
    out.print_json(data=result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
