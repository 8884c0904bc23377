"""The sleep-time worker: sleep windows (cron and ops-opened), the worker loop with its outbox,
and yielding to ingest (a window waits while the ingest workers have backlog).
"""

__all__ = ["ingest_priority", "outbox", "windows", "worker"]
