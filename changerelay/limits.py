"""Connection caps, checked at the handshake: ``MAX_CONNECTIONS`` and ``MAX_CONNECTIONS_PER_IP``."""

from __future__ import annotations

from collections import Counter

from .subscription import SubscriptionError


class Connections:
    """Counts open connections in total and per client address. A cap of 0 means no cap."""

    def __init__(self, total: int = 0, per_address: int = 0):
        self.total_cap = total
        self.per_address_cap = per_address
        self.total = 0
        self.by_address: Counter[str] = Counter()

    def acquire(self, address: str) -> str:
        if self.total_cap and self.total >= self.total_cap:
            raise SubscriptionError(
                "too_many_connections", f"this relay holds its maximum of {self.total_cap} "
                "connections (MAX_CONNECTIONS); retry later or connect to another relay",
                status=503)
        if self.per_address_cap and self.by_address[address] >= self.per_address_cap:
            raise SubscriptionError(
                "too_many_connections_from_address", f"{address} already has "
                f"{self.per_address_cap} connections (MAX_CONNECTIONS_PER_IP); close one first",
                status=429)
        self.total += 1
        self.by_address[address] += 1
        return address

    def release(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]
