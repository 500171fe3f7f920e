"""The one place that reaches into Tornado's internals, so an upgrade breaks loudly here only.

* ``take_socket``: once its handshake is answered — a WebSocket's 101, an event stream's
  headers — a connection leaves Tornado for a ``connection.Connection``. Tornado's write path
  copies small writes into each stream's own buffer and makes a Future per write; a relay's
  stalled clients would each hold their own copies of what they were sent, beyond what the
  slow-consumer limit counts.
* ``http_chunked``: whether Tornado framed the event stream's body in HTTP/1.1 chunks when it
  wrote the headers; ``chunk`` and ``LAST_CHUNK`` frame the rest exactly as it would.
* ``GatedServer``: Tornado's HTTP server for connections whose request head the gate has read
  (``gate.py``): it is handed the socket with the bytes read so far, serves one request, and
  hands a connection that stays open back to the gate for its next head.

The relay serves plain TCP (TLS ends at a proxy, see the README): a TLS stream's socket could not
be taken over. ``tests/test_tornado_internals.py`` pins the private attributes used here.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from tornado import httpserver, httputil, web
from tornado.http1connection import (
    HTTP1Connection,
    HTTP1ConnectionParameters,
    HTTP1ServerConnection,
)
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.log import gen_log

Address = Any  # a peer's address as socket.accept() gives it
NextHead = Callable[[socket.socket, Address, bytes], None]

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


class GatedServer(httpserver.HTTPServer):
    """Tornado's HTTP server, given connections whose head has been read already (``serve``);
    ``next_head`` takes a connection back once its request is answered and it stays open."""

    next_head: NextHead

    def serve(self, sock: socket.socket, address: Address, data: bytes) -> None:
        """Serve the request whose head (and whatever followed it) ``data`` holds."""
        stream = IOStream(sock, max_buffer_size=self.max_buffer_size,
                          read_chunk_size=self.read_chunk_size)
        stream._read_buffer += data  # as if the stream had read it: Tornado parses it from here
        stream._read_buffer_size += len(data)
        self.handle_stream(stream, address)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        context = httpserver._HTTPRequestContext(stream, address, self.protocol,
                                                 self.trusted_downstream)
        connection = _OneRequest(stream, self.conn_params, context,
                                 lambda sock, unread: self.next_head(sock, address, unread))
        self._connections.add(connection)
        connection.start_serving(self)


class _OneRequest(HTTP1ServerConnection):
    """One request of a connection: Tornado's own request loop (``HTTP1ServerConnection.
    _server_request_loop``) run once; a connection still open after its response is handed on
    (``then``) with the bytes read past the request, instead of read again here."""

    def __init__(self, stream: IOStream, params: HTTP1ConnectionParameters,
                 context: httpserver._HTTPRequestContext,
                 then: Callable[[socket.socket, bytes], None]):
        super().__init__(stream, params, context)
        self.then = then

    async def _server_request_loop(
            self, delegate: httputil.HTTPServerConnectionDelegate) -> None:
        try:
            request = HTTP1Connection(self.stream, False, self.params, self.context)
            try:
                kept = await request.read_response(delegate.start_request(self, request))
            except (StreamClosedError, UnsatisfiableReadError, asyncio.CancelledError):
                return
            except Exception:
                gen_log.error("Uncaught exception", exc_info=True)
                request.close()
                return
            # A detached stream (a WebSocket) has left already, and a closed one needs nothing.
            if kept and not self.stream.closed() and self.stream.socket is not None:
                sock, unread, _ = take_socket(self.stream)  # the response is all sent by now
                self.then(sock, unread)
        finally:
            delegate.on_close(self)
