"""The service's OpenAPI document, generated from the app and checked in.

``lightmem/service/openapi.json`` is written by ``lightmem openapi export`` and compared by
``lightmem openapi check`` and ``tests/test_service_openapi.py``, like the JSON Schemas of
the event contracts: a route or body that changes without its document fails the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OPENAPI_PATH", "render_openapi", "export_openapi"]

OPENAPI_PATH = Path(__file__).parent / "openapi.json"


def render_openapi() -> str:
    """The OpenAPI document, canonically formatted (sorted keys, 2-space indent)."""
    from .app import Auth, create_app
    from .auth import KeyRing, RateLimiter

    app = create_app(None, Auth(keys=KeyRing([]), limiter=RateLimiter(0, 1)))
    return json.dumps(app.openapi(), sort_keys=True, indent=2) + "\n"


def export_openapi(path: Path = OPENAPI_PATH) -> Path:
    """Write the document to ``path``; returns it."""
    path.write_text(render_openapi())
    return path
