"""An open WebSocket's state without I/O: bytes in, bytes to send and state out.

In the spirit of the ``websockets`` library's ``Protocol``: the closing handshake, the ping/pong
policy and the connection's state live here, on bytes alone, so that every sequence of frames can
be tested without a socket. ``connection.py`` moves the bytes and acts on ``state``.
"""

from __future__ import annotations

import enum

from . import frames

# Pings are answered at once while fewer bytes than this wait to be sent. Behind more (a replay,
# a slow reader), a pong would wait its turn anyway: only the latest ping is answered, once the
# queue is this short (RFC 6455 §5.5.3 allows it), so a peer that pings without reading cannot
# pile pongs up in our memory.
PONG_BACKLOG = 64 * 1024


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

    __slots__ = ("_owed_pong", "_reader", "sent_close", "state")

    def __init__(self, max_message: int, deflate: bool = False):
        self._reader = frames.FrameReader(max_message, deflate)
        self.state = OPEN
        self.sent_close: tuple[int, str] | None = None  # (code, reason) of a Close we began
        self._owed_pong: bytes | None = None  # the latest ping's payload, while a long queue waits

    def receive(self, data: bytes, queued: int) -> tuple[bytes, bool]:
        """Handle ``data`` from the peer while ``queued`` bytes of ours wait to be sent."""
        if self.state is not OPEN and self.state is not CLOSING:
            return b"", False  # the handshake is over or failed: bytes are discarded
        reply: list[bytes] = []
        ponged = False
        for opcode, payload in self._reader.feed(data):
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
        error = self._reader.error
        if error is not None:
            self._fail(error, reply)
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

    def _fail(self, error: frames.ProtocolError, reply: list[bytes]) -> None:
        if self.state is OPEN:
            self._say_goodbye(error.code, error.reason, reply)
        self.state = FAILED

    def _say_goodbye(self, code: int, reason: str, reply: list[bytes]) -> None:
        """Our Close frame is the last we send: a pong still owed goes before it (§5.5.2)."""
        if self._owed_pong is not None:
            reply.append(frames.ws_frame(self._owed_pong, frames.PONG))
            self._owed_pong = None
        reply.append(frames.close_frame(code, reason))
        self.sent_close = code, reason
