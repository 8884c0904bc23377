"""Sleep windows, the pure part: cron schedules, the window commands' rules and the fold that
says, at a given time, which tenants' entries the sleep-time workers may consume.

The sources of a window and how they combine are described in
:mod:`lightmem.streams.sleep.windows` (which reads the commands from the control topic and
feeds them here). Nothing here reads a clock, a topic or the settings: times come in as
arguments.

Exceptions::

    ValueError
     ├── CommandError        a valid record that is not a meaningful command; lists all reasons
     └── CronError           a cron expression that does not parse
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lightmem.schemas import SleepAction, SleepWindowCommand

__all__ = [
    "ALL_TENANTS",
    "AutoWindow",
    "CommandError",
    "CronError",
    "CronSchedule",
    "WindowScope",
    "WindowState",
    "command_key",
    "parse_command",
    "parse_duration",
    "validate_command",
]

#: The key part standing for "every tenant".
ALL_TENANTS = "*"


# --------------------------------------------------------------------------- cron


class CronError(ValueError):
    """A cron expression that does not parse (the message names the field and the value)."""


_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")


@dataclass(frozen=True)
class CronSchedule:
    """A five-field cron expression, ``minute hour day-of-month month day-of-week``, read by
    croniter (numbers, names, ranges, lists, steps; day-of-week 0 and 7 are Sunday; when both
    day fields are restricted a day matches if either does). Times are evaluated in UTC.
    """

    expression: str

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse ``expression``.

        Raises:
            CronError: not five fields, or a field croniter refuses (named in the message).
        """
        from croniter import croniter

        parts = expression.split()
        if len(parts) != 5:
            raise CronError(f"cron: needs 5 fields (minute hour day-of-month month "
                            f"day-of-week), got {len(parts)} in {expression!r}")
        if not croniter.is_valid(expression):
            # Name the first field croniter refuses on its own (the others left as '*').
            for i, name in enumerate(_CRON_FIELDS):
                alone = " ".join(p if j == i else "*" for j, p in enumerate(parts))
                if not croniter.is_valid(alone):
                    raise CronError(f"cron {name}: {parts[i]!r} is not valid")
            raise CronError(f"cron: {expression!r} does not parse")
        return cls(expression)

    def matches(self, at: datetime) -> bool:
        """Whether the schedule fires at ``at``'s minute."""
        from croniter import croniter

        return bool(croniter.match(self.expression, at.astimezone(UTC)))

    def last_fire(self, now: datetime, within: timedelta) -> datetime | None:
        """The latest firing time in ``(now - within, now]``, or None."""
        from croniter import croniter

        # croniter's previous firing is strictly before its start: start one minute past now's.
        start = now.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        fire = croniter(self.expression, start).get_prev(datetime)
        return fire if fire > now - within else None


# --------------------------------------------------------------------------- commands


class CommandError(ValueError):
    """A command that validates as a record but is not meaningful; lists every reason."""

    def __init__(self, errors: list[tuple[str, str, str]]) -> None:
        self.errors = errors
        lines = "; ".join(f"{f}: {reason} (got {value})" for f, reason, value in errors)
        super().__init__(f"invalid SleepWindowCommand: {lines}")


def validate_command(cmd: SleepWindowCommand) -> None:
    """Check what the schema cannot: which fields go with which action.

    Raises:
        CommandError: every problem, as ``(field, reason, value repr)``.
    """
    errors: list[tuple[str, str, str]] = []
    if cmd.action is SleepAction.open:
        if cmd.cron is not None:
            errors.append(("cron", "only for action 'schedule'", repr(cmd.cron)))
        if cmd.duration_s is not None:
            errors.append(("duration_s", "only for action 'schedule' (an open uses until)",
                           repr(cmd.duration_s)))
        if cmd.until is not None and cmd.until <= cmd.issued_at:
            errors.append(("until", f"must be after issued_at {cmd.issued_at.isoformat()}",
                           repr(cmd.until.isoformat())))
    elif cmd.action is SleepAction.close:
        for name in ("until", "cron", "duration_s"):
            value = getattr(cmd, name)
            if value is not None:
                errors.append((name, "a close takes no " + name, repr(value)))
    else:
        if cmd.until is not None:
            errors.append(("until", "only for action 'open'", repr(cmd.until)))
        if cmd.cron is None and cmd.duration_s is not None:
            errors.append(("cron", "required with duration_s (no cron clears the schedule)",
                           "nothing"))
        if cmd.cron is not None:
            try:
                CronSchedule.parse(cmd.cron)
            except CronError as exc:
                errors.append(("cron", str(exc), repr(cmd.cron)))
            if cmd.duration_s is None:
                errors.append(("duration_s", "required with cron (the window length)",
                               "nothing"))
    if errors:
        raise CommandError(errors)


def parse_command(raw: bytes | str) -> SleepWindowCommand:
    """Decode, validate and check a control record.

    Raises:
        SchemaError: the record does not validate (every field named).
        CommandError: the record validates but is not a meaningful command.
    """
    cmd = SleepWindowCommand.parse(raw)
    validate_command(cmd)
    return cmd


def command_key(cmd: SleepWindowCommand) -> str:
    """The compaction key: ``window/<tenant or *>`` or ``schedule/<tenant or *>``."""
    kind = "schedule" if cmd.action is SleepAction.schedule else "window"
    return f"{kind}/{cmd.tenant or ALL_TENANTS}"


_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1d"``, ``"1h30m"``, or plain seconds ``"600"``.

    Raises:
        ValueError: anything else, or zero.
    """
    body = text.strip().lower()
    if body.isdigit():
        seconds = int(body)
    else:
        pos, seconds = 0, 0
        for m in _DURATION.finditer(body):
            if m.start() != pos:
                break
            seconds += int(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if pos != len(body) or not body:
            raise ValueError(f"duration: expected e.g. 90s, 30m, 2h, 1h30m (got {text!r})")
    if seconds <= 0:
        raise ValueError(f"duration: must be positive (got {text!r})")
    return timedelta(seconds=seconds)


# --------------------------------------------------------------------------- auto mode


class AutoWindow:
    """Automatic windows from ingest traffic: open after ``quiet`` below ``max_rate``.

    Feed it the turns topic's total end offset now and then (:meth:`observe`); the rate is
    the offset difference over the time difference between samples.

    Args:
        max_rate: Turns per second at or below which ingest counts as quiet.
        quiet: How long it must stay quiet before the window opens.
    """

    def __init__(self, max_rate: float, quiet: timedelta) -> None:
        self.max_rate = max_rate
        self.quiet = quiet
        self._last: tuple[datetime, int] | None = None
        #: Since when traffic has been quiet (None: busy, or no rate known yet).
        self.quiet_since: datetime | None = None
        self.rate: float | None = None

    def observe(self, now: datetime, end_offset: int) -> None:
        """Record the turns topic's total end offset at ``now``."""
        if self._last is not None:
            then, before = self._last
            seconds = (now - then).total_seconds()
            if seconds > 0:
                self.rate = max(0, end_offset - before) / seconds
                if self.rate > self.max_rate:
                    self.quiet_since = None
                elif self.quiet_since is None:
                    # Quiet since the previous sample: the whole interval was below.
                    self.quiet_since = then
        self._last = (now, end_offset)

    def window_start(self) -> datetime | None:
        """Start of the automatic window (quiet for long enough), or None."""
        if self.quiet_since is None:
            return None
        return self.quiet_since + self.quiet

    def describe(self, now: datetime) -> str:
        rate = "unknown" if self.rate is None else f"{self.rate:.2f}/s"
        start = self.window_start()
        if start is not None and start <= now:
            state = f"open since {start.isoformat()}"
        elif start is not None:
            state = f"quiet, opens at {start.isoformat()}"
        else:
            state = "busy" if self.rate is not None else "measuring"
        return (f"auto: ingest {rate} (threshold {self.max_rate}/s for "
                f"{self.quiet.total_seconds():.0f}s): {state}")


# --------------------------------------------------------------------------- window state


@dataclass(frozen=True)
class WindowScope:
    """Which tenants may be consumed now: ``default`` for all, flipped for ``exceptions``."""

    default: bool
    exceptions: frozenset[str] = frozenset()

    def allows(self, tenant: str) -> bool:
        return self.default != (tenant in self.exceptions)

    @property
    def anything(self) -> bool:
        """True when at least one tenant may be consumed."""
        return self.default or bool(self.exceptions)

    def describe(self) -> str:
        if self.default:
            return "open" + (f" except {', '.join(sorted(self.exceptions))}"
                             if self.exceptions else "")
        return f"open for {', '.join(sorted(self.exceptions))}" if self.exceptions else "closed"


_FOREVER = datetime.max.replace(tzinfo=UTC)


@dataclass
class WindowState:
    """The fold of the control commands, plus the configured schedule and auto mode.

    Args:
        config_cron: The configured schedule (all tenants), if any.
        config_duration: Length of each configured window.
        auto: Automatic mode, if on (all tenants).
    """

    config_cron: CronSchedule | None = None
    config_duration: timedelta = timedelta(hours=1)
    auto: AutoWindow | None = None
    #: Latest open/close per tenant (None = all tenants).
    manual: dict[str | None, SleepWindowCommand] = field(default_factory=dict)
    #: Latest schedule per tenant (None = all tenants); cron None = cleared.
    schedules: dict[str | None, SleepWindowCommand] = field(default_factory=dict)

    def apply(self, cmd: SleepWindowCommand) -> None:
        """Fold one (valid) command in, in topic order."""
        table = self.schedules if cmd.action is SleepAction.schedule else self.manual
        if cmd.tenant is None:
            # An all-tenant command resets the tenant-specific ones of its kind.
            table.clear()
        table[cmd.tenant] = cmd

    def _last_close(self, tenant: str | None) -> datetime | None:
        closes = [c.issued_at for key in {None, tenant} if (c := self.manual.get(key))
                  is not None and c.action is SleepAction.close]
        return max(closes, default=None)

    def _intervals(self, tenant: str | None, now: datetime) -> list[tuple[datetime, datetime]]:
        out = []
        for key in {None, tenant}:
            cmd = self.manual.get(key)
            if cmd is not None and cmd.action is SleepAction.open:
                out.append((cmd.issued_at, cmd.until or _FOREVER))
            sched = self.schedules.get(key)
            if sched is not None and sched.cron is not None and sched.duration_s is not None:
                length = timedelta(seconds=sched.duration_s)
                fired = CronSchedule.parse(sched.cron).last_fire(now, length)
                if fired is not None:
                    out.append((fired, fired + length))
        if self.config_cron is not None:
            fired = self.config_cron.last_fire(now, self.config_duration)
            if fired is not None:
                out.append((fired, fired + self.config_duration))
        if self.auto is not None:
            start = self.auto.window_start()
            if start is not None and start <= now:
                out.append((start, _FOREVER))
        return out

    def is_open(self, tenant: str | None, now: datetime) -> bool:
        """Whether ``tenant``'s entries (None: a tenant with no commands of its own) may be
        consumed at ``now``."""
        closed_at = self._last_close(tenant)
        for start, end in self._intervals(tenant, now):
            # A manual open counts from when it was issued even if that clock is a bit ahead.
            if now < end and (closed_at is None or start > closed_at):
                return True
        return False

    def scope(self, now: datetime) -> WindowScope:
        """Which tenants may be consumed at ``now``."""
        default = self.is_open(None, now)
        named = {t for t in (*self.manual, *self.schedules) if t is not None}
        return WindowScope(default, frozenset(t for t in named if self.is_open(t, now) != default))

    def describe(self, now: datetime) -> list[str]:
        """Human-readable lines: the scope, then each source."""
        lines = [f"window: {self.scope(now).describe()}"]
        for key, cmd in sorted(self.manual.items(), key=lambda kv: kv[0] or ""):
            who = key or "all tenants"
            if cmd.action is SleepAction.open:
                until = f" until {cmd.until.isoformat()}" if cmd.until else ""
                lines.append(f"manual {who}: opened {cmd.issued_at.isoformat()}{until} "
                             f"by {cmd.issued_by}")
            else:
                lines.append(f"manual {who}: closed {cmd.issued_at.isoformat()} "
                             f"by {cmd.issued_by}")
        for key, cmd in sorted(self.schedules.items(), key=lambda kv: kv[0] or ""):
            if cmd.cron is not None:
                lines.append(f"schedule {key or 'all tenants'}: '{cmd.cron}' for "
                             f"{cmd.duration_s}s")
        if self.config_cron is not None:
            lines.append(f"schedule (config): '{self.config_cron.expression}' for "
                         f"{self.config_duration.total_seconds():.0f}s")
        if self.auto is not None:
            lines.append(self.auto.describe(now))
        return lines
