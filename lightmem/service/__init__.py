"""The HTTP memory service (``lightmem serve``) and the SDK (:class:`Memory`,
:class:`MemoryClient`).

Layers: ops -> service -> streams -> processors -> schemas. The service serves the embedded
store or the streaming deployment (:mod:`.backends`) through one set of operations
(:mod:`.core`), over HTTP (:mod:`.app`) or in-process (:mod:`.sdk`).
"""

from .app import Auth, create_app
from .auth import KeyRing, RateLimiter, create_key
from .backends import EmbeddedBackend, StartupError, StreamBackend
from .client import MemoryClient
from .core import MemoryService, erase_user
from .errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    MemoryServiceError,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
)
from .openapi import OPENAPI_PATH, export_openapi, render_openapi
from .sdk import Memory

__all__ = [
    "Auth",
    "create_app",
    "KeyRing",
    "RateLimiter",
    "create_key",
    "EmbeddedBackend",
    "StreamBackend",
    "StartupError",
    "MemoryClient",
    "MemoryService",
    "erase_user",
    "Memory",
    "MemoryServiceError",
    "InvalidInput",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "RateLimited",
    "Unavailable",
    "ServerError",
    "OPENAPI_PATH",
    "export_openapi",
    "render_openapi",
]
