"""The operator's side: the ``lightmem`` CLI (:mod:`.cli`), its commands, the local Kafka +
Elasticsearch launcher and the benchmarks. Nothing is re-exported here.
"""

__all__: list[str] = []
