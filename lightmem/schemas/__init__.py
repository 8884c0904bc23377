"""Event contracts: typed records and their versioned JSON Schema files."""

from .json_schema import RECORDS, SCHEMA_DIR, export_schemas, render_schema, schema_file_name
from .records import (
    ChangeOp,
    DeadLetter,
    EntryMode,
    MemoryChange,
    MemoryEntry,
    Record,
    Role,
    SchemaError,
    Segment,
    SegmentTurn,
    SleepAction,
    SleepWindowCommand,
    TurnEvent,
    stable_id,
)

__all__ = [
    "ChangeOp",
    "DeadLetter",
    "EntryMode",
    "MemoryChange",
    "MemoryEntry",
    "Record",
    "Role",
    "SchemaError",
    "Segment",
    "SegmentTurn",
    "SleepAction",
    "SleepWindowCommand",
    "TurnEvent",
    "stable_id",
    "RECORDS",
    "SCHEMA_DIR",
    "export_schemas",
    "render_schema",
    "schema_file_name",
]
