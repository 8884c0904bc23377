"""Observability: Prometheus metrics, logging configuration, and ``lightmem stats``."""

__all__ = ["logs", "metrics", "stats"]
