"""The one place that reaches into Tornado's internals, so an upgrade breaks loudly here only.

* ``StreamWriter``: Server-Sent Events responses are Tornado streams. Tornado's public write path
  makes a Future per write; for bytes shared by thousands of clients we write straight to the
  socket when the stream has nothing queued (``connection.Writer``, as WebSockets do) and fall
  back to ``IOStream.write`` for what the kernel does not take. Queued bytes are read off the
  stream's own buffer, so the slow-consumer limit and Tornado agree on one number.
* ``take_socket``: a WebSocket leaves Tornado after its handshake (see ``connection.py``).

The relay serves plain TCP (TLS ends at a proxy, see the README): a TLS stream's socket could not
be written to directly. ``tests/test_tornado_internals.py`` pins the private attributes used here.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from .connection import Writer


class StreamWriter(Writer):
    """Writes bytes to an ``IOStream`` without per-write Futures when it can."""

    __slots__ = ("_buffer", "stream")
    _stage = 0  # never ended here: Tornado's stream refuses writes itself once closed

    def __init__(self, stream: IOStream):
        self.stream = stream
        self._buffer = stream._write_buffer

    @property
    def _size(self) -> int:
        return self._buffer._size

    @property
    def sock(self) -> socket.socket:
        if self.stream.socket is None:
            raise StreamClosedError()
        return self.stream.socket

    def _queue(self, data: bytes | memoryview) -> None:
        self.stream.write(data)

    def _broken(self, exc: OSError) -> None:
        self.stream.close(exc_info=exc)

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything queued is with the kernel."""
        self.stream.write(b"").add_done_callback(lambda _: callback())

    def close_within(self, seconds: float) -> None:
        stream = self.stream

        def close() -> None:
            if not stream.closed():
                stream.close()

        stream.io_loop.call_later(seconds, close)


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
    # The stream is dropped; nothing in it may touch the socket again.
    stream.socket = None  # type: ignore[assignment]
    return sock, unread, b"".join(unwritten)


def http_stream(handler: web.RequestHandler) -> IOStream:
    """The IOStream under a plain ``RequestHandler`` (for SSE)."""
    connection = handler.request.connection
    if not isinstance(connection, HTTP1Connection):  # the only kind Tornado's server makes
        raise TypeError(f"an event stream needs an HTTP/1.x connection, not {connection!r}")
    return connection.stream


def http_chunked(handler: web.RequestHandler) -> bool:
    """True if the response body goes out in HTTP/1.1 chunks (we then frame our writes so)."""
    return bool(getattr(handler.request.connection, "_chunking_output", False))


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk, exactly as Tornado's HTTP1Connection would frame it."""
    return b"%x\r\n" % len(data) + data + b"\r\n"
