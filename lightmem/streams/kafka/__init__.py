"""Kafka adapters: topics and their admin, the producer, lag, the dead-letter topic, flush
commands, memory changes, backfill and teardown, and one "read a topic to its end" helper.

Needs the ``stream`` extra (confluent-kafka); import the submodules you use.
"""

__all__ = [
    "backfill",
    "changes",
    "dlq",
    "flush_commands",
    "lag",
    "producer",
    "teardown",
    "topic_reader",
    "topics",
]
