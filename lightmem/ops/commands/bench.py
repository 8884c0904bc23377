"""``lightmem bench``: throughput measured beside its baseline, in the same run.

``bench pipeline``: turns/s through the sensory stage (compress + sensory buffer + hybrid
topic segmentation) on real LoCoMo turns, beside the bare forward passes of the same models
over the same inputs (the limit the pipeline can approach). Model loading and a warm-up
are excluded from both.

``bench locomo``: evidence recall and memory-building cost on LoCoMo for NaiveRAG, LightMem
(extractive and LLM) and a per-turn extractor, side by side (see :mod:`lightmem.ops.bench.locomo`).

``bench stream``: turns/s, latency to searchable and lag per stage through the real Kafka and
Elasticsearch, beside the embedded runtime on the same turns (see :mod:`lightmem.ops.bench.stream`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from lightmem.ops.bench import forget as bench_forget
from lightmem.ops.bench import sleep as bench_sleep
from lightmem.ops.bench.locomo import locomo_command
from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, load_locomo
from lightmem.ops.bench.segment import segment_command
from lightmem.ops.bench.serve import serve_command
from lightmem.ops.bench.stream import stream_command

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
#: ``bench serve``: the memory service's search and freshness beside the bare path.
app.command(name="serve")(serve_command)
#: ``bench forget``: erasing one user among many; ingest with the erasure ledger consulted.
app.command(name="forget")(bench_forget.forget_command)


@app.command()
def pipeline(
    data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    limit: Annotated[int, typer.Option(min=10, help="Turns to process")] = 600,
    rate: Annotated[float, typer.Option(min=0.05, max=1.0, help="Compression rate r")] = 0.6,
    compressor: Annotated[
        str,
        typer.Option(help="Compressors, comma-separated, each beside its own bare passes: "
                     "entropy | minilm | llmlingua2 | none"),
    ] = "entropy",
    batch_size: Annotated[int | None, typer.Option(help="Compressor batch size")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here")] = None,
) -> None:
    """Sensory-stage throughput (compress + segment) vs the bare model forward passes."""
    from lightmem.ops.bench.pipeline import measure_pipeline, pipeline_table
    from lightmem.streams.models.causal_lm import COMPRESSION_BACKENDS

    names = [c.strip() for c in compressor.split(",") if c.strip()]
    unknown = [c for c in names if c not in COMPRESSION_BACKENDS]
    if not names or unknown:
        raise typer.BadParameter(
            f"{unknown or compressor!r}: expected some of {list(COMPRESSION_BACKENDS)}",
            param_hint="--compressor",
        )
    try:
        samples = load_locomo(data)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    events = [t for s in samples for t in s.turns][:limit]
    err.print(f"{len(events)} turns: pipeline (compress + buffer + segment) and, interleaved "
              "chunk by chunk, the bare forward passes over the same inputs ...")
    results = [
        measure_pipeline(events, compressor=name, rate=rate, batch_size=batch_size,
                         threads=threads, err=err)
        for name in names
    ]
    err.print(pipeline_table(results))
    # One compressor: the same JSON object as before; several: one object per compressor.
    result: Any = results[0] if len(results) == 1 else results
    out.print_json(data=result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
