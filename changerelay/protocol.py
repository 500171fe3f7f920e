"""An open WebSocket's state without I/O: bytes in, bytes to send and state out.

In the spirit of the ``websockets`` library's ``Protocol``: the closing handshake, the ping/pong
policy and the connection's state live here, on bytes alone, so that every sequence of frames can
be tested without a socket. ``connection.py`` moves the bytes and acts on ``state``.
"""

from __future__ import annotations

import enum

from . import frames
from .disconnect import CLOSES

# Pings are answered at once while fewer bytes than this wait to be sent. Behind more (a replay,
# a slow reader), a pong would wait its turn anyway: only the latest ping is answered, once the
# queue is this short (RFC 6455 §5.5.3 allows it), so a peer that pings without reading cannot
# pile pongs up in our memory.
PONG_BACKLOG = 64 * 1024
# What a peer's frames may cost us: each frame it sends (ping, pong, message, continuation
# fragment, however small) and each read that completes none is charged against a bucket of
# FRAME_BURST that refills at FRAMES_PER_SECOND. A browser answers our pings (one per
# WS_PING_INTERVAL, 20 s) and says nothing else; the websockets library pings every 20 s too; the
# largest burst we know of is Autobahn's 1,000 messages at once (cases 9.7, 9.8). Ten a second is
# a hundred times what a client needs and, at a few microseconds a frame, a few hundredths of a
# percent of the loop per connection; past the bucket, a flood ends at once (1008), having cost
# FRAME_BURST frames, a few milliseconds.
FRAME_BURST = 2000
FRAMES_PER_SECOND = 10
_LONG_AGO = float("-inf")  # a new connection's bucket is full


class State(enum.Enum):
    OPEN = "open"          # messages and control frames flow both ways
    CLOSING = "closing"    # our Close frame is out; the peer's answer is awaited
    CLOSED = "closed"      # both Close frames are out: the TCP connection ends (§7.1.1)
    FAILED = "failed"      # we failed the connection (§7.1.7): our Close is out, nothing is read


OPEN, CLOSING, CLOSED, FAILED = State.OPEN, State.CLOSING, State.CLOSED, State.FAILED


class WebSocketProtocol:
    """The server side of one WebSocket after its handshake.

    ``receive`` takes what the peer sent and returns ``(bytes to send, whether a pong came)``;
    ``close`` starts our closing handshake; ``state`` says what the connection must do next.
    Frames are handled in the order they came, so a ping read together with a bad frame or a
    Close still gets its pong, and a Close ends the stream whatever follows it.
    """

    __slots__ = ("_owed_pong", "_reader", "_refilled", "_tokens", "listening", "sent_close",
                 "state")

    def __init__(self, max_message: int, deflate: bool = False):
        self._reader = frames.FrameReader(max_message, deflate)
        self.state = OPEN
        self.sent_close: tuple[int, str] | None = None  # (code, reason) of a Close we began
        self._owed_pong: bytes | None = None  # the latest ping's payload, while a long queue waits
        self._tokens = float(FRAME_BURST)     # frames the peer may still send (see FRAME_BURST)
        self._refilled = _LONG_AGO
        # False once the peer has spent its frame budget: nothing more is read from it.
        self.listening = True

    def receive(self, data: bytes, queued: int, now: float) -> tuple[bytes, bool]:
        """Handle ``data`` from the peer while ``queued`` bytes of ours wait to be sent; ``now``
        is the monotonic time in seconds (the frame budget refills with it)."""
        allowance = self._allowance(now)
        if self.state is not OPEN and self.state is not CLOSING:
            # The handshake is over or failed: bytes are discarded, until the budget is spent.
            self._spend(1, allowance)
            return b"", False
        reader = self._reader
        before = reader.frames
        messages = reader.feed(data, allowance)  # what lies past the budget is not read
        read = reader.frames - before
        if read == allowance and reader.pending:
            read += 1  # more came than the budget allows: the frame past it counts as read
        flooded = self._spend(max(1, read), allowance)  # a read that completes none costs one
        reply: list[bytes] = []
        ponged = False
        for opcode, payload in messages:
            if opcode == frames.PING:
                pong = self._pong_for(payload, queued)
                if pong:
                    reply.append(pong)
                    queued += len(pong)
            elif opcode == frames.PONG:
                ponged = True
            elif opcode == frames.CLOSE:
                self._peer_closed(payload, reply)
                return b"".join(reply), ponged
            # Text and binary messages: clients have nothing to tell a relay; ignored.
        if reader.error is not None:
            self._fail(reader.error.code, reader.error.reason, reply)
        elif flooded and self.state is OPEN:
            self._fail(*CLOSES["too_many_frames"].frame, reply)
        return b"".join(reply), ponged

    def owed_pong(self, queued: int) -> bytes:
        """The pong a ping behind a long queue is owed, once the queue is short; else b""."""
        if self._owed_pong is None or queued >= PONG_BACKLOG or self.state is not OPEN:
            return b""
        payload, self._owed_pong = self._owed_pong, None
        return frames.ws_frame(payload, frames.PONG)

    def close(self, code: int = frames.NORMAL, reason: str = "") -> bytes:
        """Start our closing handshake: the bytes to send (none unless the connection is open)."""
        if self.state is not OPEN:
            return b""
        reply: list[bytes] = []
        self._say_goodbye(code, reason, reply)
        self.state = CLOSING
        return b"".join(reply)

    def _allowance(self, now: float) -> int:
        """Whole frames the peer may send now."""
        self._tokens = min(FRAME_BURST,
                           self._tokens + (now - self._refilled) * FRAMES_PER_SECOND)
        self._refilled = now
        return int(self._tokens)

    def _spend(self, frames_read: int, allowance: int) -> bool:
        """Charge what a read cost; True (and no longer listening) if it was past the budget."""
        self._tokens -= frames_read
        if frames_read > allowance:
            self.listening = False
        return not self.listening

    def _pong_for(self, payload: bytes, queued: int) -> bytes:
        """The pong to send now for a ping, or b"" (owed until the queue is short, or none)."""
        if self.state is not OPEN:
            return b""  # nothing follows our Close frame (§5.5.1)
        if queued >= PONG_BACKLOG:
            self._owed_pong = payload
            return b""
        self._owed_pong = None  # this pong answers the earlier pings too (§5.5.3)
        return frames.ws_frame(payload, frames.PONG)

    def _peer_closed(self, payload: bytes, reply: list[bytes]) -> None:
        if self.state is OPEN:
            # Answer with the same code (§5.5.1). A pong still owed is not: the peer has closed
            # (§5.5.2).
            self._owed_pong = None
            reply.append(frames.ws_frame(payload[:2], frames.CLOSE))
        self.state = CLOSED

    def _fail(self, code: int, reason: str, reply: list[bytes]) -> None:
        if self.state is OPEN:
            self._say_goodbye(code, reason, reply)
        self.state = FAILED

    def _say_goodbye(self, code: int, reason: str, reply: list[bytes]) -> None:
        """Our Close frame is the last we send: a pong still owed goes before it (§5.5.2)."""
        if self._owed_pong is not None:
            reply.append(frames.ws_frame(self._owed_pong, frames.PONG))
            self._owed_pong = None
        reply.append(frames.close_frame(code, reason))
        self.sent_close = code, reason
