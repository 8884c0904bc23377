"""Topic buffer and summarization (extractive, and LLM mode against the HTTP stub)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lightmem.ops.bench.llm_stub import (
    OpenAIStubServer,
    StubReply,
    count_words,
    fact_extraction_responder,
    scripted_responder,
)
from lightmem.processors.llm import LLMTransientError
from lightmem.processors.summarize import (
    DEFAULT_MAX_TOKENS,
    Summarizer,
    TopicBuffer,
    TopicBufferState,
    build_extraction_messages,
    parse_facts,
)
from lightmem.schemas import EntryMode, Segment, SegmentTurn, stable_id
from lightmem.settings import Settings
from lightmem.streams.models.components import Components
from lightmem.streams.models.openai_chat import OpenAIChatModel

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
START = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)  # a Monday


def words(text: str) -> int:
    return len(text.split())


def segment(
    segment_id: str,
    texts: list[str],
    *,
    conversation: str = "conv-1",
    first_turn: int = 0,
    compressed: list[str] | None = None,
) -> Segment:
    """A segment whose turns alternate Caroline (user) and Melanie (assistant)."""
    turns = []
    for i, text in enumerate(texts):
        n = first_turn + i
        turns.append(
            SegmentTurn(
                turn_id=f"t{n}",
                role="user" if n % 2 == 0 else "assistant",
                speaker="Caroline" if n % 2 == 0 else "Melanie",
                event_time=START + timedelta(days=n),
                original_text=f"{text} (original)",
                compressed_text=compressed[i] if compressed else text,
            )
        )
    return Segment(
        tenant="acme",
        user="u1",
        conversation=conversation,
        session="s1",
        segment_id=segment_id,
        turns=turns,
        closed_by="boundary",
    )


# Two topics, five turns: prompt lines 0..2 in topic 1, 3..4 in topic 2.
SEG_A = segment("seg-a", ["I adopted a dog", "What is its name", "Her name is Luna"])
SEG_B = segment("seg-b", ["I start pottery classes", "Sounds fun"], first_turn=3)
ALL_TURNS = [*SEG_A.turns, *SEG_B.turns]


@pytest.fixture
def stub_chat() -> Iterator[tuple[OpenAIStubServer, OpenAIChatModel]]:
    with OpenAIStubServer(fact_extraction_responder) as server:
        yield server, OpenAIChatModel(server.base_url, "stub-model", "k", max_retries=0)


def chat_on(server: OpenAIStubServer) -> OpenAIChatModel:
    return OpenAIChatModel(server.base_url, "stub-model", "k", max_retries=0, timeout=5.0)


# -- topic buffer -------------------------------------------------------------------------


def four_words(segment_id: str, n: int) -> Segment:
    return segment(segment_id, ["one two three four"], first_turn=n)


def test_buffer_flushes_before_the_segment_that_would_exceed_the_threshold() -> None:
    buffer = TopicBuffer(words, threshold_tokens=10)
    state = TopicBufferState.for_segment(SEG_A)

    state, batches = buffer.push(state, four_words("s1", 0))
    assert batches == [] and buffer.tokens(state) == 4
    state, batches = buffer.push(state, four_words("s2", 1))
    assert batches == [] and buffer.tokens(state) == 8
    assert buffer.would_overflow(state, four_words("s3", 2))

    state, batches = buffer.push(state, four_words("s3", 2))
    assert [[s.segment_id for s in b] for b in batches] == [["s1", "s2"]]
    assert [s.segment_id for s in state.segments] == ["s3"]


def test_buffer_flushes_at_once_when_full_and_never_overflows_when_empty() -> None:
    buffer = TopicBuffer(words, threshold_tokens=8)
    state = TopicBufferState.for_segment(SEG_A)
    state, _ = buffer.push(state, four_words("s1", 0))
    # Exactly th tokens: any next segment would exceed it, so flush now.
    state, batches = buffer.push(state, four_words("s2", 1))
    assert [[s.segment_id for s in b] for b in batches] == [["s1", "s2"]]
    assert state.is_empty

    big = segment("big", ["w " * 20], first_turn=2)
    assert not buffer.would_overflow(state, big)  # an empty buffer takes anything
    state, _ = buffer.push(state, four_words("s3", 3))
    state, batches = buffer.push(state, big)
    # The buffered segment goes first, then the oversized one in a call of its own.
    assert [[s.segment_id for s in b] for b in batches] == [["s3"], ["big"]]
    assert state.is_empty


def test_buffer_counts_compressed_text_and_ignores_redelivered_segments() -> None:
    buffer = TopicBuffer(words, threshold_tokens=100)
    seg = segment("s1", ["a b c d e f g h"], compressed=["a c e"])
    assert buffer.segment_tokens(seg) == 3

    state = buffer.add(TopicBufferState.for_segment(seg), seg)
    assert buffer.add(state, seg) == state
    assert buffer.push(state, seg) == (state, [])


def test_buffer_drain_and_json_round_trip() -> None:
    buffer = TopicBuffer(words)
    state = buffer.add(buffer.add(TopicBufferState.for_segment(SEG_A), SEG_A), SEG_B)
    restored = TopicBufferState.model_validate_json(state.model_dump_json())
    assert restored == state

    drained, empty = buffer.drain(restored)
    assert [s.segment_id for s in drained] == ["seg-a", "seg-b"]
    assert empty.is_empty and empty.conversation == "conv-1"


def test_buffer_rejects_another_conversations_segment() -> None:
    buffer = TopicBuffer(words)
    state = TopicBufferState.for_segment(SEG_A)
    other = segment("x", ["hello"], conversation="conv-2")
    with pytest.raises(ValueError, match="conversation: segment 'x' has 'conv-2'"):
        buffer.add(state, other)
    with pytest.raises(ValueError, match="threshold_tokens"):
        TopicBuffer(words, threshold_tokens=0)


# -- extractive mode ------------------------------------------------------------------------


def test_extractive_mode_gives_one_entry_per_turn_tagged_with_its_topic() -> None:
    result = Summarizer(None).summarize([SEG_A, SEG_B], now=NOW)

    assert result.dead_letter is None and result.llm_calls == 0
    assert len(result.entries) == 5
    for entry, turn, topic in zip(
        result.entries, ALL_TURNS, ["seg-a"] * 3 + ["seg-b"] * 2, strict=True
    ):
        assert entry.mode is EntryMode.extractive
        assert entry.fact == f"{turn.speaker}: {turn.compressed_text}"
        assert entry.topic_id == topic
        assert entry.source_turn_ids == [turn.turn_id]
        assert entry.event_time == turn.event_time
        assert entry.original_text == turn.original_text
        assert entry.ingest_time == NOW
        assert (entry.tenant, entry.user, entry.conversation) == ("acme", "u1", "conv-1")
    assert {e.speaker for e in result.entries} == {"Caroline", "Melanie"}  # both roles
    assert len({e.id for e in result.entries}) == 5


def test_summarize_rejects_mixed_conversations_and_accepts_nothing() -> None:
    other = segment("x", ["hello"], conversation="conv-2")
    with pytest.raises(ValueError, match=r"segments\[1\]\.conversation"):
        Summarizer(None).summarize([SEG_A, other], now=NOW)
    assert Summarizer(None).summarize([], now=NOW).entries == []


# -- prompt and parsing ----------------------------------------------------------------------


def test_prompt_has_one_block_per_topic_and_global_line_numbers() -> None:
    system, user = build_extraction_messages([SEG_A, SEG_B])
    assert system.role == "system" and '{"data": [{"source_id"' in system.content
    assert user.content.splitlines() == [
        "--- Topic 1 ---",
        "[2023-05-08 13:56+00:00, Monday] 0.Caroline: I adopted a dog",
        "[2023-05-09 13:56+00:00, Tuesday] 1.Melanie: What is its name",
        "[2023-05-10 13:56+00:00, Wednesday] 2.Caroline: Her name is Luna",
        "--- Topic 2 ---",
        "[2023-05-11 13:56+00:00, Thursday] 3.Melanie: I start pottery classes",
        "[2023-05-12 13:56+00:00, Friday] 4.Caroline: Sounds fun",
    ]


@pytest.mark.parametrize(
    "text",
    [
        '{"data": [{"source_id": 2, "fact": "Luna is a dog."}]}',
        '```json\n{"data": [{"source_id": 2, "fact": "Luna is a dog."}]}\n```',
        'Here you go:\n{"data": [{"source_id": "2", "fact": "Luna is a dog."}]}\nHope it helps',
        '{"source_id": 2, "fact": "Luna is a dog."}',
        '[{"source_id": [2], "fact": " Luna is a dog. "}]',
        '{"facts": {"source_id": 2.0, "fact": "Luna is a dog."}}',
        'Facts [from line 2]: {"data": [{"source_id": 2, "fact": "Luna is a dog."}]} [end]',
    ],
)
def test_parse_facts_accepts_the_usual_shapes(text: str) -> None:
    facts, malformed = parse_facts(text)
    assert [(f.source_id, f.fact) for f in facts] == [(2, "Luna is a dog.")]
    assert malformed == []


def test_parse_facts_reports_malformed_items_and_rejects_non_json() -> None:
    facts, malformed = parse_facts(
        '{"data": [{"source_id": 1, "fact": "ok"}, {"fact": "no id"}, 7, {"source_id": true,'
        ' "fact": ""}]}'
    )
    assert [f.source_id for f in facts] == [1]
    assert len(malformed) == 3 and "data[1]" in malformed[0]
    bad_outputs = [
        "no json here",
        '"just a string"',
        '{"answer": 1}',
        '{"data": null}',
        '[1] 0.Caroline: said things',  # JSON-looking, but no item is a fact
    ]
    for bad in bad_outputs:
        with pytest.raises(ValueError):
            parse_facts(bad)


# -- LLM mode over HTTP ----------------------------------------------------------------------


def test_llm_mode_maps_facts_to_their_turns_in_one_call(
    stub_chat: tuple[OpenAIStubServer, OpenAIChatModel],
) -> None:
    server, chat = stub_chat
    result = Summarizer(chat).summarize([SEG_A, SEG_B], now=NOW)

    assert result.dead_letter is None and result.dropped == [] and not result.repaired
    assert result.llm_calls == 1 and len(server.chat_requests) == 1
    assert server.chat_requests[0]["response_format"] == {"type": "json_object"}
    assert len(result.entries) == 5
    for entry, turn in zip(result.entries, ALL_TURNS, strict=True):
        assert entry.mode is EntryMode.llm
        assert entry.fact == f"{turn.speaker} said: {turn.compressed_text}"
        assert entry.source_turn_ids == [turn.turn_id]
        assert entry.event_time == turn.event_time
        assert entry.speaker == turn.speaker
        assert entry.original_text == turn.original_text
        assert entry.compressed_text == turn.compressed_text
        assert entry.ingest_time == NOW
    assert [e.topic_id for e in result.entries] == ["seg-a"] * 3 + ["seg-b"] * 2
    usage = chat.meter.by_key()[("summarize", "acme")]
    assert usage.calls == 1 and usage.prompt_tokens > 0 and usage.completion_tokens > 0


def test_unknown_source_ids_drop_only_that_fact() -> None:
    answer = {
        "data": [
            {"source_id": 0, "fact": "Caroline adopted a dog."},
            {"source_id": 99, "fact": "Invented."},
            {"fact": "No source."},
            {"source_id": 0, "fact": "The dog is new."},
        ]
    }
    with OpenAIStubServer(lambda request: json.dumps(answer)) as server:
        result = Summarizer(chat_on(server)).summarize([SEG_A], now=NOW)

    assert result.dead_letter is None
    assert [e.fact for e in result.entries] == ["Caroline adopted a dog.", "The dog is new."]
    assert result.unknown_source_ids == [99]
    assert len(result.dropped) == 2
    # Two facts from one turn get distinct ids (k-th fact of that turn).
    assert len({e.id for e in result.entries}) == 2


def test_invalid_json_is_repaired_with_one_more_call() -> None:
    broken = 'Sure! {"data": [{"source_id": 0, "fact": "unterminated'
    script = scripted_responder([broken, fact_extraction_responder])
    with OpenAIStubServer(script) as server:
        result = Summarizer(chat_on(server)).summarize([SEG_A], now=NOW)

    assert result.dead_letter is None and result.repaired and result.llm_calls == 2
    assert [e.source_turn_ids for e in result.entries] == [["t0"], ["t1"], ["t2"]]
    repair = server.chat_requests[1]["messages"]
    # The repair shows the model its own output and asks for JSON only.
    assert repair[-2] == {"role": "assistant", "content": broken}
    assert repair[-1]["role"] == "user" and "not the JSON" in repair[-1]["content"]


def test_invalid_json_twice_becomes_a_dead_letter_with_the_raw_output() -> None:
    script = scripted_responder(["I cannot do JSON, sorry.", "Still no JSON."])
    with OpenAIStubServer(script) as server:
        result = Summarizer(chat_on(server)).summarize([SEG_A, SEG_B], now=NOW)

    assert result.entries == [] and result.llm_calls == 2
    assert len(server.chat_requests) == 2
    letter = result.dead_letter
    assert letter is not None
    assert (letter.step, letter.source, letter.error_type) == (
        "summarize",
        "summarizer",
        "FactParseError",
    )
    assert "after one repair retry" in letter.reason and "seg-a" in letter.reason
    assert letter.at == NOW
    raw: dict[str, Any] = json.loads(letter.raw)
    assert raw["segment_ids"] == ["seg-a", "seg-b"]
    assert raw["model_outputs"] == ["I cannot do JSON, sorry.", "Still no JSON."]
    # The segments travel along: the dead letter alone is enough to replay the flush.
    assert [Segment.parse(s) for s in raw["segments"]] == [SEG_A, SEG_B]


def test_permanent_llm_error_becomes_a_dead_letter() -> None:
    reply = StubReply(status=400, content="context length exceeded")
    with OpenAIStubServer(lambda request: reply) as server:
        result = Summarizer(chat_on(server)).summarize([SEG_A], now=NOW)
    assert result.entries == []
    assert result.dead_letter is not None
    assert result.dead_letter.error_type == "LLMPermanentError"
    assert "context length exceeded" in result.dead_letter.reason
    assert json.loads(result.dead_letter.raw)["model_outputs"] == []


def test_transient_llm_error_is_raised_for_the_runtime_to_retry() -> None:
    with OpenAIStubServer(lambda request: StubReply(status=503, content="busy")) as server:
        with pytest.raises(LLMTransientError):
            Summarizer(chat_on(server)).summarize([SEG_A], now=NOW)


def test_ids_are_deterministic_across_reprocessing(
    stub_chat: tuple[OpenAIStubServer, OpenAIChatModel],
) -> None:
    _, chat = stub_chat
    first = Summarizer(chat).summarize([SEG_A, SEG_B], now=NOW)
    again = Summarizer(chat).summarize([SEG_A, SEG_B], now=NOW + timedelta(hours=1))
    assert [e.id for e in first.entries] == [e.id for e in again.entries]
    assert first.entries[0].id == stable_id(SEG_A.scope, "seg-a", "t0", "llm", 0)

    extractive = Summarizer(None).summarize([SEG_A, SEG_B], now=NOW)
    assert [e.id for e in extractive.entries] == [
        e.id for e in Summarizer(None).summarize([SEG_A, SEG_B], now=NOW).entries
    ]
    # Extractive and LLM entries of the same turn never overwrite each other.
    assert not {e.id for e in extractive.entries} & {e.id for e in first.entries}


def test_exactly_one_llm_call_per_buffer_flush(
    stub_chat: tuple[OpenAIStubServer, OpenAIChatModel],
) -> None:
    server, chat = stub_chat
    buffer = TopicBuffer(words, threshold_tokens=10)
    summarizer = Summarizer(chat)
    state = TopicBufferState.for_segment(SEG_A)
    batches: list[list[Segment]] = []
    for n in range(7):  # 4 words each: flushes after every 2 segments
        state, flushed = buffer.push(state, four_words(f"s{n}", n))
        batches.extend(flushed)
    rest, state = buffer.drain(state)
    batches.append(rest)

    entries = [e for b in batches for e in summarizer.summarize(b, now=NOW).entries]
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    assert len(server.chat_requests) == len(batches) == 4
    assert [e.source_turn_ids[0] for e in entries] == [f"t{n}" for n in range(7)]


# -- output cap: a cut answer is split, not dead-lettered --------------------------------------


def topic(k: int, lines: int = 3) -> Segment:
    """Topic k: ``lines`` turns of four words each, turn numbers following on."""
    first = k * lines
    texts = [f"fact number {n} here" for n in range(first, first + lines)]
    return segment(f"topic-{k}", texts, first_turn=first)


@pytest.mark.parametrize(
    ("cap", "calls", "splits"),
    [
        (30, 5, 2),  # topics split: [0] | [1, 2], then [1] | [2]
        (20, 11, 5),  # and every topic's lines split as well
    ],
)
def test_a_buffer_whose_facts_exceed_the_cap_gives_every_fact_in_more_calls(
    cap: int, calls: int, splits: int
) -> None:
    # A full topic buffer (th = 40 words: three 12-word topics, the fourth overflows it)
    # whose one-fact-per-line answer (~82 stub tokens) cannot fit the cap.
    buffer = TopicBuffer(words, threshold_tokens=40)
    state = TopicBufferState.for_segment(topic(0))
    flushed: list[list[Segment]] = []
    for k in range(4):
        state, batches = buffer.push(state, topic(k))
        flushed.extend(batches)
    assert [[s.segment_id for s in b] for b in flushed] == [["topic-0", "topic-1", "topic-2"]]
    (batch,) = flushed

    with OpenAIStubServer(fact_extraction_responder) as server:
        reference = Summarizer(chat_on(server)).summarize(batch, now=NOW)
        assert reference.llm_calls == 1 and reference.splits == 0
        whole_answer = fact_extraction_responder(server.chat_requests[0])
        assert count_words(whole_answer) > cap
        server.requests.clear()

        chat = chat_on(server)
        result = Summarizer(chat, max_tokens=cap).summarize(batch, now=NOW)
        requests = server.chat_requests

    # Every fact, nothing dead-lettered, the same ids as one uncut answer.
    assert result.dead_letter is None and result.dropped == []
    assert [(e.id, e.fact) for e in result.entries] == [
        (e.id, e.fact) for e in reference.entries
    ]
    assert len(result.entries) == 9
    assert (result.llm_calls, result.splits) == (calls, splits)
    assert len(requests) == calls and all(r["max_tokens"] == cap for r in requests)
    # Every call is metered, the cut ones with the tokens they cost.
    usage = chat.meter.by_key()[("summarize", "acme")]
    assert (usage.calls, usage.errors) == (calls, 0)
    cost = [min(cap, count_words(fact_extraction_responder(r))) for r in requests]
    assert usage.completion_tokens == sum(cost)
    assert sum(c == cap for c in cost) == splits  # each split follows one cut answer


def test_lines_whose_answer_alone_exceeds_the_cap_are_dead_lettered_and_the_rest_stands() -> None:
    long_1 = " ".join(f"alpha{n}" for n in range(30))
    long_2 = " ".join(f"omega{n}" for n in range(30))
    seg = segment("seg-long", [long_1, "I adopted a dog", long_2])
    with OpenAIStubServer(fact_extraction_responder) as server:
        result = Summarizer(chat_on(server), max_tokens=20).summarize([seg], now=NOW)
        requests = len(server.chat_requests)

    # Lines [0, 1] | [2]; [0, 1] is cut again -> [0] | [1]; lines 0 and 2 cannot shrink.
    assert [e.source_turn_ids for e in result.entries] == [["t1"]]
    assert result.entries[0].fact == "Melanie said: I adopted a dog"
    assert (result.llm_calls, result.splits) == (5, 2) and requests == 5
    letter = result.dead_letter
    assert letter is not None and letter.error_type == "SummaryTruncatedError"
    assert "'t0'" in letter.reason and "'t2'" in letter.reason
    assert "max_tokens=20" in letter.reason and "summary_max_tokens" in letter.reason
    raw: dict[str, Any] = json.loads(letter.raw)
    # One segment carrying exactly the failed lines, so a replay buffers it once.
    assert raw["segment_ids"] == ["seg-long"]
    (carried,) = [Segment.parse(s) for s in raw["segments"]]
    assert [t.turn_id for t in carried.turns] == ["t0", "t2"]
    assert len(raw["model_outputs"]) == 2
    assert all(count_words(o) == 20 for o in raw["model_outputs"])


def test_a_repair_answer_cut_at_the_cap_splits_too() -> None:
    cut = StubReply(content='{"data": [{"source_id": 0, "fact": "Caro', finish_reason="length")
    script = scripted_responder(["I cannot do JSON, sorry.", cut, fact_extraction_responder])
    with OpenAIStubServer(script) as server:
        result = Summarizer(chat_on(server)).summarize([SEG_A, SEG_B], now=NOW)
        requests = server.chat_requests

    assert result.dead_letter is None and len(result.entries) == 5
    assert (result.llm_calls, result.splits, len(requests)) == (4, 1, 4)
    # After the split: topic 1 alone, then topic 2 alone (its lines renumbered from 0).
    assert [r["messages"][-1]["content"].count("--- Topic") for r in requests[2:]] == [1, 1]
    assert [e.source_turn_ids[0] for e in result.entries] == [t.turn_id for t in ALL_TURNS]


def test_the_output_cap_is_a_setting_sized_to_th(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTMEM_SUMMARY_MAX_TOKENS", raising=False)
    monkeypatch.delenv("LIGHTMEM_TOPIC_BUFFER_TOKENS", raising=False)
    # th = 512 by default: the old fixed 1,024 was cut by a one-fact-per-line answer.
    assert Settings().summary_token_cap == DEFAULT_MAX_TOKENS == 2048
    assert Settings(topic_buffer_tokens=1024).summary_token_cap == 4096
    monkeypatch.setenv("LIGHTMEM_SUMMARY_MAX_TOKENS", "3000")
    settings = Settings(topic_buffer_tokens=1024)
    assert settings.summary_token_cap == 3000
    with OpenAIStubServer(fact_extraction_responder) as server:
        summarizer = Components(settings, chat=chat_on(server)).summarizer
        summarizer.summarize([SEG_A], now=NOW)
        assert server.chat_requests[0]["max_tokens"] == 3000
    with pytest.raises(ValueError, match="max_tokens"):
        Summarizer(None, max_tokens=0)
