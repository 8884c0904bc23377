"""Sleep windows, cron, auto mode, control commands and the sleep-time work plan: no servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_update import FakeChat, InMemoryStore, entry, fake_embed
from typer.testing import CliRunner

from lightmem.ops.bench.sleep import consolidation_responder
from lightmem.ops.cli import app as cli_app
from lightmem.processors.consolidate import consolidate_pending, schedule_targets, unreflected
from lightmem.processors.sleep_windows import (
    AutoWindow,
    CommandError,
    CronError,
    CronSchedule,
    WindowScope,
    WindowState,
    command_key,
    parse_command,
    parse_duration,
)
from lightmem.processors.update import Consolidator
from lightmem.schemas import SchemaError, SleepAction, SleepWindowCommand
from lightmem.streams.sleep.windows import new_command

T = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)  # a Monday


def cmd(action: str, at: datetime, *, tenant: str | None = None, **kw: object
        ) -> SleepWindowCommand:
    return new_command(action, tenant=tenant, now=at, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cron


def test_cron_matches_minutes_hours_steps_and_weekdays() -> None:
    nightly = CronSchedule.parse("30 2 * * *")
    assert nightly.matches(datetime(2024, 5, 6, 2, 30, tzinfo=UTC))
    assert not nightly.matches(datetime(2024, 5, 6, 2, 31, tzinfo=UTC))
    every15 = CronSchedule.parse("*/15 * * * *")
    assert [m for m in range(60) if every15.matches(T.replace(minute=m))] == [0, 15, 30, 45]
    weekdays = CronSchedule.parse("0 1 * * 1-5")
    assert weekdays.matches(datetime(2024, 5, 6, 1, 0, tzinfo=UTC))  # Monday
    assert not weekdays.matches(datetime(2024, 5, 5, 1, 0, tzinfo=UTC))  # Sunday
    sunday = CronSchedule.parse("0 1 * * 7")
    assert sunday.matches(datetime(2024, 5, 5, 1, 0, tzinfo=UTC))


def test_cron_day_fields_combine_with_or_when_both_are_restricted() -> None:
    c = CronSchedule.parse("0 0 1 * 1")  # the 1st of the month OR any Monday
    assert c.matches(datetime(2024, 5, 1, 0, 0, tzinfo=UTC))  # Wednesday the 1st
    assert c.matches(datetime(2024, 5, 6, 0, 0, tzinfo=UTC))  # Monday the 6th
    assert not c.matches(datetime(2024, 5, 7, 0, 0, tzinfo=UTC))


def test_cron_last_fire_looks_back_only_within_the_window() -> None:
    c = CronSchedule.parse("0 2 * * *")
    at = datetime(2024, 5, 6, 2, 45, 30, tzinfo=UTC)
    assert c.last_fire(at, timedelta(hours=1)) == datetime(2024, 5, 6, 2, 0, tzinfo=UTC)
    assert c.last_fire(at, timedelta(minutes=30)) is None


@pytest.mark.parametrize(("expr", "message"), [
    ("* * * *", "needs 5 fields"),
    ("60 * * * *", "cron minute: '60'"),
    ("* 24 * * *", "cron hour"),
    ("* * 0 * *", "cron day-of-month"),
    ("* * * 13 *", "cron month"),
    ("* * * * moon", "cron day-of-week"),
    ("*/0 * * * *", "cron minute: '*/0'"),
])
def test_cron_errors_name_the_field(expr: str, message: str) -> None:
    with pytest.raises(CronError, match=message.replace("*", r"\*")):
        CronSchedule.parse(expr)


def test_cron_accepts_day_and_month_names() -> None:
    c = CronSchedule.parse("0 1 * jan-dec mon-fri")
    assert c.matches(datetime(2024, 5, 6, 1, 0, tzinfo=UTC))  # Monday
    assert not c.matches(datetime(2024, 5, 5, 1, 0, tzinfo=UTC))  # Sunday


# --------------------------------------------------------------------------- commands


def test_commands_are_validated_per_action_with_every_reason() -> None:
    bad = SleepWindowCommand(command_id="c", action=SleepAction.close, cron="* * * * *",
                             duration_s=60, issued_at=T)
    with pytest.raises(CommandError) as info:
        parse_command(bad.to_bytes())
    assert [f for f, _, _ in info.value.errors] == ["cron", "duration_s"]
    assert "a close takes no cron (got '* * * * *')" in str(info.value)
    with pytest.raises(CommandError, match="until: must be after issued_at"):
        cmd("open", T, until=T - timedelta(minutes=1))
    with pytest.raises(CommandError, match="duration_s: required with cron"):
        cmd("schedule", T, cron="0 2 * * *")
    with pytest.raises(CommandError, match="cron minute"):
        cmd("schedule", T, cron="99 2 * * *", duration_s=60)
    with pytest.raises(SchemaError, match="action"):
        parse_command(json.dumps({"command_id": "c", "action": "snooze",
                                  "issued_at": T.isoformat()}))
    with pytest.raises(SchemaError, match="issued_at"):
        parse_command(b'{"command_id": "c", "action": "open"}')


def test_command_keys_compact_per_kind_and_tenant() -> None:
    assert command_key(cmd("open", T)) == "window/*"
    assert command_key(cmd("close", T, tenant="acme")) == "window/acme"
    assert command_key(cmd("schedule", T, cron="0 2 * * *", duration_s=60)) == "schedule/*"


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200),
                                               ("1h30m", 5400), ("1d", 86400), ("600", 600)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0", "0m", "banana", "30x", "m30", "1h 30"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_cli_rejects_malformed_commands_before_sending() -> None:
    # Usage errors exit 2 with the reason; no Kafka is needed to get there.
    runner = CliRunner()
    result = runner.invoke(cli_app, ["sleep", "open", "--for", "banana"])
    assert result.exit_code == 2
    assert "duration" in result.output
    result = runner.invoke(cli_app, ["sleep", "schedule", "61 2 * * *", "--for", "1h"])
    assert result.exit_code == 2
    assert "cron minute: '61' is not valid" in result.output
    result = runner.invoke(cli_app, ["sleep", "schedule"])
    assert result.exit_code == 2


# --------------------------------------------------------------------------- window state


def test_manual_open_until_and_close() -> None:
    s = WindowState()
    assert not s.is_open(None, T)
    s.apply(cmd("open", T, until=T + timedelta(minutes=30)))
    assert s.is_open("acme", T + timedelta(minutes=10))
    assert not s.is_open("acme", T + timedelta(minutes=30))  # expired by itself
    s.apply(cmd("open", T + timedelta(hours=1)))
    assert s.is_open("acme", T + timedelta(days=3))  # no until: open until closed
    s.apply(cmd("close", T + timedelta(days=3, seconds=1)))
    assert not s.is_open("acme", T + timedelta(days=3, seconds=2))


def test_tenant_windows_override_and_global_commands_reset() -> None:
    s = WindowState()
    s.apply(cmd("open", T, tenant="acme"))
    assert s.scope(T) == WindowScope(False, frozenset({"acme"}))
    assert s.scope(T).allows("acme") and not s.scope(T).allows("other")
    s.apply(cmd("open", T + timedelta(minutes=1)))
    s.apply(cmd("close", T + timedelta(minutes=2), tenant="noisy"))
    scope = s.scope(T + timedelta(minutes=3))
    assert scope.allows("acme") and scope.allows("x") and not scope.allows("noisy")
    s.apply(cmd("close", T + timedelta(minutes=4)))  # closes everyone, overrides reset
    assert not s.scope(T + timedelta(minutes=5)).anything


def test_close_ends_the_scheduled_window_in_progress_not_the_next() -> None:
    s = WindowState(config_cron=CronSchedule.parse("0 2 * * *"),
                    config_duration=timedelta(hours=2))
    night = datetime(2024, 5, 6, 2, 0, tzinfo=UTC)
    assert not s.is_open(None, night - timedelta(minutes=1))
    assert s.is_open(None, night + timedelta(minutes=30))
    assert not s.is_open(None, night + timedelta(hours=2))
    s.apply(cmd("close", night + timedelta(minutes=40)))
    assert not s.is_open(None, night + timedelta(minutes=41))
    assert s.is_open(None, night + timedelta(days=1, minutes=1))


def test_schedule_commands_set_and_clear_per_tenant() -> None:
    s = WindowState()
    s.apply(cmd("schedule", T, tenant="acme", cron="0 3 * * *", duration_s=3600))
    at = datetime(2024, 5, 7, 3, 30, tzinfo=UTC)
    assert s.scope(at) == WindowScope(False, frozenset({"acme"}))
    s.apply(cmd("schedule", T + timedelta(minutes=1), tenant="acme"))  # cleared
    assert not s.scope(at).anything


_ACTIONS = st.sampled_from(["open", "close", "schedule"])
_TENANTS = st.sampled_from([None, "a", "b"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_ACTIONS, _TENANTS, st.integers(0, 500)), max_size=12),
       st.integers(0, 600))
def test_compaction_never_changes_the_state(
    log: list[tuple[str, str | None, int]], probe: int
) -> None:
    """Folding only the latest command per key (what a compacted topic keeps) gives the same
    scope as folding the whole log."""
    commands = []
    for i, (action, tenant, minutes) in enumerate(log):
        at = T + timedelta(minutes=i)
        kw: dict[str, object] = {}
        if action == "open" and minutes % 3 == 0:
            kw["until"] = at + timedelta(minutes=minutes + 1)
        if action == "schedule" and minutes % 2 == 0:
            kw = {"cron": f"{minutes % 60} * * * *", "duration_s": 60 * (1 + minutes % 90)}
        commands.append(cmd(action, at, tenant=tenant, **kw))
    latest = {command_key(c): c for c in commands}
    compacted = [c for c in commands if latest[command_key(c)] is c]
    full, kept = WindowState(), WindowState()
    for c in commands:
        full.apply(c)
    for c in compacted:
        kept.apply(c)
    now = T + timedelta(minutes=probe)
    assert full.scope(now) == kept.scope(now)


def test_auto_window_opens_after_quiet_and_closes_on_traffic() -> None:
    auto = AutoWindow(max_rate=1.0, quiet=timedelta(minutes=5))
    s = WindowState(auto=auto)
    auto.observe(T, 1000)
    auto.observe(T + timedelta(minutes=1), 1000 + 600)  # 10/s: busy
    assert not s.is_open(None, T + timedelta(minutes=1))
    auto.observe(T + timedelta(minutes=2), 1600 + 30)  # 0.5/s: quiet since minute 1
    assert not s.is_open(None, T + timedelta(minutes=5))
    auto.observe(T + timedelta(minutes=6), 1640)
    assert s.is_open(None, T + timedelta(minutes=6))
    auto.observe(T + timedelta(minutes=7), 1640 + 600)  # traffic is back
    assert not s.is_open(None, T + timedelta(minutes=7))
    assert "busy" in auto.describe(T + timedelta(minutes=7))


# --------------------------------------------------------------------------- work plan


def test_schedule_targets_waits_for_the_older_readers() -> None:
    # t0 is older than t1; t1 is a target too and one of t0's newer entries: t0 reads t1,
    # so t1 waits for t0 (the order of a sequential, oldest-first run).
    work = schedule_targets({"t0": [("t1", 0.9), ("e", 0.85)], "t1": [("e", 0.9)],
                             "x": [("y", 0.95)]})
    by_id = {w.target_id: w for w in work}
    assert by_id["t0"].after == frozenset()
    assert by_id["t1"].after == frozenset({"t0"})
    assert by_id["x"].after == frozenset() and by_id["x"].newer_ids == ("y",)


def test_unreflected_drops_entries_already_merged() -> None:
    target = entry("t", sources=["turn-t", "turn-n1"])
    n1 = entry("n1", when=target.event_time + timedelta(days=1))
    n2 = entry("n2", when=target.event_time + timedelta(days=2))
    assert unreflected(target, [n1, n2]) == [n2]


def test_consolidate_pending_never_applies_a_replayed_update_twice() -> None:
    older = entry("t", "Caroline likes tea", embedding=[1.0, 0.0])
    newer = entry("n", "Caroline also likes green tea", older.event_time + timedelta(days=1),
                  embedding=[0.99, 0.1])
    store = InMemoryStore([older, newer])
    chat = FakeChat(json.dumps({"action": "update", "new_fact": "Caroline likes tea, green "
                                "tea too"}))
    consolidator = Consolidator(chat)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    first = consolidate_pending(store, consolidator, fake_embed, "t", ["n"], now)
    assert first.change is not None and store.entries["t"].version == 2
    # The same entry replayed (a worker killed before its commit): no call, no change.
    again = consolidate_pending(store, consolidator, fake_embed, "t", ["n"], now)
    assert again.change is None and again.skipped == "reflected"
    assert len(chat.calls) == 1 and store.entries["t"].version == 2
    store.delete("t", expected_version=2)
    assert consolidate_pending(store, consolidator, fake_embed, "t", ["n"], now).skipped \
        == "gone"


def test_bench_responder_follows_its_rule() -> None:
    def ask(target: str, *newer: str) -> dict:
        lines = ["TARGET memory:", f"[2024-05-01, Wednesday] {target}", "",
                 "NEWER memories (oldest first):"]
        lines += [f"{i}. [2024-05-02, Thursday] {n}" for i, n in enumerate(newer, 1)]
        return json.loads(consolidation_responder({"messages": [
            {"role": "user", "content": "\n".join(lines)}]}))

    assert ask("a lives in Paris", "a moved to Berlin")["action"] == "delete"
    update = ask("a likes tea", "a also likes coffee")
    assert update == {"action": "update", "new_fact": "a likes tea; a also likes coffee",
                      "reason": "newer detail"}
    assert ask("a has a cat", "a has a cat still")["action"] == "ignore"
