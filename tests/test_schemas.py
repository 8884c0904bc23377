"""Event contracts: round trips, error messages that name every bad field, no schema drift."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
    check_event_time,
    parse_turn,
    render_schema,
    schema_file_name,
)

# Names and texts must hold a non-whitespace character (the contract refuses blank ones):
# no space separators (Zs, Zl, Zp) or controls in names; texts filtered.
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1,
    max_size=20,
)
aware = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(
    st.builds(
        TurnEvent,
        tenant=names, user=names, conversation=names, session=names, turn_id=names,
        role=st.sampled_from(["user", "assistant"]), speaker=names,
        text=st.text(min_size=1, max_size=200).filter(lambda t: t.strip() != ""),
        event_time=aware,
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
    letter = DeadLetter.from_raw(raw, step="parse", error=ValueError("bad"), source="f.jsonl",
                                 at=datetime.now(UTC), offset=3)
    assert base64.b64decode(letter.raw_b64) == raw
    assert letter.error_type == "ValueError" and letter.offset == 3


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_committed_schema_files_match_models(record: type) -> None:
    path = SCHEMA_DIR / schema_file_name(record)
    assert path.read_text() == render_schema(record), "run `lightmem schemas export`"


# -- strict contracts (issue 11, defect 4): what the published schema refuses, the models refuse

GOOD_TURN: dict = {
    "tenant": "acme", "user": "u1", "conversation": "c1", "session": "s1", "turn_id": "t1",
    "role": "user", "speaker": "Ann", "text": "I adopted a dog named Pepper.",
    "event_time": "2024-05-01T09:00:00Z",
}

#: (name, field, bad value, words the reason must contain): the fault run's four malformed
#: records that became memories, and the whitespace-only text that became nothing.
MALFORMED = [
    ("version-true", "schema_version", True, "valid integer"),
    ("time-number", "event_time", 1_700_000_000, "valid datetime"),
    ("time-digits", "event_time", "1700000000", "RFC 3339"),
    ("time-space", "event_time", "2024-05-01 09:00:00Z", "RFC 3339"),
    ("time-no-seconds", "event_time", "2024-05-01T09:00Z", "RFC 3339"),
    ("time-no-offset", "event_time", "2024-05-01T09:00:00", "timezone"),
    ("version-float", "schema_version", 1.0, "valid integer"),
    ("tenant-number", "tenant", 7, "valid string"),
    ("text-whitespace", "text", " \n\t ", "pattern"),
]


def _turn_json(**changes: object) -> bytes:
    return json.dumps({**GOOD_TURN, **changes}).encode()


@pytest.mark.parametrize(("field", "value", "words"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_turns_are_refused_naming_the_field_and_reason(
        field: str, value: object, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        TurnEvent.parse(_turn_json(**{field: value}))
    assert [f for f, _, _ in info.value.errors] == [field]
    assert words in str(info.value)
    # A dict payload meets the same rules as JSON bytes (no lax Python-mode detour).
    with pytest.raises(SchemaError):
        TurnEvent.parse({**GOOD_TURN, field: value})


@pytest.mark.parametrize("value", [
    "2024-05-01T09:00:00Z", "2024-05-01T09:00:00.123456Z", "2024-05-01T11:00:00+02:00",
    "2024-05-01t09:00:00z", "2024-05-01T09:00:00-05:30",
])
def test_rfc3339_times_are_accepted(value: str) -> None:
    assert TurnEvent.parse(_turn_json(event_time=value)).event_time.tzinfo is not None


@pytest.mark.parametrize("value", [
    "1700000000", "2024-05-01 09:00:00Z", "2024-05-01_09:00:00Z", "2024-05-01T09:00Z",
    "2024-05-01T09:00:00", "2024-05-01T09:00:00+0200", "2024-05-01T09:00:00,5Z", "2024-05-01",
    "2024-05-01T09:00:00Z ", "2024-05-01T09:00:00.Z",
])
def test_the_published_schema_and_the_model_refuse_the_same_times(value: str) -> None:
    # The schema file's own pattern (what a producer's validator applies, even one that
    # treats `format: date-time` as an annotation) and the model agree on every value.
    published = json.loads((SCHEMA_DIR / "turn_event.v1.json").read_text())
    prop = published["properties"]["event_time"]
    assert prop["format"] == "date-time"
    assert re.search(prop["pattern"], value) is None
    with pytest.raises(SchemaError) as info:
        TurnEvent.parse(_turn_json(event_time=value))
    assert [f for f, _, _ in info.value.errors] == ["event_time"]


def test_published_schema_pins_version_and_nonblank_text() -> None:
    published = json.loads((SCHEMA_DIR / "turn_event.v1.json").read_text())["properties"]
    assert published["schema_version"]["type"] == "integer"  # JSON `true` is not an integer
    assert published["schema_version"]["const"] == 1
    assert re.search(published["text"]["pattern"], " \n\t ") is None
    assert re.search(published["text"]["pattern"], " hi ") is not None


def test_python_construction_and_stored_dicts_still_work() -> None:
    # Strictness is for payloads; code that builds records and stores that read them back
    # (Elasticsearch `_source` dicts with ISO strings) keep working.
    turn = TurnEvent(**{**GOOD_TURN, "event_time": datetime(2024, 5, 1, 9, tzinfo=UTC)})
    assert TurnEvent.model_validate(json.loads(turn.to_json())) == turn
    assert TurnEvent.parse(turn.to_bytes()) == turn


def test_a_byte_order_mark_before_the_json_is_ignored() -> None:
    bom = b"\xef\xbb\xbf"
    assert TurnEvent.parse(bom + _turn_json()).turn_id == "t1"
    assert TurnEvent.parse((bom + _turn_json()).decode()).turn_id == "t1"


# -- every malformed example lands in the dead-letter path, with the field and the reason

NOW = datetime(2024, 5, 2, 9, 0, tzinfo=UTC)


def _stage_letters(payloads: list[bytes], clock_now: datetime = NOW) -> list[DeadLetter]:
    pytest.importorskip("confluent_kafka", reason="the stream extra is missing")
    from types import SimpleNamespace

    from lightmem.settings import Settings
    from lightmem.streams.ingest.stages import Inbound, SensoryStage
    from lightmem.streams.kafka.topics import Topics

    topics = Topics(prefix="t.")
    key = TurnEvent.parse(_turn_json()).conversation_key.encode()
    stage = SensoryStage(Settings(), SimpleNamespace(), topics, clock=lambda: clock_now,
                         sleep=lambda s: None)
    batch = [Inbound(topics.turns, 0, offset, key, value)
             for offset, value in enumerate(payloads)]
    result = stage.step(batch, {})
    return [DeadLetter.parse(o.value) for o in result.out if o.topic == topics.dlq]


def test_every_malformed_turn_is_dead_lettered_by_the_sensory_stage() -> None:
    payloads = [_turn_json(**{field: value}) for _, field, value, _ in MALFORMED]
    letters = _stage_letters(payloads)
    assert [(x.step, x.offset) for x in letters] == [("parse", i) for i in range(len(MALFORMED))]
    for letter, (_, field, _, words) in zip(letters, MALFORMED, strict=True):
        assert f"{field}:" in letter.reason and words in letter.reason
        assert letter.error_type == "SchemaError"


def _embedded(tmp_path: Path, clock_now: datetime = NOW, **settings: object):  # noqa: ANN202
    from lightmem.settings import load_settings
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    return EmbeddedRuntime(load_settings(data_dir=tmp_path, compressor="none", **settings),
                           clock=lambda: clock_now)


def test_every_malformed_turn_is_dead_lettered_by_the_embedded_ingest(tmp_path: Path) -> None:
    rt = _embedded(tmp_path)
    lines = [(i + 1, _turn_json(**{field: value}) + b"\n")
             for i, (_, field, value, _) in enumerate(MALFORMED)]
    report = rt.ingest_lines(lines, source="turns.jsonl", flush=False)
    assert [r.line for r in report.rejected] == [n for n, _ in lines]
    written = [DeadLetter.parse(line) for line in
               report.dead_letter_path.read_text().splitlines()]
    assert [x.offset for x in written] == [n for n, _ in lines]
    for letter, (_, field, _, words) in zip(written, MALFORMED, strict=True):
        assert f"{field}:" in letter.reason and words in letter.reason


# -- far-future event times (issue 11, defect 5): bounded against the receiver's clock

def test_check_event_time_bounds_the_future_only() -> None:
    turn = TurnEvent.parse(_turn_json(event_time="2024-05-02T09:10:00Z"))
    assert check_event_time(turn, now=NOW, max_future_s=600) is turn  # exactly at the bound
    assert check_event_time(turn, now=NOW + timedelta(days=365), max_future_s=1) is turn  # past
    with pytest.raises(SchemaError) as info:
        check_event_time(turn, now=NOW, max_future_s=599)
    assert info.value.errors[0][0] == "event_time"
    assert "max_event_time_skew_s=599" in str(info.value)
    with pytest.raises(SchemaError, match="event_time: more than"):
        parse_turn(_turn_json(event_time="2030-01-01T00:00:00Z"), now=NOW, max_future_s=600)


def test_default_skew_bound_stays_under_the_idle_timeout() -> None:
    from lightmem.settings import Settings

    # A producer clock ahead by less than the bound cannot idle-flush its neighbours by itself.
    settings = Settings()
    assert 0 < settings.max_event_time_skew_s < settings.idle_timeout_s


def test_far_future_turn_is_dead_lettered_by_the_sensory_stage() -> None:
    future = _turn_json(turn_id="t9", event_time="2024-05-03T09:00:00Z")  # NOW + 1 day
    letters = _stage_letters([future])
    assert len(letters) == 1 and letters[0].step == "parse"
    assert "event_time: more than max_event_time_skew_s=600" in letters[0].reason


def test_far_future_turn_is_dead_lettered_by_the_embedded_ingest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    applied: list[str] = []
    monkeypatch.setattr(EmbeddedRuntime, "_apply_batch",
                        lambda self, batch, report: applied.extend(t.turn_id for t in batch))
    rt = _embedded(tmp_path, max_event_time_skew_s=3600)
    report = rt.ingest_lines([
        (1, _turn_json(turn_id="now", event_time="2024-05-02T09:30:00Z")),    # +30 min: ok
        (2, _turn_json(turn_id="later", event_time="2024-05-02T11:00:00Z")),  # +2 h: refused
    ], source="turns.jsonl", flush=False)
    assert applied == ["now"]
    assert [r.line for r in report.rejected] == [2]
    assert "max_event_time_skew_s=3600" in report.rejected[0].reason


def test_embedded_ingest_accepts_a_byte_order_mark_on_the_first_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    applied: list[str] = []
    monkeypatch.setattr(EmbeddedRuntime, "_apply_batch",
                        lambda self, batch, report: applied.extend(t.turn_id for t in batch))
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _turn_json() + b"\n" + _turn_json(turn_id="t2") + b"\n")
    report = _embedded(tmp_path / "data").ingest_file(path, flush=False)
    assert not report.rejected and applied == ["t1", "t2"]
