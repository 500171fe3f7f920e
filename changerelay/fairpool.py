"""A few costly slots shared fairly among the peers that want them.

Catch-up change streams scan MongoDB's oplog, and the relay opens only ``CATCHUP_STREAMS`` at
once. Handed out first come, first served, one peer that asks for fifty catch-ups takes every
slot while another's one waits behind all of them. So each request names the accounts it is
charged to — the client's address, and its token's subject when auth is on — and:

* no account holds more than ``per_key`` slots at once (a peer that asks for more waits: an
  office behind one NAT is many honest users, and queueing costs only connections, which the
  connection caps bound already);
* waiting requests queue per first account (the address), first come first served within it, and
  a free slot goes to the queues in turn (round-robin), so one peer's fifty queued requests
  delay another peer's one by at most one turn of each queue ahead of it.

Nothing here knows about change streams: snapshot reads for live queries are meant to take
slots from a pool of their own on the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Hashable, Sequence

Accounts = Sequence[Hashable]  # who a request is charged to; the first one queues it


class FairPool:
    """``size`` slots, at most ``per_key`` per account, served round-robin across peers."""

    def __init__(self, size: int, per_key: int):
        self.size = size
        self.per_key = per_key
        self.held = 0
        self._holding: Counter[Hashable] = Counter()
        self._queues: dict[Hashable, deque[tuple[Accounts, asyncio.Future[None]]]] = {}
        self._turns: deque[Hashable] = deque()  # queues with waiters, next turn first

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @contextlib.asynccontextmanager
    async def hold(self, accounts: Accounts) -> AsyncIterator[None]:
        """A slot for as long as the block runs; waits its turn first."""
        await self.acquire(accounts)
        try:
            yield
        finally:
            self.release(accounts)

    async def acquire(self, accounts: Accounts) -> None:
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first = accounts[0]
        queue = self._queues.get(first)
        if queue is None:
            queue = self._queues[first] = deque()
            self._turns.append(first)
        queue.append((accounts, granted))
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(accounts)  # granted as it was cancelled: give the slot back
            else:
                self._withdraw(first, granted)
            raise

    def release(self, accounts: Accounts) -> None:
        self.held -= 1
        for account in accounts:
            self._holding[account] -= 1
            if not self._holding[account]:
                del self._holding[account]
        self._grant()

    def _grant(self) -> None:
        """Free slots to the waiting queues in turn, each to its first request whose accounts
        all have room (a subject at its limit does not hold up its address's other users)."""
        turns = self._turns
        skipped = 0  # queues passed over in a row: nothing in them has room
        while self.held < self.size and skipped < len(turns):
            first = turns[0]
            queue = self._queues[first]
            turns.rotate(-1)
            index = next((i for i, (accounts, _) in enumerate(queue) if self._room(accounts)),
                         None)
            if index is None:
                skipped += 1
                continue
            skipped = 0
            accounts, granted = queue[index]
            del queue[index]
            if not queue:
                del self._queues[first]
                turns.pop()  # it was just rotated to the back
            if granted.cancelled():  # its task is being cancelled and has not withdrawn yet
                continue
            self.held += 1
            for account in accounts:
                self._holding[account] += 1
            granted.set_result(None)

    def _room(self, accounts: Accounts) -> bool:
        return all(self._holding[account] < self.per_key for account in accounts)

    def _withdraw(self, first: Hashable, granted: asyncio.Future[None]) -> None:
        queue = self._queues.get(first)
        if queue is None:
            return
        for index, (_, waiting) in enumerate(queue):
            if waiting is granted:
                del queue[index]
                break
        if not queue:
            del self._queues[first]
            self._turns.remove(first)
