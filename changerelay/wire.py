"""The one place that reaches into Tornado's internals, so an upgrade breaks loudly here only.

* ``StreamWriter``: Server-Sent Events responses are Tornado streams. Tornado's public write path
  makes a Future per write; for bytes shared by thousands of clients we write straight to the
  socket when the stream has nothing queued and fall back to ``IOStream.write`` for what the
  kernel does not take. Queued bytes are read off the stream's own buffer, so the slow-consumer
  limit and Tornado agree on one number.
* ``take_socket``: a WebSocket leaves Tornado after its handshake (see ``connection.py``).

``tests/test_wire.py`` pins the private attributes used here.
"""

from __future__ import annotations

import socket

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

    def when_drained(self, callback) -> None:
        """Call ``callback`` once everything queued is with the kernel."""
        self.stream.write(b"").add_done_callback(lambda _: callback())

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


def take_socket(stream: IOStream) -> tuple[socket.socket, bytes, bytes]:
    """Take the socket out of a detached stream: ``(socket, unread bytes, unwritten bytes)``.

    After a WebSocket handshake we drop Tornado's stream and run the connection ourselves
    (``connection.py``). The stream may hold bytes it read past the request (a client that sent
    a frame right behind its handshake) and the tail of the 101 response; both are handed over.
    """
    if stream.closed() or stream.socket is None:
        raise StreamClosedError()
    sock = stream.socket
    stream.io_loop.remove_handler(sock)
    unread = bytes(stream._read_buffer[:stream._read_buffer_size])
    buffer, unwritten = stream._write_buffer, []
    while buffer._size:
        chunk = buffer.peek(buffer._size)
        unwritten.append(bytes(chunk))
        buffer.advance(len(chunk))
    stream.socket = None  # the stream is dropped; nothing in it may touch the socket again
    return sock, unread, b"".join(unwritten)


def http_stream(handler) -> IOStream:
    """The IOStream under a plain ``RequestHandler`` (for SSE)."""
    return handler.request.connection.stream


def http_chunked(handler) -> bool:
    """True if the response body goes out in HTTP/1.1 chunks (we then frame our writes so)."""
    return bool(getattr(handler.request.connection, "_chunking_output", False))


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk, exactly as Tornado's HTTP1Connection would frame it."""
    return b"%x\r\n" % len(data) + data + b"\r\n"
