"""Erasure on the streaming deployment: ``lightmem forget`` (the erasure ledger topic, the
sweep of every store and topic) and the follower the workers run.
"""

__all__ = ["forget"]
