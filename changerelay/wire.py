"""The one place that reaches into Tornado's internals, so an upgrade breaks loudly here only.

Tornado's public path for a WebSocket message builds a frame, a Future and a Task per client per
message. For a relay that sends the same bytes to thousands of clients that bookkeeping is most of
the CPU, so we write pre-built frames straight to the socket when the stream has nothing queued,
and fall back to ``IOStream.write`` (which queues and flushes on writability) for whatever the
kernel does not take. Queued bytes are measured on the stream's own buffer, so the slow-consumer
limit and Tornado agree on one number.

``tests/test_wire.py`` pins the private attributes used here.
"""

from __future__ import annotations

from tornado.iostream import IOStream, StreamClosedError


class StreamWriter:
    """Writes bytes to an ``IOStream`` without per-write Futures when it can."""

    __slots__ = ("_buffer", "_direct", "stream")

    def __init__(self, stream: IOStream):
        self.stream = stream
        self._buffer = stream._write_buffer
        # TLS streams have their own state machine around the socket: always go through Tornado.
        self._direct = type(stream) is IOStream

    def buffered(self) -> int:
        """Bytes accepted but not yet handed to the kernel."""
        return self._buffer._size

    def write(self, data: bytes) -> None:
        """Write ``data`` in order after everything written before; raise StreamClosedError."""
        self.write_within(data, 1 << 62)

    def write_within(self, data: bytes, limit: int) -> bool:
        """Write ``data`` unless that would queue more than ``limit`` bytes; False if not.

        This is the per-client, per-flush call of the fan-out: one call, one syscall.
        """
        queued = self._buffer._size
        stream = self.stream
        if queued or not self._direct:
            if queued + len(data) > limit:
                return False
            stream.write(data)
            return True
        sock = stream.socket
        if sock is None:
            raise StreamClosedError()
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            stream.close(exc_info=exc)
            raise StreamClosedError(real_error=exc) from exc
        if sent < len(data):
            # Nothing was queued before, so this client is not slow: queue the rest whatever
            # its size (one batch can exceed the limit; a backlog of them cannot).
            stream.write(memoryview(data)[sent:])
        return True


class DeflateWriter:
    """The writer for a permessage-deflate connection, where frames cannot be shared.

    It takes the same pre-built frames and hands each text message to Tornado's
    ``write_message``, which compresses it with the connection's own state; control frames
    (pings) are never compressed and go out as they are. Rare path: deflate is off by default.
    """

    __slots__ = ("_buffer", "handler", "stream")

    def __init__(self, handler):
        self.handler = handler
        self.stream = ws_stream(handler)
        self._buffer = self.stream._write_buffer

    def buffered(self) -> int:
        return self._buffer._size

    def write(self, data: bytes) -> None:
        self.write_within(data, 1 << 62)

    def write_within(self, data: bytes, limit: int) -> bool:
        if self.stream.closed():
            raise StreamClosedError()
        if self._buffer._size + len(data) > limit:
            return False
        for opcode, frame, payload in split_frames(data):
            if opcode == 0x1:
                self.handler.write_message(bytes(payload).decode())
            else:
                self.stream.write(bytes(frame))
        return True


def split_frames(data: bytes):
    """``(opcode, whole frame, payload)`` for each unmasked frame in ``data``."""
    view, offset = memoryview(data), 0
    while offset < len(view):
        start, opcode, length = offset, view[offset] & 0x0F, view[offset + 1] & 0x7F
        offset += 2
        if length == 126:
            length = int.from_bytes(view[offset:offset + 2], "big")
            offset += 2
        elif length == 127:
            length = int.from_bytes(view[offset:offset + 8], "big")
            offset += 8
        yield opcode, view[start:offset + length], view[offset:offset + length]
        offset += length


def ws_stream(handler) -> IOStream:
    """The IOStream under an accepted ``WebSocketHandler``."""
    return handler.ws_connection.stream


def ws_compressed(handler) -> bool:
    """True if permessage-deflate was negotiated: frames then differ per client."""
    return getattr(handler.ws_connection, "_compressor", None) is not None


def http_stream(handler) -> IOStream:
    """The IOStream under a plain ``RequestHandler`` (for SSE)."""
    return handler.request.connection.stream


def http_chunked(handler) -> bool:
    """True if the response body goes out in HTTP/1.1 chunks (we then frame our writes so)."""
    return bool(getattr(handler.request.connection, "_chunking_output", False))


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk, exactly as Tornado's HTTP1Connection would frame it."""
    return b"%x\r\n" % len(data) + data + b"\r\n"
