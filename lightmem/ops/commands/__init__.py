"""The CLI's command groups, one module each; ``lightmem.ops.cli`` assembles them."""

__all__ = ["bench", "forget", "index", "schemas", "serve", "services", "sleep", "stream"]
