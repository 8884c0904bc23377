"""The Elasticsearch memory store: the client and its errors (``client``), the index mapping
(``mappings``), the store with kNN / BM25 search, bulk writes and aliases (``store``), and the
provisional events index (``events``). Needs the ``stream`` extra (elasticsearch).
"""

__all__ = ["client", "events", "mappings", "store"]
