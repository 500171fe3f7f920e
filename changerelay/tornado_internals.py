"""The one place that reaches into Tornado's internals, so an upgrade breaks loudly here only.

* ``take_socket``: once its handshake is answered — a WebSocket's 101, an event stream's
  headers — a connection leaves Tornado for a ``connection.Connection``. Tornado's write path
  copies small writes into each stream's own buffer and makes a Future per write; a relay's
  stalled clients would each hold their own copies of what they were sent, beyond what the
  slow-consumer limit counts.
* ``http_chunked``: whether Tornado framed the event stream's body in HTTP/1.1 chunks when it
  wrote the headers; ``chunk`` and ``LAST_CHUNK`` frame the rest exactly as it would.

The relay serves plain TCP (TLS ends at a proxy, see the README): a TLS stream's socket could not
be taken over. ``tests/test_tornado_internals.py`` pins the private attributes used here.
"""

from __future__ import annotations

import socket

from tornado import web
from tornado.iostream import IOStream, StreamClosedError

# The end of a chunked body (RFC 9112 §7.1), as Tornado's HTTP1Connection.finish writes it.
LAST_CHUNK = b"0\r\n\r\n"


def take_socket(stream: IOStream) -> tuple[socket.socket, bytes, bytes]:
    """Take the socket out of a detached stream: ``(socket, unread bytes, unwritten bytes)``.

    After a handshake we drop Tornado's stream and run the connection ourselves
    (``connection.py``). The stream may hold bytes it read past the request (a client that sent
    a frame right behind its handshake) and the tail of the response's head; both are handed
    over.
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


def http_chunked(handler: web.RequestHandler) -> bool:
    """True if the response body goes out in HTTP/1.1 chunks (we then frame our writes so)."""
    return bool(getattr(handler.request.connection, "_chunking_output", False))


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk, exactly as Tornado's HTTP1Connection would frame it."""
    return b"%x\r\n" % len(data) + data + b"\r\n"
