"""The embedded runtime: the whole pipeline in one process over SQLite (sqlite-vec), no servers.
The default of ``lightmem ingest`` / ``search`` / ``consolidate``.
"""

__all__ = ["erasure", "runtime", "store"]
