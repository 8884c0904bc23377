"""LightMem Stream: long-term memory for LLM chat platforms.

``from lightmem import Memory, MemoryClient``: the same methods in-process (embedded store)
and over HTTP (``lightmem serve``); see :mod:`lightmem.service`. Imported on first use, so
``import lightmem.schemas`` stays light.
"""

from typing import Any

__all__ = ["Memory", "MemoryClient"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lightmem import service

        return getattr(service, name)
    raise AttributeError(f"module 'lightmem' has no attribute {name!r}")
