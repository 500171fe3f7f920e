"""Open connections on bare non-blocking sockets: bytes in, bytes out, nothing else.

Tornado keeps a handler, a request, an IOStream, a protocol object and a chain of coroutines alive
for every open connection. A relay holds thousands of connections that mostly wait, and what they
wait for is bytes we already built, so once its handshake is answered a connection leaves Tornado
and a ``Connection`` is the whole of it: a socket, a reader callback, an outbound queue for what
the kernel did not take, and a deadline for closing. It knows nothing of WebSocket or SSE:
``WebSocketConnection`` hands what it reads to the protocol (``protocol.py``) and does what the
protocol's state says; an event stream writes its records and reads nothing.

Writes go straight to the socket when nothing is queued (one ``send`` per client per flush, no
Future, no copy), and queue the shared payload otherwise. ``buffered()`` is what the queue holds
— its unsent bytes and ``ENTRY_COST`` per entry — the one number the slow-consumer limit reads;
every payload that enters or leaves a queue is reported to the relay's ``Buffers``, which caps
what all the queues take together.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from tornado.iostream import StreamClosedError

from . import frames
from .buffers import ENTRY_COST, Buffers
from .disconnect import CLOSES
from .protocol import CLOSED, FAILED, OPEN, State, WebSocketProtocol

# Seconds a peer gets to read our last bytes (and answer a close frame) before the connection is
# reset (Tornado's figure for the closing handshake).
CLOSE_TIMEOUT = 5.0
# SO_LINGER on, for 0 seconds: close() then resets the connection and discards unsent bytes.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
# Many small queued payloads (live events behind a slow reader) go out joined, up to this many
# bytes per send(): one syscall instead of one per event, and no more than a socket buffer takes.
SEND_BATCH = 64 * 1024
# The most one recv() reads. Clients send little (control frames, messages of a few KiB), and a
# bound keeps what one read costs us bounded.
RECV_BYTES = 64 * 1024
_UNLIMITED = 1 << 62
_A = TypeVar("_A")
_T = TypeVar("_T")


class _Stage(enum.IntEnum):
    OPEN = 0    # reading and writing
    ENDED = 1   # nothing more may be written; what is queued still goes out
    CLOSED = 2  # the socket is closed


class Connection:
    """One open connection on a non-blocking socket.

    Subclasses say what bytes mean: ``data_received`` (by default a peer that speaks when it has
    nothing to say is not read any further), ``eof_received`` (by default the connection is gone)
    and ``queue_shrank``, called when queued bytes went out. ``on_close`` is called once, soon
    after the socket is closed (from the loop, like Tornado's close callbacks); ``on_shed`` when
    the relay's unsent bytes are past ``MAX_BUFFERED_BYTES`` and this connection holds the most.
    """

    __slots__ = ("_drain", "_out", "_size", "_stage", "_timer", "buffers", "loop", "on_close",
                 "on_shed", "sock")

    def __init__(self, sock: socket.socket, buffers: Buffers,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.sock = sock
        self.buffers = buffers
        self.loop = loop or asyncio.get_running_loop()
        # only while something waits: an empty deque is 760 B
        self._out: deque[bytes | memoryview] | None = None
        self._size = 0  # what the queue costs: its bytes, and ENTRY_COST per entry
        self._drain: list[Callable[[], None]] | None = None
        self._stage = _Stage.OPEN
        self._timer: asyncio.TimerHandle | None = None
        self.on_close: Callable[[], None] = _nothing
        self.on_shed: Callable[[], None] = _nothing
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def closed(self) -> bool:
        return self._stage is _Stage.CLOSED

    def start(self, pending_out: bytes = b"", pending_in: bytes = b"") -> None:
        """Begin reading; ``pending_*`` are bytes the handshake's stream had not moved yet."""
        if pending_out:
            self._queue(pending_out)
        self.loop.add_reader(self.sock.fileno(), self._readable)
        if pending_in:
            self.loop.call_soon(self._received, pending_in)

    # -- what the bytes mean: for subclasses -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from a peer that has nothing to say (an event stream's, once its request is
        in): they are discarded and the peer is not read any more; its end shows when a write
        fails."""
        self.stop_reading()

    def eof_received(self) -> None:
        """The peer has sent all it will: by default it is gone."""
        self.abort()

    def queue_shrank(self) -> None:
        """Queued bytes went to the kernel (``buffered()`` says how many are left)."""

    # -- writing -------------------------------------------------------------------------------

    def buffered(self) -> int:
        """What is queued and not yet with the kernel: its bytes, and ENTRY_COST per entry."""
        return self._size

    def write(self, data: bytes) -> None:
        """Write ``data`` in order after everything written before; raise StreamClosedError."""
        self.write_within(data, _UNLIMITED)

    def write_within(self, data: bytes, limit: int) -> bool:
        """Write ``data`` unless that would queue more than ``limit``; False if not.

        This is the per-client, per-flush call of the fan-out: one call, one syscall.
        """
        if self._stage:
            raise StreamClosedError()
        queued = self._size
        if queued:
            if queued + len(data) + ENTRY_COST > limit:
                return False
            self._queue(data)
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.abort()
            raise StreamClosedError(real_error=exc) from exc
        if sent < len(data):
            # Nothing was queued before, so this client is not slow: queue the rest whatever
            # its size (one batch can exceed the limit; a backlog of them cannot).
            self._queue(memoryview(data)[sent:])
        return True

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything queued is with the kernel (or the socket is gone)."""
        if not self._size or self.closed:
            self.loop.call_soon(callback)
            return
        if self._drain is None:
            self._drain = []
        self._drain.append(callback)

    def end(self) -> None:
        """Nothing more will be written: later writes raise StreamClosedError."""
        if self._stage is _Stage.OPEN:
            self._stage = _Stage.ENDED

    def drop_unsent(self) -> None:
        """Forget queued bytes, except a chunk already partly sent: its frame stays whole."""
        out = self._out
        if not out:
            return
        if isinstance(out[0], memoryview):  # the tail of a partial send()
            while len(out) > 1:
                self._dequeued(out.pop())
        else:
            self._out = None
            self.loop.remove_writer(self.sock.fileno())
            while out:
                self._dequeued(out.pop())

    def write_eof(self) -> None:
        """Tell the peer we are done writing (TCP FIN), and keep reading."""
        if not self.closed:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.abort()

    def finish_within(self, seconds: float) -> None:
        """Nothing more will be written: once what is queued is out, tell the peer (FIN) and
        close when it closes its end — in ``seconds`` at the latest."""
        self.end()
        self.when_drained(self.write_eof)
        self.close_within(seconds)

    def shed(self) -> None:
        """The relay holds too many unsent bytes, and this connection the most: its owner cuts
        it off (``on_shed``); one already ending gets no more time and is reset."""
        if self._stage is _Stage.OPEN:
            self.on_shed()
        else:
            self.reset()

    def _queue(self, data: bytes | memoryview) -> None:
        """Keep ``data`` to send after what is queued, when the socket can take it."""
        out = self._out
        if out is None:
            self.loop.add_writer(self.sock.fileno(), self._writable)
            out = self._out = deque()
        out.append(data)
        self._size += len(data) + ENTRY_COST
        self.buffers.queued(self, _payload(data), self._size)

    def _dequeued(self, entry: bytes | memoryview) -> None:
        """``entry`` left the queue: sent, or dropped."""
        self._size -= len(entry) + ENTRY_COST
        self.buffers.dequeued(self, _payload(entry), self._size)

    def _writable(self) -> None:
        out = self._out
        while out:
            chunk = out[0]
            if len(out) > 1 and len(chunk) < SEND_BATCH:
                chunk = self._join_head(out)
            sent = self._attempt(self.sock.send, chunk)
            if sent is None:
                return
            if sent < len(chunk):
                out[0] = memoryview(chunk)[sent:]  # the same payload, less of it unsent
                self._size -= sent
                break
            self._dequeued(out.popleft())
        if not out:
            self.loop.remove_writer(self.sock.fileno())
            self._out = None
        self.queue_shrank()  # may queue again
        if self._size or self.closed:
            return
        self._drained()

    def _join_head(self, out: deque[bytes | memoryview]) -> bytes:
        """Join the first entries, up to SEND_BATCH bytes, into one: the new head."""
        parts: list[bytes | memoryview] = []
        size = 0
        while out and size < SEND_BATCH:
            part = out.popleft()
            parts.append(part)
            size += len(part)
            self._dequeued(part)
        chunk = b"".join(parts)
        out.appendleft(chunk)
        self._size += len(chunk) + ENTRY_COST
        self.buffers.queued(self, chunk, self._size)
        return chunk

    def _drained(self) -> None:
        callbacks, self._drain = self._drain, None
        for callback in callbacks or ():
            callback()

    def _attempt(self, call: Callable[[_A], _T], argument: _A) -> _T | None:
        """``call(argument)`` on the non-blocking socket; None when the kernel would block, and
        when the socket failed (it is then aborted)."""
        try:
            return call(argument)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.abort()
            return None

    # -- reading -------------------------------------------------------------------------------

    def _readable(self) -> None:
        data = self._attempt(self.sock.recv, RECV_BYTES)
        if data is None:
            return
        if data:
            self.data_received(data)
        else:
            self.eof_received()

    def _received(self, data: bytes) -> None:
        """Bytes the handshake's stream had read for us, unless the socket is gone since."""
        if not self.closed:
            self.data_received(data)

    def stop_reading(self) -> None:
        if not self.closed:
            self.loop.remove_reader(self.sock.fileno())

    # -- closing -------------------------------------------------------------------------------

    def close_within(self, seconds: float) -> None:
        """Close the socket in ``seconds`` at the latest, whatever the peer does: by then a peer
        that has not read what we sent is reset."""
        if self._timer is None and not self.closed:
            self._timer = self.loop.call_later(seconds, self._time_is_up)

    def _time_is_up(self) -> None:
        if self._size or _unacknowledged(self.sock):
            self.reset()
        else:
            self.abort()  # it read everything: an ordinary close (FIN)

    def reset(self) -> None:
        """Close now with a reset (RST). A plain close leaves what the peer has not read with
        the kernel, which offers it to a zero window for minutes while the peer, never reading,
        sees an open connection; a reset frees both ends at once."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            self.abort()

    def abort(self) -> None:
        """Close the socket now, whatever its state; tell the owner once."""
        if self.closed:
            return
        self._stage = _Stage.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        fd = self.sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            if self._out is not None:
                self.loop.remove_writer(fd)
        self.sock.close()
        out, self._out = self._out, None
        while out:
            self._dequeued(out.pop())
        self._drained()
        # Never from inside the write that failed: its caller (the hub, mid-way through a flush
        # or a resume) would see the client leave under its feet.
        on_close, self.on_close = self.on_close, _nothing
        self.on_shed = _nothing
        self.loop.call_soon(on_close)


class WebSocketConnection(Connection):
    """The server end of an open WebSocket: the socket's bytes go through ``protocol``.

    ``on_pong`` is called for every read that brought a pong. Writes after our close frame
    raise ``StreamClosedError``, as they would on a Tornado stream.
    """

    __slots__ = ("on_pong", "protocol")

    def __init__(self, sock: socket.socket, buffers: Buffers, protocol: WebSocketProtocol,
                 loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(sock, buffers, loop)
        self.protocol = protocol
        self.on_pong: Callable[[], None] = _nothing

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        before = protocol.state
        reply, ponged = protocol.receive(data, self._size, self.loop.time())
        if ponged:
            self.on_pong()
        if not protocol.listening:  # past its frame budget: what it sends next stays unread
            self.stop_reading()
        self._act(before, reply)

    def eof_received(self) -> None:
        if self.protocol.state is not OPEN and self._size:
            # The peer has said all it will (FIN) but may still read: our close frame is
            # queued, so stop reading and close once it is sent (or at the timeout).
            self.stop_reading()
            self.when_drained(self.abort)
            return
        self.abort()

    def queue_shrank(self) -> None:
        self._send(self.protocol.owed_pong(self._size))

    def close(self, code: int = frames.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the socket closes when the peer answers, or at the
        CLOSE_TIMEOUT."""
        if not self.closed:
            before = self.protocol.state
            self._act(before, self.protocol.close(code, reason))

    def shutdown(self) -> None:
        """The relay is stopping: going away (1001)."""
        self.close(*CLOSES["shutdown"].frame)

    def abort(self) -> None:
        super().abort()
        self.on_pong = _nothing

    def _act(self, before: State, reply: bytes) -> None:
        """Send ``reply`` and do what the protocol's move from state ``before`` asks."""
        state = self.protocol.state
        if state is before:
            self._send(reply)
            return
        if state is CLOSED and before is OPEN:
            # The peer closed: answer as soon as practical, since what is still queued it will
            # not read; then close once the answer is sent.
            self.drop_unsent()
        self._send(reply)
        if state is FAILED:
            # We will not read the peer's answer, so say we are done.
            self.finish_within(CLOSE_TIMEOUT)
            return
        self.end()
        if state is CLOSED:
            self.when_drained(self.abort)
        self.close_within(CLOSE_TIMEOUT)  # a peer that stops reading our last frame

    def _send(self, data: bytes) -> None:
        if data:
            with contextlib.suppress(StreamClosedError):  # the socket failed: abort() has run
                self.write(data)


def _nothing() -> None:
    pass


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes the kernel still holds for the peer, unsent or unacknowledged (SIOCOUTQ); where
    that cannot be asked, 1: as if the peer had not read them."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except OSError:
        return 1


def _payload(entry: bytes | memoryview) -> bytes:
    """The payload a queue entry holds: itself, or the one a partly sent entry is a view of."""
    return entry.obj if isinstance(entry, memoryview) else entry  # type: ignore[return-value]
