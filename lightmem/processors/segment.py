"""Sensory buffer and hybrid topic segmentation (LightMem stage 1, no LLM calls).

Compressed turns accumulate per conversation in a :class:`SensoryBufferState` until the
next user turn would push the buffered *user* tokens past the encoder's window
(:class:`SensoryBuffer`). The buffer is then cut into topic :class:`~lightmem.schemas.Segment`
records by :class:`TopicSegmenter`, which combines two boundary detectors over *exchanges*
(a user turn plus the assistant turns that answer it):

- B1 (attention): local extrema (minima by default, see :func:`attention_boundaries`) of
  the adjacent-sentence attention ``M[k, k-1]`` computed over the users' texts by a
  BERT-size encoder (:class:`MiniLMAttention`);
- B2 (similarity): ``cos(e[k-1], e[k]) < tau`` over embeddings of whole exchanges, ``tau``
  rising from 0.2 to 0.5 until something is found;
- combined by a tolerant intersection: B2 boundaries within ``tolerance`` exchanges of a B1
  boundary, falling back to B2 when none are.

A boundary is an exchange index ``k`` (1 <= k < n): the cut falls *before* exchange ``k``.
Everything here is pure: state in, state out; the models come in as arguments through the
:class:`SentenceAttention` and :class:`~lightmem.processors.embed.TextEncoder` protocols, so
tests can pass fakes.

Typical use by the runtime, once per incoming turn (see :func:`push`)::

    segments, state = push(state, event, turn, buffer=buf, segmenter=seg, idle_timeout=t)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from lightmem.processors.embed import TextEncoder
from lightmem.schemas import Role, Segment, SegmentTurn, TurnEvent, conversation_key, stable_id

if TYPE_CHECKING:
    from .packed_encoder import PackedEncoder

__all__ = [
    "SensoryBufferState",
    "SensoryBuffer",
    "Exchange",
    "SentenceAttention",
    "MiniLMAttention",
    "TopicSegmenter",
    "FlushReason",
    "B2Input",
    "B2_TAU_START",
    "to_segment_turn",
    "group_exchanges",
    "B1_LAYERS",
    "adjacent_attention",
    "attention_boundaries",
    "adjacent_similarity",
    "similarity_boundaries",
    "combine_boundaries",
    "cut_at",
    "should_flush",
    "push",
]

FlushReason = Literal["session_end", "idle"]

#: What B2 embeds: ``"exchanges"``, each exchange's compressed text (one encoder pass per
#: exchange and cut), or ``"turns"``, each turn's original text (one embedding per turn,
#: shared with the ``minilm`` compressor's pass), an exchange the mean of its turns'.
B2Input = Literal["exchanges", "turns"]

#: B2's first threshold per input. Per-turn means are smoother (adjacent exchanges look
#: more alike), so ``"turns"`` starts higher; measured with ``lightmem bench segment
#: --compressor minilm --b2-input exchanges,turns`` (numbers in the issue 16 note).
B2_TAU_START: dict[str, float] = {"exchanges": 0.2, "turns": 0.3}


# --------------------------------------------------------------------------------------
# Buffer state and budget
# --------------------------------------------------------------------------------------


class SensoryBufferState(BaseModel):
    """One conversation's sensory buffer; JSON-serialisable (persisted by the runtime).

    Frozen: every operation returns a new state, so a failed step never leaves a
    half-updated buffer behind in the runtime's table.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    user: str
    conversation: str
    #: Session of the buffered turns; a turn from another session flushes the buffer first.
    session: str
    #: Buffered turns in conversation order (original and compressed text).
    turns: list[SegmentTurn] = Field(default_factory=list)
    #: Event time of the newest buffered turn (drives the idle timeout); None when empty.
    last_event_time: AwareDatetime | None = None

    @classmethod
    def open(cls, event: TurnEvent) -> SensoryBufferState:
        """An empty buffer for ``event``'s tenant, user, conversation and session."""
        return cls(
            tenant=event.tenant,
            user=event.user,
            conversation=event.conversation,
            session=event.session,
        )

    @property
    def conversation_key(self) -> str:
        """:func:`~lightmem.schemas.keys.conversation_key`, the key segment ids are derived
        from (unambiguous: ``/`` in names cannot make two conversations share ids)."""
        return conversation_key(self.tenant, self.conversation)

    @property
    def empty(self) -> bool:
        return not self.turns


def to_segment_turn(
    event: TurnEvent, compressed_text: str | None = None, *, seq: int | None = None
) -> SegmentTurn:
    """The buffered form of ``event``: original text plus its compressed text.

    Args:
        event: The incoming turn.
        compressed_text: Output of sensory pre-compression; None keeps the original text.
        seq: The turn's arrival position (``SegmentTurn.seq``): orders its memories among
            those of turns with the same event time.

    Returns:
        A :class:`SegmentTurn` carrying both texts.
    """
    return SegmentTurn(
        turn_id=event.turn_id,
        # A conversation may have several users: each turn's memories are filed under its own.
        user=event.user,
        role=event.role,
        speaker=event.speaker,
        event_time=event.event_time,
        original_text=event.text,
        compressed_text=event.text if compressed_text is None else compressed_text,
        seq=seq,
    )


class SensoryBuffer:
    """The sensory buffer's budget rule: user tokens accumulate up to ``token_budget``.

    Only user turns count, as in LightMem: the attention detector (B1) reads the users'
    text only, so the budget is what has to fit in the encoder's window. Assistant turns
    ride along with the exchange they answer.

    Args:
        count_tokens: Encoder tokens in a text, without special tokens.
        token_budget: Most user tokens a buffer holds (default 512, MiniLM's window;
            :class:`MiniLMAttention` trims the 2 special positions' worth if needed).
    """

    def __init__(self, count_tokens: Callable[[str], int], token_budget: int = 512) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget: must be >= 1 (got {token_budget!r})")
        self.count_tokens = count_tokens
        self.token_budget = token_budget

    def user_tokens(self, state: SensoryBufferState) -> int:
        """Compressed tokens of the buffered user turns.

        Args:
            state: The buffer.

        Returns:
            The token count the budget is checked against.
        """
        return sum(self.count_tokens(t.compressed_text) for t in state.turns if t.role == Role.user)

    def would_overflow(self, state: SensoryBufferState, turn: SegmentTurn) -> bool:
        """Whether adding ``turn`` would push the buffer past the budget (cut first, then).

        Assistant turns never overflow, and neither does a user turn into a buffer holding
        no user tokens: an oversized single turn is accepted alone (the encoder truncates)
        rather than blocking the conversation forever.

        Args:
            state: The buffer.
            turn: The turn about to be added.

        Returns:
            True when the buffer must be cut before ``turn`` is added.
        """
        if turn.role != Role.user:
            return False
        held = self.user_tokens(state)
        return held > 0 and held + self.count_tokens(turn.compressed_text) > self.token_budget

    def add(
        self, state: SensoryBufferState, turn: SegmentTurn, *, session: str | None = None
    ) -> SensoryBufferState:
        """Append ``turn`` (the caller checked :meth:`would_overflow` first).

        Args:
            state: The buffer.
            turn: The turn to append.
            session: The turn's session; only an empty buffer may change session (a new
                session flushes the buffer first, see :func:`should_flush`).

        Returns:
            The new state.
        """
        update: dict[str, Any] = {
            "turns": [*state.turns, turn],
            "last_event_time": turn.event_time,
        }
        if session is not None and session != state.session:
            if state.turns:
                raise ValueError(
                    f"session: buffer holds turns of session {state.session!r}; "
                    f"flush before adding a turn of {session!r}"
                )
            update["session"] = session
        return state.model_copy(update=update)


def should_flush(
    state: SensoryBufferState,
    *,
    next_turn: TurnEvent | None = None,
    now: datetime | None = None,
    idle_timeout: timedelta | None = None,
) -> FlushReason | None:
    """Why the whole buffer should be flushed now, if it should (explicit flushes are the
    runtime's own decision).

    Idle is judged on event time when a turn arrives (so a replay cuts exactly as the live
    run did) and on ``now`` for a timer tick with no turn.

    Args:
        state: The buffer.
        next_turn: The turn about to be added, if any.
        now: The current time for a timer tick (ignored when ``next_turn`` is given).
        idle_timeout: Gap after the newest buffered turn that closes the buffer; None
            disables the idle rule.

    Returns:
        ``"session_end"`` when ``next_turn`` starts another session, ``"idle"`` when the
        gap exceeds ``idle_timeout``, else None (always None for an empty buffer).
    """
    if not state.turns:
        return None
    if next_turn is not None and next_turn.session != state.session:
        return "session_end"
    if idle_timeout is None or state.last_event_time is None:
        return None
    at = next_turn.event_time if next_turn is not None else now
    if at is not None and at - state.last_event_time > idle_timeout:
        return "idle"
    return None


# --------------------------------------------------------------------------------------
# Exchanges: the unit boundaries are placed between
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """A user turn and the non-user turns that follow it (turns before the first user turn
    form an exchange alone)."""

    turns: tuple[SegmentTurn, ...]

    @property
    def user_text(self) -> str:
        """What B1 reads: the user turn's compressed text (the whole text without one)."""
        for t in self.turns:
            if t.role == Role.user:
                return t.compressed_text
        return self.text

    @property
    def text(self) -> str:
        """What B2 embeds: every turn's compressed text, one per line."""
        return "\n".join(t.compressed_text for t in self.turns)


def group_exchanges(turns: Sequence[SegmentTurn]) -> list[Exchange]:
    """Group turns into exchanges; each user turn opens a new one.

    Args:
        turns: Buffered turns in order.

    Returns:
        The exchanges, covering every turn exactly once, in order.
    """
    groups: list[list[SegmentTurn]] = []
    for t in turns:
        if t.role == Role.user or not groups:
            groups.append([t])
        else:
            groups[-1].append(t)
    return [Exchange(turns=tuple(g)) for g in groups]


# --------------------------------------------------------------------------------------
# Boundary detectors on plain matrices (unit-testable without a model)
# --------------------------------------------------------------------------------------


def adjacent_attention(m: np.ndarray) -> np.ndarray:
    """``a[k] = M[k, k-1]`` for k = 1..n-1 (``a[0]`` is NaN: exchange 0 has no predecessor).

    Args:
        m: The n x n sentence attention matrix.

    Returns:
        A length-n float array.
    """
    n = m.shape[0]
    a = np.full(n, np.nan)
    if n > 1:
        a[1:] = m[np.arange(1, n), np.arange(0, n - 1)]
    return a


def attention_boundaries(m: np.ndarray, *, extremum: Literal["max", "min"] = "min") -> list[int]:
    """B1: exchanges whose attention to their predecessor is a strict local extremum.

    With ``extremum="max"`` (DESIGN.md's formula) B1 = {k | M[k,k-1] > M[k-1,k-2] and
    M[k,k-1] > M[k+1,k]}; ``"min"`` (the default) flips both comparisons: the first
    exchange of a new topic barely attends to the one before it. k runs over 2..n-2, where
    both neighbours exist.

    Why ``"min"`` (``lightmem bench segment``: 300 + 300 LoCoMo buffers spliced from
    different conversations / different sessions of one conversation, <= 512 user
    tokens, uncompressed): a local minimum falls exactly on 50% / 47% of the splices
    (B1 F1 0.39 / 0.37), DESIGN's local maximum on 18% / 20% (F1 0.15 / 0.17), because
    the maxima flank the boundary at k-1 and k+1; the reference code's maximum of
    ``M[k+1, k]`` reported as boundary k (DESIGN's formula dropped that shift) on 37% /
    39% (F1 0.31 / 0.33). Same order on entropy-compressed turns.

    Args:
        m: The n x n sentence attention matrix.
        extremum: Which local extremum marks a boundary (default ``"min"``).

    Returns:
        Sorted boundary indices (a cut before exchange k).
    """
    a = adjacent_attention(m)
    sign = 1.0 if extremum == "max" else -1.0
    out = []
    for k in range(2, len(a) - 1):
        if sign * a[k] > sign * a[k - 1] and sign * a[k] > sign * a[k + 1]:
            out.append(k)
    return out


def adjacent_similarity(embeddings: np.ndarray) -> np.ndarray:
    """``s[k] = cos(e[k-1], e[k])`` for k = 1..n-1 (``s[0]`` is NaN).

    Args:
        embeddings: n x d exchange embeddings (normalised or not: rows are re-normalised).

    Returns:
        A length-n float array.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    s = np.full(n, np.nan)
    if n > 1:
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        e = e / np.where(norms == 0.0, 1.0, norms)  # a zero vector stays zero (cos 0)
        s[1:] = np.einsum("ij,ij->i", e[:-1], e[1:])
    return s


def similarity_boundaries(
    similarities: np.ndarray,
    *,
    tau_start: float = 0.2,
    tau_step: float = 0.05,
    tau_max: float = 0.5,
) -> tuple[list[int], float | None]:
    """B2: adjacent exchanges less similar than ``tau``, the lowest ``tau`` that finds any.

    The schedule is ``tau_start + i * tau_step`` (computed by index, so 0.5 itself is tried;
    accumulating 0.05 in floating point overshoots it).

    Args:
        similarities: ``s[k] = cos(e[k-1], e[k])`` as from :func:`adjacent_similarity`.
        tau_start: First threshold (default 0.2).
        tau_step: Increment (default 0.05).
        tau_max: Last threshold tried (default 0.5).

    Returns:
        Sorted boundaries and the ``tau`` that produced them (``([], None)`` if none did).
    """
    steps = int(np.floor((tau_max - tau_start) / tau_step + 1e-9))
    for i in range(steps + 1):
        tau = round(tau_start + i * tau_step, 10)
        found = [k for k in range(1, len(similarities)) if similarities[k] < tau]
        if found:
            return found, tau
    return [], None


def combine_boundaries(
    b1: Sequence[int], b2: Sequence[int], *, tolerance: int = 3, fallback_to_b2: bool = True
) -> list[int]:
    """Tolerant intersection: B2 boundaries within ``tolerance`` of some B1 boundary.

    B2 decides *where* to cut (embedding drops are the precise signal); B1 confirms that a
    topic change is near. ``tolerance=0`` is the paper's strict B1 ∩ B2.

    B1 can only remove B2 cuts, never add one. Measured (``lightmem bench segment``, B1 =
    minima): at tolerance 3, 97-98% of positions lie within 3 of a B1 minimum, so B keeps
    97-99% of B2's cuts and scores as B2 alone (exact-match F1 0.64 / 0.54 against 0.64 /
    0.55); at 1 and 0 B1 removes more, raising precision by up to 9 points but losing
    recall faster (F1 0.60 / 0.52 and 0.56 / 0.49). The default stays 3 for that reason:
    every tolerance at which B1 filters lowered F1; 0 is for fewer, surer cuts.

    Args:
        b1: Attention boundaries.
        b2: Similarity boundaries.
        tolerance: Largest ``|b2 - b1|`` accepted (default 3, the reference code's, and
            the best measured F1 of 0, 1, 3).
        fallback_to_b2: Return B2 when nothing is confirmed (default True, like the
            reference code); False returns an empty list instead.

    Returns:
        Sorted, de-duplicated boundaries.
    """
    kept = sorted({k for k in b2 if any(abs(k - j) <= tolerance for j in b1)})
    if not kept and fallback_to_b2:
        kept = sorted(set(b2))
    return kept


# --------------------------------------------------------------------------------------
# Model protocols and the MiniLM attention backend
# --------------------------------------------------------------------------------------


#: The encoder layers whose attention B1 averages by default: the first alone. Measured
#: (``lightmem bench segment --compressor minilm --b2-input turns --limit 200 --threads 2
#: --b1-layers ...``, 200 + 200 spliced buffers, P/R/F1 % exact match, other conversation |
#: other session): the reference's last four (3-6) B1 33/51/40 | 30/49/37 and B at tolerance
#: 3 70/68/69 | 62/55/58; layers 1-2 B1 F1 40 | 37, B 69 | 58; layer 1 alone B1 F1 39 | 36,
#: B 70/69/70 | 62/55/59. As good where it counts (B at the default tolerance), for one
#: layer's attention instead of a whole pass: B1's share of the sensory stage fell from ~0.6 s to
#: ~0.1 s per 200 turns (``lightmem bench pipeline``).
B1_LAYERS: tuple[int, ...] = (1,)


class SentenceAttention(Protocol):
    """Sentence-level attention: an n x n matrix M for n sentences (B1's input)."""

    def __call__(self, sentences: Sequence[str]) -> np.ndarray: ...


class MiniLMAttention:
    """:class:`SentenceAttention` from a BERT-style encoder's attention maps.

    The sentences are tokenised separately and concatenated between [CLS] and [SEP], so
    each token's sentence is exact. One pass of the encoder (packed, float32: see
    :class:`~lightmem.processors.packed_encoder.PackedEncoder`) up to the deepest layer
    asked for; the chosen layers and all heads are averaged into one L x L map A; the first
    and last ``mask_edge`` positions are masked (as queries and keys: they collect
    attention regardless of content). Then ``M[i, j]`` = mean over the tokens of s_i of
    their summed attention to the tokens of s_j, and each row is normalised to sum to 1.

    Args:
        model: A transformers BERT-style encoder (e.g. ``AutoModel``), float32.
        tokenizer: Its tokenizer.
        mask_edge: Positions masked at each end (default 3).
        layers: Which layers to average, 1 = the first (default :data:`B1_LAYERS`, the
            first layer alone; the reference implementation averages the last four,
            ``(3, 4, 5, 6)``). Only the layers up to the deepest one run.
        rows: ``"previous"`` normalises each row over the earlier sentences only (the
            reference implementation; M[i, j] = 0 for j >= i), ``"all"`` over every
            sentence, itself included (default ``"previous"``).
        max_positions: The encoder's window, special tokens included (default 512).

    Raises:
        ValueError: a model that is not a BERT-style encoder, a layer out of range.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        mask_edge: int = 3,
        *,
        layers: Sequence[int] = B1_LAYERS,
        rows: Literal["previous", "all"] = "previous",
        max_positions: int = 512,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        depth = int(getattr(getattr(model, "config", None), "num_hidden_layers", 6))
        self.layers = tuple(sorted({int(x) for x in layers}))
        if not self.layers or not all(1 <= x <= depth for x in self.layers):
            raise ValueError(f"attention layers {list(layers)}: the encoder has layers 1..{depth}")
        self.mask_edge = mask_edge
        self.rows = rows
        self.max_positions = max_positions

    @cached_property
    def packed(self) -> PackedEncoder:
        """The encoder's packed pass (built on first use: :meth:`encode_ids` needs only the
        tokenizer)."""
        from .packed_encoder import PackedEncoder

        return PackedEncoder(self.model)

    def encode_ids(self, sentences: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``[CLS] s_1 ... s_n [SEP]`` and each sentence's span in them.

        When the sentences exceed the window, the longest ones are trimmed (from their end)
        to a common cap, so every sentence keeps some tokens and a row in M.

        Args:
            sentences: The sentences, in order.

        Returns:
            ``(input_ids, spans)``; ``spans[i] = (start, end)`` positions of s_i.
        """
        per = [list(self.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
        room = self.max_positions - 2
        if sum(len(p) for p in per) > room:
            cap = _length_cap([len(p) for p in per], room)
            per = [p[:cap] for p in per]
        ids = [self.tokenizer.cls_token_id]
        spans = []
        for p in per:
            spans.append((len(ids), len(ids) + len(p)))
            ids.extend(p)
        ids.append(self.tokenizer.sep_token_id)
        return ids, spans

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        """The n x n sentence attention matrix M (rows sum to 1, or 0 for an empty row).

        Args:
            sentences: The sentences (B1 passes the exchanges' user texts).

        Returns:
            M as a float64 array.
        """
        if not sentences:
            return np.zeros((0, 0))
        ids, spans = self.encode_ids(sentences)
        att = self.packed.attention_map(ids, self.layers).numpy().astype(np.float64)
        return _sentence_matrix(att, spans, self.mask_edge, self.rows)

    def forward_pass(self, sentences: Sequence[str]) -> int:
        """Run the model work B1 needs over the same tokens (the attention map, not pooled
        into M), for benchmarks that compare the segmenter with the model's own cost.

        Args:
            sentences: The sentences.

        Returns:
            The number of token positions processed.
        """
        ids, _ = self.encode_ids(sentences)
        self.packed.attention_map(ids, self.layers)
        return len(ids)


def _length_cap(lengths: Sequence[int], room: int) -> int:
    """Largest per-sentence cap c with sum(min(len, c)) <= room (water-filling)."""
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _sentence_matrix(
    att: np.ndarray,
    spans: Sequence[tuple[int, int]],
    mask_edge: int,
    rows: Literal["previous", "all"],
) -> np.ndarray:
    """Pool a token attention map into the row-normalised sentence matrix M."""
    length = att.shape[0]
    valid = np.ones(length, dtype=bool)
    if length > 2 * mask_edge:  # masking everything would leave nothing to measure
        valid[:mask_edge] = False
        valid[length - mask_edge :] = False
    n = len(spans)
    # member[i, t] = 1 when token t belongs to sentence i and is not masked.
    member = np.zeros((n, length))
    for i, (start, end) in enumerate(spans):
        member[i, start:end] = valid[start:end]
    counts = member.sum(axis=1)
    summed = member @ att @ member.T  # [i, j] = sum over t in s_i of attention t -> s_j
    m = np.divide(summed, counts[:, None], out=np.zeros_like(summed), where=counts[:, None] > 0)
    if rows == "previous":
        m = np.tril(m, k=-1)
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


# --------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------


class TopicSegmenter:
    """Hybrid topic segmentation of a sensory buffer (B1 attention + B2 similarity).

    Args:
        attention: Sentence attention model for B1 (e.g. :class:`MiniLMAttention`).
        encode: Sentence encoder for B2, returning normalised rows.
        tolerance: Largest distance between a kept B2 boundary and a B1 boundary
            (default 3, measured: see :func:`combine_boundaries`; 0 = strict intersection).
        tau_start: First B2 threshold (default: :data:`B2_TAU_START` of ``b2_input``).
        tau_step: B2 threshold increment (default 0.05).
        tau_max: Last B2 threshold (default 0.5).
        extremum: Which local extremum of ``M[k, k-1]`` B1 reports (default ``"min"``;
            ``"max"`` is DESIGN.md's formula, measured worse: see
            :func:`attention_boundaries`).
        fallback_to_b2: Use B2 alone when no B2 boundary is confirmed by B1 (default True).
        b2_input: What B2 embeds (see :data:`B2Input`): ``"exchanges"`` (``encode`` gets
            each exchange's compressed text) or ``"turns"`` (``encode`` gets each turn's
            original text, e.g. :class:`~lightmem.processors.turn_embeddings.
            TurnEmbeddings`, which the ``minilm`` compressor's pass fills; an exchange is
            the normalised mean of its turns' rows).
    """

    def __init__(
        self,
        attention: SentenceAttention,
        encode: TextEncoder,
        tolerance: int = 3,
        tau_start: float | None = None,
        tau_step: float = 0.05,
        tau_max: float = 0.5,
        *,
        extremum: Literal["max", "min"] = "min",
        fallback_to_b2: bool = True,
        b2_input: B2Input = "exchanges",
    ) -> None:
        if b2_input not in B2_TAU_START:
            raise ValueError(f"b2_input: expected one of {list(B2_TAU_START)} (got {b2_input!r})")
        if tau_start is None:
            tau_start = B2_TAU_START[b2_input]
        if tolerance < 0:
            raise ValueError(f"tolerance: must be >= 0 (got {tolerance!r})")
        if tau_step <= 0:
            raise ValueError(f"tau_step: must be > 0 (got {tau_step!r})")
        self.attention = attention
        self.encode = encode
        self.tolerance = tolerance
        self.tau_start = tau_start
        self.tau_step = tau_step
        self.tau_max = tau_max
        self.extremum: Literal["max", "min"] = extremum
        self.fallback_to_b2 = fallback_to_b2
        self.b2_input: B2Input = b2_input

    def b1(self, units: Sequence[Exchange]) -> list[int]:
        """B1 boundaries over the exchanges' user texts (needs at least 4 exchanges)."""
        if len(units) < 4:
            return []  # a local extremum needs both neighbours: k in 2..n-2
        m = self.attention([u.user_text for u in units])
        return attention_boundaries(m, extremum=self.extremum)

    def embed(self, units: Sequence[Exchange]) -> np.ndarray:
        """B2's exchange embeddings (rows), as ``b2_input`` says."""
        if self.b2_input == "exchanges":
            return np.asarray(self.encode([u.text for u in units]))
        rows = np.asarray(
            self.encode([t.original_text for u in units for t in u.turns]), dtype=np.float64
        )
        out = np.empty((len(units), rows.shape[1]))
        at = 0
        for i, u in enumerate(units):
            out[i] = rows[at : at + len(u.turns)].mean(axis=0)
            at += len(u.turns)
        return out  # adjacent_similarity normalises the rows

    def b2(self, units: Sequence[Exchange]) -> list[int]:
        """B2 boundaries over the exchanges' embeddings (see :meth:`embed`)."""
        if len(units) < 2:
            return []
        sims = adjacent_similarity(self.embed(units))
        found, _ = similarity_boundaries(
            sims, tau_start=self.tau_start, tau_step=self.tau_step, tau_max=self.tau_max
        )
        return found

    def boundaries(self, units: Sequence[Exchange]) -> list[int]:
        """Combined boundaries (cut before exchange k), sorted.

        Args:
            units: The buffer's exchanges, in order.

        Returns:
            Boundaries in 1..n-1; empty when B2 finds nothing (all exchanges similar).
        """
        b2 = self.b2(units)
        if not b2:
            return []  # the combination only ever keeps B2 boundaries: skip B1's forward
        return combine_boundaries(
            self.b1(units), b2, tolerance=self.tolerance, fallback_to_b2=self.fallback_to_b2
        )

    def cut(
        self, state: SensoryBufferState, *, flush: bool
    ) -> tuple[list[Segment], SensoryBufferState]:
        """Cut the buffer at the topic boundaries into segments.

        Args:
            state: The buffer.
            flush: Also close the tail after the last boundary (closed_by ``"flush"``);
                otherwise it stays buffered for the next cut, which sees it with more
                context.

        Returns:
            The closed segments, in order, and the remaining buffer state.
        """
        if not state.turns:
            return [], state
        units = group_exchanges(state.turns)
        return cut_at(state, units, self.boundaries(units), flush=flush)


def cut_at(
    state: SensoryBufferState,
    units: Sequence[Exchange],
    boundaries: Sequence[int],
    *,
    flush: bool,
) -> tuple[list[Segment], SensoryBufferState]:
    """Cut ``state``'s exchanges before each boundary (no model involved).

    Args:
        state: The buffer the exchanges came from.
        units: ``group_exchanges(state.turns)``.
        boundaries: Sorted exchange indices in 1..len(units)-1.
        flush: Close the tail after the last boundary too (closed_by ``"flush"``).

    Returns:
        The closed segments and the remaining state (the tail, or empty when flushed).
    """
    edges = [0, *boundaries, len(units)]
    segments = [
        _segment(state, units[lo:hi], "boundary")
        for lo, hi in zip(edges[:-2], edges[1:-1], strict=True)
    ]
    tail = [t for u in units[edges[-2] :] for t in u.turns]
    if flush and tail:
        segments.append(_segment(state, units[edges[-2] :], "flush"))
        tail = []
    rest = state.model_copy(
        update={"turns": tail, "last_event_time": tail[-1].event_time if tail else None}
    )
    return segments, rest


def _segment(
    state: SensoryBufferState,
    units: Sequence[Exchange],
    closed_by: Literal["boundary", "flush"],
) -> Segment:
    turns = [t for u in units for t in u.turns]
    return Segment(
        tenant=state.tenant,
        user=state.user,
        conversation=state.conversation,
        session=state.session,
        segment_id=stable_id(state.conversation_key, turns[0].turn_id),
        turns=turns,
        closed_by=closed_by,
    )


def push(
    state: SensoryBufferState | None,
    event: TurnEvent,
    turn: SegmentTurn,
    *,
    buffer: SensoryBuffer,
    segmenter: TopicSegmenter,
    idle_timeout: timedelta | None = None,
) -> tuple[list[Segment], SensoryBufferState]:
    """One sensory step: flush if due, cut if ``turn`` would overflow, then buffer it.

    When a cut leaves a tail that still cannot take ``turn``, the tail is cut again on its
    own; a tail with no boundary at all is closed whole (as ``"flush"``), so the buffer
    always makes room and a conversation never stalls.

    Args:
        state: The conversation's buffer, or None for its first turn.
        event: The incoming turn (session, event time).
        turn: Its buffered form (see :func:`to_segment_turn`).
        buffer: The budget rule.
        segmenter: The topic segmenter.
        idle_timeout: Gap in event time that flushes the buffer (None = never).

    Returns:
        The segments closed by this step, in order, and the new state.
    """
    if state is None:
        state = SensoryBufferState.open(event)
    segments: list[Segment] = []
    if should_flush(state, next_turn=event, idle_timeout=idle_timeout) is not None:
        closed, state = segmenter.cut(state, flush=True)
        segments += closed
    while buffer.would_overflow(state, turn):
        before = len(state.turns)
        closed, state = segmenter.cut(state, flush=False)
        if len(state.turns) == before:  # no boundary: close the whole buffer as it is
            closed, state = cut_at(state, group_exchanges(state.turns), [], flush=True)
        segments += closed
    return segments, buffer.add(state, turn, session=event.session)
