"""The local Kafka and Elasticsearch launcher (``lightmem services up|down|status``) used by
the tests and a laptop deployment.
"""

__all__ = ["launcher"]
