"""Versioned JSON Schema files, generated from the record models.

File names are ``<record>.v<schema_version>.json`` (``turn_event.v1.json``); the models are
the source of truth and ``tests/test_schemas.py`` fails when a committed file drifts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .records import (
    DeadLetter,
    ErasureRequest,
    MemoryChange,
    MemoryEntry,
    Record,
    Segment,
    SleepWindowCommand,
    TurnEvent,
)

__all__ = ["SCHEMA_DIR", "RECORDS", "schema_file_name", "render_schema", "export_schemas"]

SCHEMA_DIR = Path(__file__).parent / "json"
RECORDS: tuple[type[Record], ...] = (
    TurnEvent,
    Segment,
    MemoryEntry,
    MemoryChange,
    SleepWindowCommand,
    DeadLetter,
    ErasureRequest,
)


def schema_file_name(record: type[Record]) -> str:
    """``TurnEvent`` -> ``turn_event.v1.json``."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", record.__name__).lower()
    version = record.model_fields["schema_version"].default
    return f"{snake}.v{version}.json"


def render_schema(record: type[Record]) -> str:
    """The JSON Schema text for ``record``, canonically formatted."""
    schema = record.model_json_schema()
    schema["$id"] = f"https://lightmem.dev/schemas/{schema_file_name(record)}"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, sort_keys=True, indent=2) + "\n"


def export_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every record's schema file into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for record in RECORDS:
        path = directory / schema_file_name(record)
        path.write_text(render_schema(record))
        written.append(path)
    return written
