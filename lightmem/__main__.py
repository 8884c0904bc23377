"""``python -m lightmem`` is the ``lightmem`` command."""

from lightmem.ops.cli import app

app()
