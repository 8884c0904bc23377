"""Event contracts: round trips, error messages that name every bad field, no schema drift."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightmem.schemas import (
    RECORDS,
    SCHEMA_DIR,
    DeadLetter,
    MemoryEntry,
    SchemaError,
    TurnEvent,
    render_schema,
    schema_file_name,
)

names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=20
)
aware = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(
    st.builds(
        TurnEvent,
        tenant=names, user=names, conversation=names, session=names, turn_id=names,
        role=st.sampled_from(["user", "assistant"]), speaker=names,
        text=st.text(min_size=1, max_size=200), event_time=aware,
        metadata=st.none() | st.dictionaries(names, st.integers() | names, max_size=3),
    )
)
def test_turn_event_round_trips(turn: TurnEvent) -> None:
    assert TurnEvent.parse(turn.to_bytes()) == turn


@given(
    st.builds(
        MemoryEntry,
        id=names, tenant=names, user=names, conversation=names, topic_id=names, speaker=names,
        fact=st.text(max_size=100), event_time=aware, ingest_time=aware,
        source_turn_ids=st.lists(names, min_size=1, max_size=3),
        original_text=st.text(max_size=50), compressed_text=st.text(max_size=50),
        mode=st.sampled_from(["llm", "extractive"]), version=st.integers(1, 9),
        embedding=st.none() | st.lists(st.floats(-1, 1, width=32), min_size=2, max_size=4),
    )
)
def test_memory_entry_round_trips(entry: MemoryEntry) -> None:
    assert MemoryEntry.parse(entry.to_bytes()) == entry


def test_errors_name_every_bad_field() -> None:
    payload = {
        "tenant": "t", "user": "", "conversation": "c", "session": "s", "turn_id": "1",
        "role": "bot", "speaker": "x", "text": "hi", "event_time": "2024-01-01T00:00:00",
        "colour": "blue",
    }
    with pytest.raises(SchemaError) as info:
        TurnEvent.parse(json.dumps(payload))
    fields = {f for f, _, _ in info.value.errors}
    assert fields == {"user", "role", "event_time", "colour"}
    message = str(info.value)
    assert "role" in message and "'bot'" in message and "timezone" in message


def test_undecodable_bytes_are_a_schema_error() -> None:
    with pytest.raises(SchemaError) as info:
        TurnEvent.parse(b"\xff{not json")
    assert info.value.errors


def test_dead_letter_keeps_exact_bytes() -> None:
    import base64

    raw = b"\xff\x00 broken"
    letter = DeadLetter.from_raw(raw, stage="parse", error=ValueError("bad"), source="f.jsonl",
                                 at=datetime.now(UTC), offset=3)
    assert base64.b64decode(letter.raw_b64) == raw
    assert letter.error_type == "ValueError" and letter.offset == 3


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_committed_schema_files_match_models(record: type) -> None:
    path = SCHEMA_DIR / schema_file_name(record)
    assert path.read_text() == render_schema(record), "run `lightmem schemas export`"
