"""The WebSockets to ping, filed by slice as they come and go.

Every connection is pinged once per WS_PING_INTERVAL, a slice at a time, so that 10,000 pongs do
not come back at once (``app.Relay.ping``). Picking a tick's slice out of every connection cost a
walk of all of them on every tick — at 10,000 quiet per-user clients, 20 walks of 10,000 per
interval to ping 500 each time (issue 14). Filed by slice when they join, a tick costs its slice.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Pinger(Generic[C]):
    """Clients in ``slices`` sets; ``tick`` hands back the next one, round and round."""

    def __init__(self, slices: int):
        self._slices: list[set[C]] = [set() for _ in range(slices)]
        self._next = 0

    def __len__(self) -> int:
        return sum(map(len, self._slices))

    def add(self, client: C) -> None:
        self._slices[hash(client) % len(self._slices)].add(client)

    def discard(self, client: C) -> None:
        self._slices[hash(client) % len(self._slices)].discard(client)

    def tick(self) -> tuple[C, ...]:
        """The next slice's clients (a copy: pinging one may end it, and it then leaves)."""
        self._next = (self._next + 1) % len(self._slices)
        return tuple(self._slices[self._next])
