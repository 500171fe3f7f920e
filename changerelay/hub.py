"""Fan-out and replay: who gets which event, exactly once and in order.

The hub keeps one ordered log — the replay buffer — of the most recent events, and the connected
clients grouped by subscription. ``publish`` appends to the log; once per event-loop iteration the
new events are *flushed*: each subscription group picks what its clients are sent — the events
it matches, or for a row rule a ``leave`` in an event's place — with one decision per group, not
per client, and every client of the group gets the same bytes. Replay, catch-up and clients
resuming ahead of us pick with the same ``select``, so every path sends the same. Nothing
here awaits, so a slow or broken client can never stall the others or the change stream; transports
enforce their own outbound limits. A client that raises while being served — a bug only it meets
— is cut on its own (``Hub.failed``), and the loop goes on to the next client: every loop over
clients guards each one (a ``try`` costs nothing until it catches, since Python 3.11).

A client that resumes gets the events after its position queued as a replay and joins its group
in the same step, with no await in between; live events then queue behind the replay (the client
writes it as its socket drains). That is the whole argument for "no gap, no duplicate" across the
hand-over from history to live.

``floor`` is the resume point the log starts from: every event after ``floor`` up to the newest is
in the log. A resume point older than ``floor`` has to be caught up from MongoDB itself (see
``catchup.py``). Positions are ids (``tokens.py``) and compare by their ``_data``, a hex-encoded
KeyString whose byte order is the order of events in a deployment.

An event's id encodes its document's ``_id`` and its collection's UUID, so a ``position`` message
tells a client whose token restricts it (an ``ns`` claim, a row rule) only ids it may know: a
high-water mark, or the newest id its subscription was sent — never another event's.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from logzero import logger

from . import events as ev
from .events import Delivery, Event
from .index import Index, Keys, Shared, covers
from .postings import Postings
from .tokens import high_water_mark, is_high_water_mark, order_key, seconds

if TYPE_CHECKING:
    from .subscription import Subscription

# How far (seconds of cluster time) a resume point may be ahead of our position and still be
# taken as coming from a relay that is just a little ahead of this one; further is refused.
AHEAD_WINDOW = 60
# Evicted events stay at the front of the log's lists until this many have gone (and they are
# more than half the list): deleting a list's head moves all the rest, so it is done rarely.
COMPACT_AFTER = 4096
# A quiet client that was told its position is told again after this many position intervals of
# silence (10 minutes at 5 s), or sooner when the replay buffer is about to drop where it would
# resume from (``Hub._horizon``). So a reconnect resumes from the buffer, and a catch-up from
# MongoDB (another relay, a restart) reads at most half a buffer of events or 10 minutes of them;
# this interval only keeps a quiet deployment's clients well inside the oplog window.
RETELL_INTERVALS = 120


class Subscriber(Protocol):
    """What the hub needs from a connected client: every client (``clients.Client``) is one."""

    encoding: str                 # what its events become as bytes: one encoding, one payload
    subscription: Subscription    # the hub swaps in its group's compiled copy
    last_send: float              # monotonic time of the last frame, for position messages
    told: str | None              # the last position sent, so a quiet client is told it once
    sent: str | None              # the newest id replayed or sent to it outside its group
    announced: bool               # it was told ``ready`` (see ``Hub._announce``)
    peer: str                     # its address, to name it in the log

    def pack(self, events: Sequence[Delivery]) -> bytes: ...
    def weight(self, event: Delivery) -> int: ...
    def deliver(self, events: Sequence[Delivery], payload: bytes) -> None: ...
    def replay(self, events: Sequence[Delivery]) -> None: ...
    def send_control(self, message: bytes, token: str | None = None) -> None: ...
    def fail(self) -> None: ...   # serving it raised: end it alone (disconnect internal_error)


S = TypeVar("S", bound=Subscriber)
# What a loop over clients calls with a client whose step raised (``Hub.failed``).
Failed = Callable[[S, Exception], None]


class Tally(Protocol):
    """Where deliveries are counted (``metrics.Metrics``): once per group per flush, and once
    per replay."""

    def delivered(self, matched: Sequence[Delivery], payloads: Mapping[str, bytes],
                  encodings: Mapping[str, int]) -> None: ...
    def replayed(self, client: Subscriber, events: Sequence[Delivery]) -> None: ...


class Uncounted:
    """A ``Tally`` that counts nothing, for hubs without metrics (tests, benchmarks)."""

    def delivered(self, matched: Sequence[Delivery], payloads: Mapping[str, bytes],
                  encodings: Mapping[str, int]) -> None:
        pass

    def replayed(self, client: Subscriber, events: Sequence[Delivery]) -> None:
        pass


class Group(Generic[S]):
    """Clients with the same subscription: one match per event, one payload per encoding."""

    __slots__ = ("clients", "encodings", "last_send", "newest", "subscription")

    def __init__(self, subscription: Subscription):
        self.subscription = subscription
        self.clients: set[S] = set()
        self.encodings: Counter[str] = Counter()  # its clients by encoding, for the tally
        self.last_send = 0.0  # the group's clients all got the same live frames at this time
        self.newest: str | None = None  # ...and this was the newest id among them

    def deliver(self, batch: list[Event], now: float, failed: Failed[S], tally: Tally) -> None:
        matched = self.subscription.select(batch)
        if not matched:
            return
        self.last_send = now
        self.newest = matched[-1].token
        payloads: dict[str, bytes] = {}
        for client in tuple(self.clients):
            try:
                payload = payloads.get(client.encoding)
                if payload is None:
                    payload = payloads[client.encoding] = client.pack(matched)
                client.deliver(matched, payload)
            except Exception as exc:
                failed(client, exc)
        tally.delivered(matched, payloads, self.encodings)  # those cut off meanwhile have left


class Hub(Generic[S]):
    """``call_soon`` schedules the flush that follows a publish (the event loop's);
    ``behind(client, after)`` takes a client that waited for the stream to open and turned out
    to resume from before it: only MongoDB's history has what that client missed. ``tally``
    counts what is delivered."""

    def __init__(self, call_soon: Callable[[Callable[[], None]], object],
                 behind: Callable[[S, str], None], max_events: int, max_bytes: int,
                 tally: Tally | None = None):
        self.tally: Tally = tally or Uncounted()
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._call_soon = call_soon
        self._behind = behind
        self._log: list[Event] = []
        self._keys: list[str] = []        # each logged event's key, for binary searches
        self._start = 0                   # log[:_start] is evicted; compacted now and then
        self._postings = Postings()       # the log's events by value, on the index's paths
        self._bytes = 0
        self.floor: str | None = None     # None until the change stream has opened once
        self.position: str | None = None  # newest token every client has been sent up to
        self._mark: str | None = None     # a high-water mark MongoDB sent, to spell others like
        self._pending: list[Event] = []
        self._pending_keys: list[Keys] = []  # each pending event's values on the index's paths
        self._flush_scheduled = False
        self._groups: dict[Subscription, Group[S]] = {}  # by subscription
        self._routes: Index[Group[S]] = Index()  # the groups, by what their events hold
        self._ahead: dict[S, str] = {}    # clients resuming past our position: their key
        self._ahead_routes = Shared()     # ...and their subscriptions
        self._round: list[Group[S]] = []  # the groups a round of position passes looks at
        self._round_at = 0                # ...and where the next pass starts in it
        self._waiting: dict[S, str] = {}  # clients resuming before the stream first opened
        self._unannounced: set[S] = set()  # live, but no position to tell them ``ready`` at yet
        self.clients: set[S] = set()
        self.published = 0

    # -- source side -------------------------------------------------------------------------

    def start(self, floor: str, *, resync: bool = False) -> None:
        """The change stream (re)started from ``floor`` without continuity with what came before.

        With ``resync`` the log is discarded and every client is told it must resync, because
        events between the old and the new position are gone.
        """
        self.flush()
        if resync or self.floor is None:
            self._log, self._keys, self._start, self._bytes = [], [], 0, 0
            self._postings = Postings()
        if resync:
            self.broadcast(ev.control("resync", reason="history_lost"))
            for client in tuple(self._ahead):
                self._stop_holding(client)
                self._join(client)
        if resync or self.floor is None:
            self.floor = floor
            self.position = floor
        self._learn_mark(floor)
        self._announce_pending()
        waiting, self._waiting = self._waiting, {}
        for client, after in waiting.items():
            try:
                if not self.resume(client, after):
                    # Older than where the stream starts (a client back from a relay that
                    # restarted): only MongoDB's history has what it missed.
                    self.clients.discard(client)
                    self._behind(client, after)
            except Exception as exc:
                self.failed(client, exc)

    def broadcast(self, message: bytes) -> None:
        """A control message to every client."""
        for client in tuple(self.clients):
            try:
                client.send_control(message)
            except Exception as exc:
                self.failed(client, exc)

    def publish(self, event: Event) -> None:
        previous = self._keys[-1] if len(self._keys) > self._start else None
        keys = self._routes.keys(event)  # walked once: filed by them now, routed at flush
        self._postings.post(event, keys, previous)
        self._log.append(event)
        self._keys.append(event.key)
        self._bytes += event.size
        self.published += 1
        self._pending.append(event)
        self._pending_keys.append(keys)
        self._evict()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_soon(self.flush)

    def advance(self, token: str) -> None:
        """The stream is known to have nothing before ``token`` that we have not published."""
        self.flush()
        self._learn_mark(token)
        key = order_key(token)
        if self.position is None or key > order_key(self.position):
            self.position = token
        self._announce_pending()
        # Clients from a relay that was ahead are live once the stream has passed their point,
        # event or not: on a quiet deployment only the stream's high-water mark moves.
        for client, after in tuple(self._ahead.items()):
            if key >= after:
                self._stop_holding(client)
                self._join(client)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        keyed, self._pending_keys = self._pending_keys, []
        now = time.monotonic()
        failed = self.failed
        for group, events in self._routes.route(batch, keyed).items():
            group.deliver(events, now, failed, self.tally)
        self.position = batch[-1].token  # before the clients ahead join, told ``ready`` here
        if self._ahead:
            self._deliver_ahead(batch, now)

    def _evict(self) -> None:
        while self._start < len(self._log) and (
            len(self._log) - self._start > self.max_events or self._bytes > self.max_bytes
        ):
            event = self._log[self._start]
            self._bytes -= event.size
            self.floor = event.token
            self._start += 1
        if self._start > COMPACT_AFTER and self._start * 2 > len(self._log):
            del self._log[: self._start]
            del self._keys[: self._start]
            self._start = 0
            if self._keys:
                self._postings.forget_before(self._keys[0])
            else:
                self._postings = Postings()

    # -- client side -------------------------------------------------------------------------

    def subscribe(self, client: S) -> None:
        """Join live, from the next event on."""
        self.flush()
        self.clients.add(client)
        self._join(client)

    def resume(self, client: S, after: str) -> bool:
        """Replay everything after ``after`` from the log, then join live.

        Returns False, having done nothing, when the log does not reach back to ``after``: the
        caller must then catch the client up from MongoDB first.
        """
        floor = self.floor
        if floor is None:
            self.clients.add(client)
            self._waiting[client] = after
            return True
        key = order_key(after)
        if key < order_key(floor):
            return False
        self.flush()
        self.clients.add(client)
        # Not the newest event: on a quiet deployment the stream's high-water mark runs ahead
        # of it, and a position told from there must resume here.
        head = self.position or floor
        if key > order_key(head):
            if seconds(after) - seconds(head) > AHEAD_WINDOW:
                # Not from a relay a moment ahead of us, and MongoDB would wait for that time
                # to come: the position is unusable, and the client must be told so.
                client.send_control(ev.control("resync", reason="invalid_token"))
                self._join(client)
                return True
            # From another relay that is ahead of us: hold back what it has already seen.
            self._ahead[client] = key
            self._ahead_routes.hold(client.subscription)
            return True
        self.replay(client, after)
        self._join(client)
        return True

    def replay(self, client: S, after: str) -> None:
        key = order_key(after)
        events = self._postings.candidates(client.subscription, key)
        if events is None:  # no cover to look up: every event after its position
            events = self._log[bisect.bisect_right(self._keys, key, lo=self._start):]
        matched = client.subscription.select(events)
        if matched:
            client.last_send = time.monotonic()
            client.sent = matched[-1].token
            client.replay(matched)
            self.tally.replayed(client, matched)

    def unsubscribe(self, client: S) -> None:
        self.clients.discard(client)
        if client in self._ahead:
            self._stop_holding(client)
        self._waiting.pop(client, None)
        self._unannounced.discard(client)
        group = self._groups.get(client.subscription)
        if group is not None and client in group.clients:
            group.clients.remove(client)
            group.encodings[client.encoding] -= 1
            if not group.clients:
                del self._groups[client.subscription]
                self._routes.discard(group)

    def _join(self, client: S) -> None:
        group = self._groups.get(client.subscription)
        if group is None:
            group = self._groups[client.subscription] = Group(client.subscription)
            self._routes.add(group, covers(group.subscription))
        client.subscription = group.subscription  # one compiled copy per distinct subscription
        if client not in group.clients:
            group.clients.add(client)
            group.encodings[client.encoding] += 1
        if not client.announced:
            self._announce(client)

    def _announce(self, client: S) -> None:
        """``{"type": "ready", "resume_after": <id>}``, once per connection, when its live feed
        is attached (after any replay or catch-up): from then on every write it may see reaches
        it. ``resume_after`` is what a position message would tell it now (``_told_position``);
        until there is one (the stream has not opened yet) it waits in ``_unannounced``. A live
        query was told its own ``ready`` with its snapshot, and is not told again."""
        position = self._told_position(client)
        if position is None:
            self._unannounced.add(client)
            return
        self._unannounced.discard(client)
        client.announced = True
        try:
            client.send_control(ev.control("ready", resume_after=position))
        except Exception as exc:
            self.failed(client, exc)

    def _announce_pending(self) -> None:
        for client in tuple(self._unannounced):
            self._announce(client)

    def _told_position(self, client: S) -> str | None:
        """Where ``client`` could resume from now without loss: the hub's position; for a
        restricted client only an id it may know (see ``send_positions``)."""
        if self.position is None:
            return None
        if not client.subscription.restricted:
            return self.position
        return _latest(self._mark_at(self.position), client.sent)

    def _deliver_ahead(self, batch: list[Event], now: float) -> None:
        head = batch[-1].key
        routed = self._ahead_routes.index.route(batch)
        for client, after in tuple(self._ahead.items()):
            try:
                events = routed.get(client.subscription)
                fresh = [] if events is None else client.subscription.select(
                    [e for e in events if e.key > after])
                if fresh:
                    client.last_send = now
                    client.sent = fresh[-1].token
                    client.deliver(fresh, client.pack(fresh))
                    self.tally.replayed(client, fresh)
            except Exception as exc:
                self.failed(client, exc)
                continue
            if head >= after:
                self._stop_holding(client)
                self._join(client)

    def _stop_holding(self, client: S) -> None:
        """``client`` is no longer ahead: live with its group, or gone."""
        del self._ahead[client]
        self._ahead_routes.release(client.subscription)

    def failed(self, client: S, exc: Exception) -> None:
        """Serving ``client`` raised: a bug, met by this client alone (the others were served).

        It leaves the hub and is ended with ``internal_error`` (1011; it resumes and loses
        nothing). The log names the client and where it failed, not the exception's message,
        which may quote an event a log reader may not see.
        """
        self.unsubscribe(client)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        logger.error("serving client %s failed (%s at %s:%d in %s); closing it with "
                     "internal_error", client.peer, type(exc).__name__,
                     where.filename.rpartition("/")[2], where.lineno or 0, where.name)
        try:
            client.fail()
        except Exception as again:  # it is out of the hub already: nothing else can reach it
            logger.error("closing client %s failed too (%s)", client.peer, type(again).__name__)

    # -- housekeeping ------------------------------------------------------------------------

    def send_positions(self, idle: float, budget: int | None = None, share: float = 1.0
                       ) -> int:
        """Tell clients that heard nothing for ``idle`` seconds where they could resume from.

        A heavily filtered subscription may match nothing for hours while the oplog moves on;
        without this its newest id would fall out of the oplog window. A client is told when it
        has not been yet, and again only when what it was told is about to leave the replay
        buffer (``_horizon``) or after ``RETELL_INTERVALS`` silent intervals: 10,000 quiet
        per-user clients told every interval cost more than the events did (issue 14), and
        until then a reconnect resumes from the buffer all the same. At most ``budget`` clients
        are told per call: the rest stay due and are told on the next calls (with a ``share``,
        when the round comes back to them), so a crowd of quiet clients costs a few short bursts
        rather than one long one that live events would wait behind. With ``share`` below 1 a
        call looks at that share of the groups, the next ones of a round over all of them: at
        10,000 per-user groups, looking at every one on every pass to find the few due was most
        of what quiet clients cost.
        """
        if self.position is None:
            return 0
        now = time.monotonic()
        groups = self._groups.values() if share >= 1 else self._next_share(share)
        # Found first, then told: telling one may end it, and it leaves its group.
        due = list(itertools.islice(self._due_positions(self.position, now, idle, groups),
                                    budget))
        messages: dict[str, bytes] = {}
        for client, position in due:
            message = messages.get(position)
            if message is None:
                message = messages[position] = ev.control("position", resume_after=position)
            client.last_send = now
            client.told = position
            try:
                client.send_control(message, token=position)
            except Exception as exc:
                self.failed(client, exc)
        return len(due)

    def _next_share(self, share: float) -> list[Group[S]]:
        """The next ``share`` of a round over the groups; a round starts from the groups there
        are then (a group that left meanwhile has no clients; one that came waits a round)."""
        if self._round_at >= len(self._round):
            self._round, self._round_at = list(self._groups.values()), 0
        count = math.ceil(len(self._round) * share)
        groups = self._round[self._round_at:self._round_at + count]
        self._round_at += count
        return groups

    def _due_positions(self, head: str, now: float, idle: float, groups: Iterable[Group[S]]
                       ) -> Iterator[tuple[S, str]]:
        """The quiet clients of ``groups`` to tell now, each with the position to tell it
        (``head``: the hub's position)."""
        mark = self._mark_at(head)
        horizon = self._horizon()
        retell = idle * RETELL_INTERVALS
        for group in groups:
            if now - group.last_send < idle:
                continue
            restricted = group.subscription.restricted
            shared = _latest(mark, group.newest) if restricted else head
            for client in group.clients:
                position = _latest(shared, client.sent) if restricted else shared
                silent = now - client.last_send
                told = client.told
                if position is None or silent < idle or told == position or (
                        told is not None and silent < retell and order_key(told) >= horizon):
                    continue
                yield client, position

    def _horizon(self) -> str:
        """The order key a position must be at or past for the replay buffer to take another
        half of its capacity (in events, and in bytes at its events' average size) before it
        drops an event after that position."""
        floor = order_key(self.floor) if self.floor is not None else ""
        count = len(self._log) - self._start
        if not count:
            return floor
        keep = self.max_events // 2
        if self._bytes:
            keep = min(keep, self.max_bytes * count // (2 * self._bytes))
        index = len(self._log) - keep - 1
        return self._keys[index] if index >= self._start else floor

    @property
    def mark(self) -> str | None:
        """A high-water mark MongoDB sent, once it has sent one: the spelling of others."""
        return self._mark

    def _learn_mark(self, token: str) -> None:
        if self._mark is None and is_high_water_mark(token):
            self._mark = token

    def _mark_at(self, position: str) -> str | None:
        """The high-water mark at ``position``'s cluster time: every event before that time has
        been flushed, and it names no event. None until MongoDB has sent one to spell it like.

        A client resuming from it is sent the events of that time again, so a restricted client
        is told it only when it was sent none of them (``send_positions`` takes the newest of
        this and what the client was sent).
        """
        if is_high_water_mark(position):
            return position
        return None if self._mark is None else high_water_mark(position, like=self._mark)

    def stats(self) -> dict[str, int]:
        return {
            "clients": len(self.clients),
            "subscriptions": len(self._groups),
            "buffered_events": len(self._log) - self._start,
            "buffered_bytes": self._bytes,
            "published": self.published,
        }


def _latest(*ids: str | None) -> str | None:
    """The newest of some ids (None: none)."""
    given = [id_ for id_ in ids if id_ is not None]
    return max(given, key=order_key) if given else None
