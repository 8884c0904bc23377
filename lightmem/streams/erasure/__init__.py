"""Erasure on the streaming deployment: ``lightmem forget`` (:mod:`.forget`, the flow), the
request, report and ledger topic every worker follows (:mod:`.ledger`), the workers' own
sweeps (:mod:`.sweeps`) and the Elasticsearch side (:mod:`.es_sink`).
"""

__all__ = ["es_sink", "forget", "ledger", "sweeps"]
