"""The LightMem stages as pure Python over typed records (:mod:`lightmem.schemas`): no Kafka,
Elasticsearch, SQLite, HTTP or SDK imports, no clock (import-linter keeps it). The modules are
the API; nothing is re-exported here.
"""

__all__: list[str] = []
