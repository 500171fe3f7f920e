"""Connected clients as the hub sees them: a subscription, a byte sink and an outbound limit.

Both transports share one policy for slow consumers: a client whose unsent bytes would pass
``CLIENT_BUFFER_BYTES`` is cut off (WebSocket close 1013 "slow consumer"; SSE: an ``error`` record
and the end of the response), and so are the clients holding the most when the sum over all of
them passes ``MAX_BUFFERED_BYTES`` (``buffers.py``). A cut-off client's unsent events are dropped
at once, so the relay's memory stays bounded however many clients stop reading, and a client that
resumes afterwards loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING

from logzero import logger
from tornado.iostream import StreamClosedError

from . import events as ev
from . import frames, tornado_internals
from .connection import CLOSE_TIMEOUT, Connection, WebSocketConnection
from .disconnect import CLOSES, Close

if TYPE_CHECKING:
    from .auth import Claims
    from .subscription import Subscription

PING_FRAME = frames.ws_frame(b"", frames.PING)  # the same bytes for every client
REPLAY_CHUNK = 256 * 1024  # bytes per write while replaying
# A cut-off client is still told why in one last message, which may take its queue this far past
# its limit: the message is a few hundred bytes, and the limit stays a bound.
LAST_WORDS_ALLOWANCE = 4096
# Why a slow consumer is cut off: what the log says, what the client is told.
OVER_ITS_LIMIT = ("over its CLIENT_BUFFER_BYTES", "you fell more than CLIENT_BUFFER_BYTES "
                  "behind; reconnect with resume_after to continue without loss")
HOLDS_THE_MOST = ("the most of all clients, MAX_BUFFERED_BYTES reached", "the relay holds too "
                  "much unsent data (MAX_BUFFERED_BYTES) and you held the most; reconnect with "
                  "resume_after to continue without loss")
# An event's frame, as each WebSocket encoding packs it: shared by every client.
_FRAME: Callable[[ev.Delivery], bytes] = attrgetter("frame")
_DEFLATED_FRAME: Callable[[ev.Delivery], bytes] = attrgetter("deflated")


class Client:
    """Live events go straight to the socket; history goes through a flow-controlled backlog.

    A replay can be far larger than ``CLIENT_BUFFER_BYTES`` (the whole replay buffer, or a long
    catch-up), so it is written a chunk at a time as the socket drains. While a backlog exists,
    live events queue behind it in order, and only they count against the limit.

    ``on_end`` is called once, with the client, when the relay ends it — cut off as a slow
    consumer (its own limit, or the relay's ``MAX_BUFFERED_BYTES``) or closed on token expiry —
    so that it leaves the hub before its last message goes out. ``encoding`` names the bytes its
    events become (``pack``): clients with one encoding share one payload per flush.
    """

    __slots__ = ("_drained", "_ended_with", "_history", "_queued", "announced", "backlog",
                 "claims", "closed", "encoding", "last_send", "limit", "on_end", "peer", "sent",
                 "subscription", "told", "writer")

    def __init__(self, writer: Connection, encoding: str, subscription: Subscription, limit: int,
                 peer: str, claims: Claims | None, on_end: Callable[[Client], None]):
        self.writer = writer
        writer.on_shed = self.shed
        self.encoding = encoding
        self.subscription = subscription
        self.limit = limit
        self.peer = peer
        self.claims = claims  # of the token, when auth is on
        self.on_end = on_end
        self.last_send = time.monotonic()
        self.told: str | None = None
        self.sent: str | None = None  # the hub's: see hub.Subscriber
        self.announced = False  # told ``ready`` (hub.Hub._announce, or a live query's own)
        self.closed = False
        self._ended_with: Close | None = None
        self.backlog: deque[ev.Delivery | bytes] | None = None  # to replay; bytes: control
        self._queued = 0                   # live bytes queued behind the backlog
        self._history = 0                  # replayed events still in the backlog (they come first)
        self._drained: asyncio.Future[None] | None = None

    def deliver(self, events: Sequence[ev.Delivery], payload: bytes) -> None:
        """Live events, with the payload shared by every client of the group."""
        if self.backlog is None:
            self.send(payload)
            return
        self.backlog.extend(events)
        self._queued += sum(map(self.weight, events))
        if self._queued > self.limit:
            self.cut_off()

    def replay(self, events: Sequence[ev.Delivery]) -> None:
        """History: written as fast as the client reads it, never faster."""
        if self.backlog is None:
            self.backlog = deque()
            self._queued = self._history = 0
        self.backlog.extend(events)
        self._history += len(events)
        self._pump()

    def _pump(self) -> None:
        backlog, writer = self.backlog, self.writer
        if backlog is None:
            return
        try:
            while backlog and writer.buffered() < self.limit // 2 and not self.closed:
                head = backlog[0]
                if isinstance(head, bytes):
                    backlog.popleft()
                    writer.write(head)
                    continue
                chunk: list[ev.Delivery] = []
                size = 0
                while backlog and size < REPLAY_CHUNK:
                    event = backlog[0]
                    if isinstance(event, bytes):
                        break
                    backlog.popleft()
                    chunk.append(event)
                    weight = self.weight(event)
                    size += weight
                    if self._history:
                        self._history -= 1
                    else:  # a live event: it no longer counts as queued behind the backlog
                        self._queued -= weight
                writer.write(self.pack(chunk))
            if backlog and not self.closed:
                writer.when_drained(self._pump)
                return
        except StreamClosedError:
            self.closed = True
        self._forget_backlog()

    def _forget_backlog(self) -> None:
        """No backlog any more: written, or never to be (the client is gone or cut off)."""
        self.backlog = None
        self._queued = self._history = 0
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drained(self) -> None:
        """Wait until the backlog has been handed to the socket (or the client is gone)."""
        if self.backlog is None or self.closed:
            return
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        await self._drained

    def send(self, payload: bytes) -> None:
        if self.closed:
            return
        try:
            if not self.writer.write_within(payload, self.limit):
                self.cut_off()
        except StreamClosedError:
            self.closed = True

    def send_control(self, message: bytes, token: str | None = None) -> None:
        if self.backlog is None:
            self.send(self.pack_control(message, token))
        elif token is None:  # a position is pointless behind a backlog; anything else queues
            self.backlog.append(self.pack_control(message, token))

    def cut_off(self, why: tuple[str, str] = OVER_ITS_LIMIT) -> None:
        """Cut a slow consumer off: what it has not been sent is dropped (it resumes from its
        last id) and it is told ``why`` (for the log, for the client) in its last message."""
        if self.closed:
            return
        logger.warning("cutting off slow consumer %s (%d bytes unsent, %s)", self.peer,
                       self.writer.buffered(), why[0])
        self.writer.drop_unsent()
        self._forget_backlog()
        self._end(ev.control("error", code="slow_consumer", message=why[1]),
                  CLOSES["slow_consumer"])

    def shed(self) -> None:
        """The relay's unsent bytes are past MAX_BUFFERED_BYTES, and this client holds the most."""
        self.cut_off(HOLDS_THE_MOST)

    def fail(self) -> None:
        """Serving this client raised (``hub.Hub.failed``): it alone ends, and loses nothing."""
        self._end(ev.control("error", code="internal_error", message=(
            "the relay failed serving this connection (logged); reconnect with resume_after "
            "to continue without loss")), CLOSES["internal_error"])

    def expire(self) -> None:
        """The token's ``exp`` has passed: the connection ends (WebSocket close 1008)."""
        self._end(ev.control("error", code="token_expired",
                             message="your token has expired; reconnect with a fresh one"),
                  CLOSES["token_expired"])

    def _end(self, message: bytes, close: Close) -> None:
        """Leave the hub, say why in a last message, and close (a WebSocket with ``close``)."""
        if self.closed:
            return
        self.closed = True
        self._ended_with = close
        self.on_end(self)
        self.finish(message, close)

    def ended_with(self) -> tuple[int, str] | None:
        """``(code, reason)`` of the close the relay ended this client with; None when the
        client left (or the relay is shutting it down)."""
        return None if self._ended_with is None else self._ended_with.frame

    def weight(self, event: ev.Delivery) -> int:
        """Bytes ``event`` adds to this client's stream."""
        raise NotImplementedError

    def pack(self, events: Sequence[ev.Delivery]) -> bytes:
        """The bytes of ``events`` in this client's encoding."""
        raise NotImplementedError

    def pack_control(self, message: bytes, token: str | None = None) -> bytes:
        """The bytes of a control message (``token``: the position it tells)."""
        raise NotImplementedError

    def finish(self, message: bytes, close: Close) -> None:
        """Send the last ``message`` and close."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """The relay is stopping: close, saying so."""
        raise NotImplementedError


class WebSocketClient(Client):
    """A WebSocket (``connection.WebSocketConnection``). Frames are built once per event, shared."""

    __slots__ = ("_frame", "connection", "pinged")

    def __init__(self, connection: WebSocketConnection, subscription: Subscription, limit: int,
                 peer: str, *, claims: Claims | None, on_end: Callable[[Client], None],
                 deflate: bool = False):
        # permessage-deflate clients share the compressed frames: an encoding of their own
        super().__init__(connection, "ws-deflate" if deflate else "ws", subscription, limit,
                         peer, claims, on_end)
        self.connection = connection
        self._frame = _DEFLATED_FRAME if deflate else _FRAME
        self.pinged: float | None = None  # when an unanswered ping was sent
        connection.on_pong = self.pong

    def weight(self, event: ev.Delivery) -> int:
        return len(self._frame(event))

    def pack(self, events: Sequence[ev.Delivery]) -> bytes:
        return b"".join(map(self._frame, events))

    def pack_control(self, message: bytes, token: str | None = None) -> bytes:
        return frames.ws_frame(message)  # uncompressed: RFC 7692 lets each message choose

    def pong(self) -> None:
        self.pinged = None

    def ended_with(self) -> tuple[int, str] | None:
        return self.connection.protocol.sent_close  # ping timeouts and protocol errors too

    def ping(self, now: float, timeout: float) -> None:
        """One shared timer pings every connection (Tornado would run a Task per connection)."""
        if self.closed:
            return
        if self.pinged is not None and now - self.pinged > timeout:
            self.closed = True
            self.connection.close(*CLOSES["ping_timeout"].frame)
            return
        if self.pinged is None:
            self.pinged = now
            with contextlib.suppress(StreamClosedError):
                self.writer.write(PING_FRAME)

    def finish(self, message: bytes, close: Close) -> None:
        try:
            if self.writer.buffered() + len(message) <= self.limit + LAST_WORDS_ALLOWANCE:
                self.writer.write(frames.ws_frame(message))
        except StreamClosedError:
            return
        self.connection.close(*close.frame)

    def shutdown(self) -> None:
        self.connection.shutdown()


class EventStreamClient(Client):
    """A Server-Sent Events response (``GET /events``) on a connection of its own, once its
    headers are out: whether the body goes out in HTTP/1.1 chunks is known by then, and fixed."""

    __slots__ = ("chunked",)

    def __init__(self, connection: Connection, chunked: bool, subscription: Subscription,
                 limit: int, peer: str, *, claims: Claims | None,
                 on_end: Callable[[Client], None]):
        super().__init__(connection, "sse-chunked" if chunked else "sse", subscription, limit,
                         peer, claims, on_end)
        self.chunked = chunked

    def weight(self, event: ev.Delivery) -> int:
        return len(event.sse)

    def _frame(self, data: bytes) -> bytes:
        return tornado_internals.chunk(data) if self.chunked else data

    def pack(self, events: Sequence[ev.Delivery]) -> bytes:
        return self._frame(b"".join([event.sse for event in events]))

    def pack_control(self, message: bytes, token: str | None = None) -> bytes:
        record = b"event: " + json.loads(message)["type"].encode() + b"\n"
        if token is not None:
            # A position moves EventSource's Last-Event-ID forward, so a reconnect resumes there.
            record = b"id: " + token.encode() + b"\n" + record
        return self._frame(record + b"data: " + message + b"\n\n")

    def heartbeat(self) -> None:
        self.send(self._frame(b": keep-alive\n\n"))

    def finish(self, message: bytes, close: Close) -> None:
        self._end_stream(self.pack_control(message))

    def shutdown(self) -> None:
        self._end_stream(b"")

    def _end_stream(self, last: bytes) -> None:
        """The end of the response: ``last`` and, when chunked, the last chunk; then, like a
        WebSocket's closing handshake, the client has a while to read them."""
        tail = last + tornado_internals.LAST_CHUNK if self.chunked else last
        if tail:
            with contextlib.suppress(StreamClosedError):
                self.writer.write(tail)
        self.writer.finish_within(CLOSE_TIMEOUT)
