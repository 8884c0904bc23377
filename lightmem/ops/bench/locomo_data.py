"""LoCoMo conversations as turn events, for benchmarks and tests.

The data file (``../shared/data/locomo_dev.json``, CC BY-NC 4.0) is read where it lies and
never copied into the repository. ``speaker_a`` plays the user role and ``speaker_b`` the
assistant, both under one memory scope per conversation (tenant ``locomo``, user = the
sample id), as in LightMem's own LoCoMo runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lightmem.schemas import Role, TurnEvent

__all__ = ["LocomoSample", "load_locomo", "parse_session_time", "DEFAULT_LOCOMO"]

DEFAULT_LOCOMO = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "locomo_dev.json"
TENANT = "locomo"
#: Spacing given to consecutive turns of one session (the data has one time per session).
TURN_SPACING = timedelta(seconds=30)


@dataclass(frozen=True)
class LocomoSample:
    """One LoCoMo conversation with its QA."""

    sample_id: str
    turns: list[TurnEvent]
    qa: list[dict[str, Any]]


def parse_session_time(text: str) -> datetime:
    """``"1:56 pm on 8 May, 2023"`` -> an aware UTC datetime."""
    cleaned = re.sub(r"\s+", " ", text.strip())
    return datetime.strptime(cleaned, "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def _session_numbers(conversation: dict[str, Any]) -> list[int]:
    return sorted(
        int(m.group(1))
        for key in conversation
        if (m := re.fullmatch(r"session_(\d+)", key)) and isinstance(conversation[key], list)
    )


def _turn_text(turn: dict[str, Any]) -> str:
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    # Shared photos carry their content only in the caption; keep it, marked as such.
    return f"{text} [shares a photo: {caption}]" if caption else text


def load_locomo(path: Path = DEFAULT_LOCOMO, *, limit: int | None = None) -> list[LocomoSample]:
    """Read LoCoMo samples as turn events (turn id = the ``dia_id``, e.g. ``D1:3``).

    Args:
        path: The ``locomo10.json``-format file.
        limit: Only the first ``limit`` samples.

    Returns:
        The samples, each with its turns in conversation order and its QA list.

    Raises:
        FileNotFoundError: with the path, when the file is absent.
    """
    if not path.exists():
        raise FileNotFoundError(f"LoCoMo data not found at {path}")
    samples = []
    for raw in json.loads(path.read_text())[:limit]:
        conv = raw["conversation"]
        user_speaker = conv["speaker_a"]
        turns: list[TurnEvent] = []
        for n in _session_numbers(conv):
            start = parse_session_time(conv[f"session_{n}_date_time"])
            for i, turn in enumerate(conv[f"session_{n}"]):
                text = _turn_text(turn)
                if not text:
                    continue
                turns.append(
                    TurnEvent(
                        tenant=TENANT,
                        user=raw["sample_id"],
                        conversation=raw["sample_id"],
                        session=f"session_{n}",
                        turn_id=turn["dia_id"],
                        role=Role.user if turn["speaker"] == user_speaker else Role.assistant,
                        speaker=turn["speaker"],
                        text=text,
                        event_time=start + i * TURN_SPACING,
                    )
                )
        samples.append(LocomoSample(raw["sample_id"], turns, list(raw.get("qa", []))))
    return samples
