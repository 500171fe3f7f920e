"""The one retry delay: everything that reconnects waits the same way.

The relay reopening its change stream, a catch-up reopening its own, ``changerelay tail``
reconnecting to a relay: after the n-th failure in a row each waits ``base * 2 ** (n - 1)``
seconds, at most ``cap``, times a random factor between 0.5 and 1 ("equal jitter"). A crowd that
failed together (every relay of a deployment when MongoDB steps down, every terminal client of a
restarted relay) spreads over half the window, and no retry comes sooner than half its delay, so
a server that is down is never retried in a tight loop.
"""

from __future__ import annotations

import random

# Past this many doublings any delay is at its cap; the exponent stops here so that the float
# arithmetic stays in range however long failures go on (2.0 ** 1100 overflows).
_MAX_DOUBLINGS = 64


class Backoff:
    """Delays for consecutive failures; ``reset`` once an attempt has succeeded."""

    __slots__ = ("base", "cap", "failures")

    def __init__(self, base: float, cap: float):
        self.base = base
        self.cap = cap
        self.failures = 0

    def delay(self) -> float:
        """Count one more failure; the seconds to wait before the next attempt."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures - 1, _MAX_DOUBLINGS))
        return ceiling * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0
