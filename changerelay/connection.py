"""One WebSocket after its handshake, on a bare non-blocking socket.

Tornado keeps a handler, a request, an IOStream, a protocol object and a chain of coroutines alive
for every open WebSocket. A relay holds thousands of connections that mostly wait, and what they
wait for is bytes we already built, so this is the whole of it: a socket, a reader callback, an
outbound queue for what the kernel did not take, and the closing handshake. The protocol itself
is in ``frames.py``.

Writes go straight to the socket when nothing is queued (one ``send`` per client per flush, no
Future), and queue otherwise; ``buffered()`` is the one number the slow-consumer limit reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable

from tornado.iostream import StreamClosedError

from . import frames

CLOSE_TIMEOUT = 5.0  # seconds the peer gets to answer our close frame (Tornado's figure)
_COALESCE = 64 * 1024
_RECV = 65536


class WebSocketConnection:
    """The server end of an open WebSocket.

    ``on_pong`` is called for every pong; ``on_close`` once, soon after the socket is closed
    (from the loop, like Tornado's close callbacks). Writes after our close frame raise
    ``StreamClosedError``, as they would on a Tornado stream.
    """

    __slots__ = ("_closing", "_drain", "_out", "_pong", "_reader", "_size", "_timer", "closed",
                 "loop", "on_close", "on_pong", "sock")

    def __init__(self, sock: socket.socket, reader: frames.FrameReader,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self._reader: frames.FrameReader | None = reader
        self._out: deque | None = None  # only while something waits: an empty deque is 760 B
        self._size = 0
        self._drain: list[Callable[[], None]] | None = None
        self._closing = False  # our close frame is queued: nothing more may be written
        self._timer: asyncio.TimerHandle | None = None
        self._pong: bytes | None = None  # the latest ping's payload, while a long queue waits
        self.closed = False
        self.on_pong: Callable[[], None] = _nothing
        self.on_close: Callable[[], None] = _nothing
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self, pending_out: bytes = b"", pending_in: bytes = b"") -> None:
        """Begin reading; ``pending_*`` are bytes the handshake's stream had not moved yet."""
        if pending_out:
            self._queue(pending_out)
        self.loop.add_reader(self.sock.fileno(), self._readable)
        if pending_in:
            self.loop.call_soon(self._received, pending_in)

    # -- writing -------------------------------------------------------------------------------

    def buffered(self) -> int:
        """Bytes accepted but not yet handed to the kernel."""
        return self._size

    def write(self, data: bytes) -> None:
        self.write_within(data, 1 << 62)

    def write_within(self, data: bytes, limit: int) -> bool:
        """Write ``data`` unless that would queue more than ``limit`` bytes; False if not.

        This is the per-client, per-flush call of the fan-out: one call, one syscall.
        """
        if self._closing:
            raise StreamClosedError()
        if self._size:
            if self._size + len(data) > limit:
                return False
            self._queue(data)
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost()
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

    def _queue(self, data) -> None:
        if not self._size:
            self.loop.add_writer(self.sock.fileno(), self._writable)
            self._out = deque()
        self._out.append(data)
        self._size += len(data)

    def _writable(self) -> None:
        out = self._out
        while out:
            chunk = out[0]
            if len(out) > 1 and len(chunk) < _COALESCE:
                # Many small queued payloads (live events behind a slow reader): one send.
                parts, size = [], 0
                while out and size < _COALESCE:
                    part = out.popleft()
                    parts.append(part)
                    size += len(part)
                chunk = b"".join(parts)
                out.appendleft(chunk)
            try:
                sent = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._lost()
                return
            self._size -= sent
            if sent < len(chunk):
                out[0] = memoryview(chunk)[sent:]
                break
            out.popleft()
        if not out:
            self.loop.remove_writer(self.sock.fileno())
            self._out = None
        if self._pong is not None and self._size < _COALESCE:
            self._answer_ping()  # may queue again
        if self._size or self.closed:
            return
        self._drained()

    def _drained(self) -> None:
        callbacks, self._drain = self._drain, None
        for callback in callbacks or ():
            callback()

    # -- reading -------------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        if not data:
            if self._closing and self._size:
                # The peer has said all it will (FIN) but may still read: our close frame
                # is queued, so stop reading and close once it is sent (or at the timeout).
                self.loop.remove_reader(self.sock.fileno())
                self.when_drained(self._lost)
                return
            self._lost()
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        if self._reader is None or self.closed:
            return  # failed or closing after a protocol error: discard until the peer goes
        try:
            messages = self._reader.feed(data)
        except frames.ProtocolError as exc:
            self._reader = None
            self.close(exc.code, exc.reason)
            return
        for opcode, payload in messages:
            if opcode == frames.PING:
                # A peer that pings without reading gets no pongs piling up here: behind a
                # long queue, only the latest ping is answered, once the queue is short (RFC
                # 6455 §5.5.3).
                self._pong = payload
                if self._size < _COALESCE:
                    self._answer_ping()
                    if self.closed:
                        return
            elif opcode == frames.PONG:
                self.on_pong()
            elif opcode == frames.CLOSE:
                self._peer_closed(payload)
                return
            # Text and binary messages: clients have nothing to tell a relay; ignored.

    def _answer_ping(self) -> None:
        payload, self._pong = self._pong, None
        if not self._closing:
            with contextlib.suppress(StreamClosedError):
                self.write(frames.ws_frame(payload, frames.PONG))

    def _peer_closed(self, payload: bytes) -> None:
        if not self._closing:
            # Answer with the same code (RFC 6455 §5.5.1), as soon as practical: what is still
            # queued the peer will not read. Then close once the answer is sent.
            self._drop_unsent()
            self._queue_close(frames.ws_frame(payload[:2], frames.CLOSE))
        self._reader = None
        self.when_drained(self._lost)
        if self._timer is None and not self.closed:  # a peer that stops reading our reply
            self._timer = self.loop.call_later(CLOSE_TIMEOUT, self._lost)

    def _drop_unsent(self) -> None:
        """Forget queued bytes, except a chunk already partly sent: its frame stays whole."""
        out = self._out
        if not out:
            return
        first = out[0]
        out.clear()
        if isinstance(first, memoryview):  # the tail of a partial send()
            out.append(first)
            self._size = len(first)
        else:
            self._out, self._size = None, 0
            self.loop.remove_writer(self.sock.fileno())

    # -- closing -------------------------------------------------------------------------------

    def close(self, code: int = frames.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the socket closes when the peer answers, or in 5 s."""
        if self._closing or self.closed:
            return
        self._queue_close(frames.close_frame(code, reason))
        if self.closed:
            return  # the socket failed as we wrote to it
        if self._reader is None:
            # We failed the connection: we will not read its answer, so say we are done.
            self.when_drained(self._shutdown_write)
        self._timer = self.loop.call_later(CLOSE_TIMEOUT, self._lost)

    def _queue_close(self, frame: bytes) -> None:
        with contextlib.suppress(StreamClosedError):  # the socket failed: _lost has run
            self.write(frame)
        self._closing = True

    def _shutdown_write(self) -> None:
        if not self.closed:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._lost()

    def shutdown(self) -> None:
        """The relay is stopping: going away (1001)."""
        self.close(frames.GOING_AWAY, "server shutting down")

    def _lost(self) -> None:
        """Close the socket now, whatever its state; tell the owner once."""
        if self.closed:
            return
        self.closed = True
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        fd = self.sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            if self._size:
                self.loop.remove_writer(fd)
        self.sock.close()
        self._out = None
        self._size = 0
        self._drained()
        # Never from inside the write that failed: its caller (the hub, mid-way through a flush
        # or a resume) would see the client leave under its feet.
        on_close, self.on_close, self.on_pong = self.on_close, _nothing, _nothing
        self.loop.call_soon(on_close)


def _nothing() -> None:
    pass
