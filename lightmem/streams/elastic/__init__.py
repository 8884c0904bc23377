"""The Elasticsearch memory store (client, index template and mappings, kNN search, bulk
writes, aliases). Needs the ``stream`` extra (elasticsearch).
"""

__all__ = ["store"]
