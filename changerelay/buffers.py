"""What every connection has queued and not yet sent, together, and the cap on it.

Each client's queue has its own limit (``CLIENT_BUFFER_BYTES``), which bounds one stalled client,
not ten thousand of them. ``MAX_BUFFERED_BYTES`` bounds them all: past it, the connections holding
the most are shed first — cut off as slow consumers, their queues dropped — since a client that
reads keeps its queue short.

The sum is what the queues really take: a payload is shared by every client of a subscription
(the hub packs one per group and flush), so it counts once (with ``PAYLOAD_COST``), however many
queues hold it, and each queue entry adds its slot (``SLOT_COST``). Counting it once per queue
would take a burst that ten thousand clients each hold for a moment for gigabytes, and shed
them all.

Finding the largest holder must not cost a scan of every client. Holders sit in a max-heap keyed
by what each held (its own count, shared payloads in full: what it keeps alive) when last
*marked*; a holder is marked when it starts holding and again each time it has grown by
``MARK_STEP`` since, so marking costs one push per ``MARK_STEP`` queued, not one per write. A key
that overstates a holder (it drained since) is corrected when it reaches the top. The holder shed
therefore holds within two steps of the most; entries left behind by re-marks and drained
holders are swept out whenever they outnumber the live ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

# What holding a payload costs besides its bytes: the bytes object's header (33 B, rounded up by
# the allocator) and the entry this module keeps for it (an int key in a dict, about 90 B).
PAYLOAD_COST = 128
# What each queue entry costs: its slot in a deque (8 B, in blocks of 64 slots).
SLOT_COST = 16
# What a queued entry of its own costs a client, besides its bytes: the unit of its limit, so
# that a queue of many tiny payloads is held to what it really takes.
ENTRY_COST = PAYLOAD_COST + SLOT_COST
# How much a holder grows between marks: fine enough that the holder shed is among the largest,
# coarse enough that marking is rare next to writing (a send() moves up to 64 KiB).
MARK_STEP = 64 * 1024
_SWEEP_SLACK = 1024  # stale heap entries tolerated before a sweep, whatever the holders


class Holder(Protocol):
    """A connection as the cap sees it (``connection.Connection``)."""

    def buffered(self) -> int: ...
    def shed(self) -> None: ...


class Buffers:
    """What every holder's queue really takes, and the cap on it (0: no cap).

    Holders report each payload they queue (``queued``) and each that leaves their queue, sent or
    dropped (``dequeued``), with what they hold after it. When the sum passes the cap, shedding
    is scheduled with ``call_soon`` rather than done at once: the write that passed it is usually
    the hub's, mid-way through a flush.
    """

    def __init__(self, cap: int, call_soon: Callable[[Callable[[], None]], object]):
        self.cap = cap
        self.total = 0
        self._call_soon = call_soon
        self._queues: dict[int, int] = {}                # id(payload) → queues holding it
        self._heap: list[tuple[int, int, Holder]] = []  # (-mark, order, holder), stale ones too
        self._marks: dict[Holder, int] = {}              # holder → what it held when marked
        self._order = itertools.count()                  # ties between equal marks
        self._due = False                                # a shed is scheduled or running

    def queued(self, holder: Holder, payload: bytes, held: int) -> None:
        """``holder`` queued ``payload`` and now holds ``held``."""
        key = id(payload)  # a queued payload is alive, so its id is its own until it leaves
        queues = self._queues.get(key, 0)
        self._queues[key] = queues + 1
        self.total += SLOT_COST if queues else len(payload) + ENTRY_COST
        if not self.cap:
            return
        mark = self._marks.get(holder)
        if mark is None or held - mark >= MARK_STEP:
            self._mark(holder, held)
        if self.total > self.cap and not self._due:
            self._due = True
            self._call_soon(self._shed)

    def dequeued(self, holder: Holder, payload: bytes, held: int) -> None:
        """``payload`` left ``holder``'s queue (sent or dropped), which now holds ``held``."""
        key = id(payload)
        queues = self._queues[key] - 1
        if queues:
            self._queues[key] = queues
            self.total -= SLOT_COST
        else:
            del self._queues[key]
            self.total -= len(payload) + ENTRY_COST
        if not held:
            self._marks.pop(holder, None)  # its heap entries are stale now

    def _mark(self, holder: Holder, held: int) -> None:
        self._marks[holder] = held
        heapq.heappush(self._heap, (-held, next(self._order), holder))
        if len(self._heap) > 2 * len(self._marks) + _SWEEP_SLACK:
            self._heap = [(-mark, next(self._order), marked)
                          for marked, mark in self._marks.items()]
            heapq.heapify(self._heap)

    def _shed(self) -> None:
        """Shed the largest holders until the sum is within the cap."""
        heap, marks = self._heap, self._marks
        try:
            while self.total > self.cap and heap:
                key, _, holder = heapq.heappop(heap)
                if marks.get(holder) != -key:
                    continue  # re-marked since, or drained: a newer entry or none stands for it
                held = holder.buffered()
                if held < -key - MARK_STEP:
                    self._mark(holder, held)  # it drained since: back in at what it holds now
                    continue
                del marks[holder]
                holder.shed()
        finally:
            self._due = False
