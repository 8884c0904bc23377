"""``bench locomo``'s timing: the wall-time phases of a build (:class:`PhaseClock`) and the
probes that charge each model and store call to its phase; the sensory cache shared by
the systems of one run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from lightmem.processors.summarize import SummaryResult
from lightmem.schemas import MemoryEntry, Segment

if TYPE_CHECKING:
    from lightmem.processors.compress import Compressed
    from lightmem.processors.segment import SensoryBufferState


__all__ = [
    "PHASES",
    "PhaseClock",
    "SensoryCache",
    "CompressorProbe",
    "SegmenterProbe",
    "SummarizerProbe",
    "EmbedderProbe",
    "StoreProbe",
    "QueryEncoder",
]

#: The wall-time buckets of a build (phases, not pipeline stages).
PHASES = ("compress", "segment", "summarize", "embed_index", "retrieve")


@dataclass
class PhaseClock:
    """Seconds per phase: measured in this system's run, and charged (a reused result is
    charged the time it took when it was computed)."""

    measured: dict[str, float] = field(default_factory=dict)
    charged: dict[str, float] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)

    def add(self, phase: str, measured: float, *, charged: float | None = None) -> None:
        self.measured[phase] = self.measured.get(phase, 0.0) + measured
        self.charged[phase] = self.charged.get(phase, 0.0) + (
            measured if charged is None else charged
        )
        if charged is not None:
            self.reused.add(phase)

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)


@dataclass
class SensoryCache:
    """Sensory-stage results of one compression rate, shared by the systems using it."""

    compress: dict[tuple[str, ...], tuple[list[Compressed], float]] = field(default_factory=dict)
    cut: dict[tuple[str, bool], tuple[list[Segment], SensoryBufferState, float]] = field(
        default_factory=dict
    )


class CompressorProbe:
    """The runtime's compressor, timed, each batch's result computed once per rate."""

    def __init__(self, inner: Any, cache: SensoryCache, clock: PhaseClock) -> None:
        self.inner, self.cache, self.clock = inner, cache, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def compress(self, texts: Sequence[str]) -> list[Compressed]:
        key = tuple(texts)
        t0 = time.perf_counter()
        hit = self.cache.compress.get(key)
        if hit is not None:
            self.clock.add("compress", time.perf_counter() - t0, charged=hit[1])
            return hit[0]
        result = self.inner.compress(texts)
        spent = time.perf_counter() - t0
        self.cache.compress[key] = (result, spent)
        self.clock.add("compress", spent)
        return result


class SegmenterProbe:
    """The runtime's topic segmenter, timed, each cut computed once per rate (cuts are pure
    functions of the buffer state)."""

    def __init__(self, inner: Any, cache: SensoryCache, clock: PhaseClock) -> None:
        self.inner, self.cache, self.clock = inner, cache, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def cut(
        self, state: SensoryBufferState, *, flush: bool
    ) -> tuple[list[Segment], SensoryBufferState]:
        t0 = time.perf_counter()
        key = (state.model_dump_json(), flush)
        hit = self.cache.cut.get(key)
        if hit is not None:
            self.clock.add("segment", time.perf_counter() - t0, charged=hit[2])
            return hit[0], hit[1]
        segments, rest = self.inner.cut(state, flush=flush)
        spent = time.perf_counter() - t0
        self.cache.cut[key] = (segments, rest, spent)
        self.clock.add("segment", spent)
        return segments, rest


class SummarizerProbe:
    """The runtime's summarizer, timed; counts dead letters."""

    def __init__(self, inner: Any, clock: PhaseClock) -> None:
        self.inner, self.clock = inner, clock
        self.dead_letters = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def summarize(self, segments: Sequence[Segment], *, now: datetime) -> SummaryResult:
        with self.clock.time("summarize"):
            result: SummaryResult = self.inner.summarize(segments, now=now)
        self.dead_letters += result.dead_letter is not None
        return result


class EmbedderProbe:
    """The runtime's embedder: ``embed_entries`` timed as embed+index (B2 embeddings go
    through the segmenter, which holds the real embedder)."""

    def __init__(self, inner: Any, clock: PhaseClock) -> None:
        self.inner, self.clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner(texts)

    def embed_entries(self, entries: Sequence[MemoryEntry]) -> list[MemoryEntry]:
        with self.clock.time("embed_index"):
            return self.inner.embed_entries(entries)


class StoreProbe:
    """The runtime's store: ``upsert`` timed as embed+index."""

    def __init__(self, inner: Any, clock: PhaseClock) -> None:
        self.inner, self.clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        with self.clock.time("embed_index"):
            self.inner.upsert(entries)


class QueryEncoder:
    """Query embeddings for one system's retriever, each query embedded once."""

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray]) -> None:
        self.embed = embed
        self.cache: dict[str, np.ndarray] = {}

    def prime(self, texts: Sequence[str]) -> None:
        """Embed ``texts`` now, in one batched pass."""
        if texts:
            self(texts)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, vector in zip(missing, self.embed(missing), strict=True):
                self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts])
