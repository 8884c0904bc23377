"""The LightMem processors, built from settings, for the streaming workers.

The same processors, with the same settings and the same once-per-process model loads, as
the embedded runtime (:class:`~lightmem.streams.embedded.runtime.EmbeddedRuntime` is a subclass):
the encoder comes from :func:`~lightmem.streams.models.encoder.load_encoder` and the compressor from
a per-process cache, so an embedded runtime and a worker in one process share one copy of
each model. Everything loads lazily, on first use.
"""

from __future__ import annotations

from datetime import timedelta
from functools import cache, cached_property
from pathlib import Path

from lightmem.processors.compress import CompressionBackend, SensoryCompressor
from lightmem.processors.embed import Embedder
from lightmem.processors.llm import ChatModel
from lightmem.processors.retention import MiniLMRetentionBackend
from lightmem.processors.segment import MiniLMAttention, SensoryBuffer, TopicSegmenter
from lightmem.processors.summarize import Summarizer, TopicBuffer
from lightmem.processors.turn_embeddings import TurnEmbeddings
from lightmem.settings import Settings
from lightmem.streams.models.encoder import MiniLMEncoder, configure_torch, load_encoder

__all__ = ["Components"]


@cache
def _compression_backend(
    name: str, *, cache_dir: Path, model: str | None, batch_size: int
) -> CompressionBackend:
    """One loaded compressor model per process, however many runtimes/workers use it."""
    from lightmem.streams.models.causal_lm import load_compression_backend

    return load_compression_backend(name, cache_dir=cache_dir, model=model, batch_size=batch_size)


@cache
def _turn_embeddings() -> TurnEmbeddings:
    """One cache of turn embeddings per process: the minilm compressor's pass fills it and
    every segmenter's B2 (``segment_b2_input = turns``) reads it."""
    encoder = load_encoder()
    return TurnEmbeddings(encoder.attention_model, encoder.tokenizer)


class Components:
    """Lazily built processors for one worker process.

    Args:
        settings: Configuration (compressor, budgets, LLM endpoint, batch sizes).
        chat: A chat model to use instead of the one ``settings`` describes (tests).
    """

    def __init__(self, settings: Settings, *, chat: ChatModel | None = None) -> None:
        self.settings = settings
        self._chat_override = chat
        configure_torch(settings.torch_threads)

    @cached_property
    def encoder(self) -> MiniLMEncoder:
        return load_encoder()

    @cached_property
    def embedder(self) -> Embedder:
        return Embedder(self.encoder.sentence_model, batch_size=self.settings.embed_batch_size,
                        text=self.settings.embed_text)

    @cached_property
    def chat(self) -> ChatModel | None:
        if self._chat_override is not None:
            return self._chat_override
        if not self.settings.llm_configured:
            return None
        from lightmem.streams.models.openai_chat import OpenAIChatModel
        from lightmem.streams.observe.metrics import PrometheusUsageMeter

        assert self.settings.llm_base_url is not None
        return OpenAIChatModel(
            self.settings.llm_base_url,
            self.settings.llm_model,
            self.settings.llm_api_key.get_secret_value(),
            timeout=self.settings.llm_timeout_s,
            max_retries=self.settings.llm_max_retries,
            # Counted per (purpose, tenant) for reports, and in the process's metrics.
            meter=PrometheusUsageMeter(),
        )

    @cached_property
    def compressor(self) -> SensoryCompressor:
        backend = _compression_backend(
            self.settings.compressor,
            cache_dir=self.settings.cache_dir,
            model=self.settings.compressor_model,
            batch_size=self.settings.compress_batch_size,
        )
        if self.settings.segment_b2_input == "turns" and isinstance(
            backend, MiniLMRetentionBackend
        ):
            # B2's turn embeddings come out of the compressor's MiniLM pass.
            backend.turn_embeddings = _turn_embeddings()
        return SensoryCompressor(backend, rate=self.settings.compression_rate)

    @cached_property
    def sensory_buffer(self) -> SensoryBuffer:
        return SensoryBuffer(self.encoder.count_tokens, self.settings.sensory_budget_tokens)

    @cached_property
    def segmenter(self) -> TopicSegmenter:
        attention = MiniLMAttention(self.encoder.attention_model, self.encoder.tokenizer,
                                    layers=self.settings.segment_b1_layers)
        if self.settings.segment_b2_input == "turns":
            return TopicSegmenter(attention, _turn_embeddings(),
                                  tolerance=self.settings.segment_tolerance, b2_input="turns")
        return TopicSegmenter(attention, self.embedder, tolerance=self.settings.segment_tolerance)

    @cached_property
    def topic_buffer(self) -> TopicBuffer:
        return TopicBuffer(self.encoder.count_tokens, self.settings.topic_buffer_tokens)

    @cached_property
    def summarizer(self) -> Summarizer:
        return Summarizer(self.chat, max_tokens=self.settings.summary_token_cap)

    @property
    def idle_timeout(self) -> timedelta:
        return timedelta(seconds=self.settings.idle_timeout_s)

    def warm_up(self) -> None:
        """Load every model now (a worker does it before joining the consumer group, so that
        the first batch does not stall the group for the load time)."""
        _ = self.compressor, self.segmenter, self.topic_buffer, self.summarizer
