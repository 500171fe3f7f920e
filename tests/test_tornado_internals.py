"""The write paths against Tornado itself: same bytes on the wire, honest buffer accounting.

These tests are the tripwire for a Tornado upgrade: ``changerelay/tornado_internals.py`` uses
private attributes (``IOStream._write_buffer``/``_read_buffer``/``_read_buffer_size``,
``HTTP1Connection._chunking_output``, ``HTTPServer._connections``,
``HTTP1ServerConnection._server_request_loop``, ``httpserver._HTTPRequestContext``) and must fail
here, loudly, if they change.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import socket
import time
import tracemalloc

import pytest
from tornado import httpserver, iostream, netutil, web, websocket
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection

from changerelay import clients, frames
from changerelay import events as ev
from changerelay.buffers import Buffers
from changerelay.connection import Connection
from changerelay.subscription import Subscription
from changerelay.tornado_internals import LAST_CHUNK, GatedServer, chunk, http_chunked, take_socket
from tests.support import masked

EVERYTHING = Subscription()  # no namespace, operation or filter: every event
MESSAGES = ["", "x", "é" * 40, "a" * 125, "b" * 126, "c" * 65535, "d" * 65536, "e" * 200_000,
            '{"operationType":"insert","fullDocument":{"t":"' + "abc" * 500 + '"}}']


def test_private_attributes_still_exist():
    stream = iostream.IOStream(socket.socket())
    assert len(stream._write_buffer) == 0 and stream._write_buffer._size == 0
    assert callable(stream._write_buffer.peek) and callable(stream._write_buffer.advance)
    assert stream._read_buffer == bytearray() and stream._read_buffer_size == 0
    assert "_chunking_output" in HTTP1Connection.__init__.__code__.co_names
    stream.close()


async def _raw_ws_client(port: int, extensions: str | None = None, then: bytes = b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n{offer}"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode() + then)
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def _read_frame(reader) -> bytes:
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    extra = b""
    if length == 126:
        extra = await reader.readexactly(2)
        length = int.from_bytes(extra, "big")
    elif length == 127:
        extra = await reader.readexactly(8)
        length = int.from_bytes(extra, "big")
    return head + extra + await reader.readexactly(length)


async def test_prebuilt_frames_are_byte_identical_to_write_message():
    opened = asyncio.get_running_loop().create_future()

    class Handler(websocket.WebSocketHandler):
        def open(self):
            opened.set_result(self)

    server = httpserver.HTTPServer(web.Application([(r"/ws", Handler)]))
    [sock] = netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets([sock])
    reader, writer, _ = await _raw_ws_client(sock.getsockname()[1])
    handler = await opened
    for message in MESSAGES:
        await handler.write_message(message)
        theirs = await _read_frame(reader)
        assert frames.ws_frame(message.encode()) == theirs, message[:10]
    writer.close()
    server.stop()


def test_deflated_bodies_are_tornados_without_context_takeover():
    """Tornado compresses the same way when it takes no context (it cannot be made to over the
    wire: its header parser drops valueless parameters such as server_no_context_takeover)."""
    tornado_compressor = websocket._PerMessageDeflateCompressor(persistent=False, max_wbits=None)
    for message in MESSAGES:
        data = message.encode()
        assert frames.deflate(data) == tornado_compressor.compress(data), message[:10]


async def test_take_socket_hands_over_unread_bytes_and_a_working_socket():
    """A client that sends a frame right behind its handshake loses nothing in the hand-over."""
    taken = asyncio.get_running_loop().create_future()

    class Handler(web.RequestHandler):
        def get(self):
            self.set_status(101)
            self.set_header("Upgrade", "websocket")
            self.set_header("Connection", "Upgrade")
            self.finish()
            taken.set_result(take_socket(self.detach()))

    server = httpserver.HTTPServer(web.Application([(r"/ws", Handler)]))
    [sock] = netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets([sock])
    early = masked(b"early bird")
    reader, writer, head = await _raw_ws_client(sock.getsockname()[1], then=early)
    assert head.startswith(b"HTTP/1.1 101")
    ours, unread, unwritten = await taken
    assert unread in (early, b"")  # read with the request, or still in the kernel
    assert unwritten == b""
    rest = b""
    if not unread:
        ours.setblocking(True)
        rest = ours.recv(len(early))
    assert unread + rest == early
    ours.setblocking(True)
    ours.sendall(b"after")
    assert await reader.readexactly(5) == b"after"
    ours.close()
    writer.close()
    server.stop()


async def test_an_event_stream_taken_after_its_headers_is_a_valid_chunked_response():
    """The body Tornado began (its first chunk) and the chunks we write on the taken socket make
    one well-formed HTTP/1.1 response, which a strict client reads to its end."""

    class Handler(web.RequestHandler):
        async def get(self):
            self.set_header("Content-Type", "text/event-stream")
            self.write(b"retry: 1000\n\n")
            await self.flush()
            assert http_chunked(self)
            sock, _, unwritten = take_socket(self.detach())
            sock.setblocking(True)
            sock.sendall(unwritten + chunk(b"data: one\n\n") + chunk(b"data: two\n\n")
                         + LAST_CHUNK)
            sock.close()

    server = httpserver.HTTPServer(web.Application([(r"/events", Handler)]))
    [sock] = netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets([sock])

    def fetch() -> bytes:
        client = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=5)
        client.request("GET", "/events")
        response = client.getresponse()
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        return response.read()  # to the last chunk; a framing error raises

    body = await asyncio.get_running_loop().run_in_executor(None, fetch)
    assert body == b"retry: 1000\n\ndata: one\n\ndata: two\n\n"
    server.stop()


async def test_what_a_stalled_event_stream_holds_is_what_it_counts():
    """The issue: Tornado copied each small write into the stream's own buffer and kept a Future
    per write, so 200 stalled SSE clients took 540 MiB. On a Connection a stalled client holds
    the payloads it was given and a slot each, and counts at least that against its limit."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.socket()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.connect(listener.getsockname())  # and never reads
        ours, _ = listener.accept()
    connection = Connection(ours, Buffers(0, asyncio.get_running_loop().call_soon))
    client = clients.EventStreamClient(connection, True, EVERYTHING, limit=1 << 40, peer="test",
                                       claims=None, on_end=ended)
    events = _events(0, 20_000, size=230)
    for event in events:
        assert event.sse  # the event's own record, which the replay buffer holds anyway
    connection.write(b"\0" * (8 << 20))  # more than the kernel takes: the rest is queued
    counted = connection.buffered()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for event in events:  # a payload per flush, as the hub makes one per group
            client.deliver([event], client.pack([event]))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = connection.buffered() - counted
    assert counted >= held > 0.5 * counted
    connection.abort()
    theirs.close()


class FakeConnection:
    def __init__(self):
        self.queued = 0
        self.data = b""
        self.closed_with = None
        self.on_pong = None
        self.on_shed = None

    def drop_unsent(self):
        self.queued = 0

    def buffered(self):
        return self.queued

    def write(self, data):
        self.data += data
        self.queued += len(data)

    def write_within(self, data, limit):
        if self.queued + len(data) > limit:
            return False
        self.write(data)
        return True

    def close(self, code, reason):
        self.closed_with = (code, reason)


def ended(client):
    raise AssertionError(f"{client} was ended")


def test_client_never_buffers_past_its_limit_and_is_cut_off_with_1013():
    connection = FakeConnection()
    cut = []
    client = clients.WebSocketClient(connection, EVERYTHING, limit=1000, peer="test", claims=None,
                                     on_end=cut.append)
    frame = frames.ws_frame(b"y" * 300)
    for _ in range(10):
        client.send(frame)
    assert connection.queued <= 1000 + clients.LAST_WORDS_ALLOWANCE
    assert connection.data.count(frame) == 3
    assert connection.closed_with == (1013, "slow consumer")
    assert cut == [client]
    assert b'"code":"slow_consumer"' in connection.data


def test_deflate_clients_get_the_compressed_frames_and_plain_control_messages():
    event = ev.encode_change({"_id": {"_data": "82AB"}, "operationType": "insert",
                              "fullDocument": {"t": "x" * 1000}})
    plain = clients.WebSocketClient(FakeConnection(), EVERYTHING, limit=1 << 20, peer="a",
                                    claims=None, on_end=ended)
    deflate = clients.WebSocketClient(FakeConnection(), EVERYTHING, limit=1 << 20, peer="b",
                                      claims=None, on_end=ended, deflate=True)
    assert (plain.encoding, deflate.encoding) == ("ws", "ws-deflate")
    assert plain.pack([event, event]) == event.frame * 2
    assert deflate.pack([event]) == event.deflated and event.deflated[0] == 0xC1
    assert len(event.deflated) < len(event.frame) // 5
    assert deflate.pack_control(b'{"type":"x"}')[0] == 0x81


@pytest.mark.parametrize("chunked", [True, False])
def test_sse_records_are_framed_like_tornado_chunks(chunked):
    client = clients.EventStreamClient(FakeConnection(), chunked, EVERYTHING, limit=1 << 20,
                                       peer="test", claims=None, on_end=ended)
    assert client.encoding == ("sse-chunked" if chunked else "sse")
    event = ev.encode_change({"_id": {"_data": "82AB"}, "operationType": "delete"})
    packed = client.pack([event])
    if chunked:
        size, _, rest = packed.partition(b"\r\n")
        assert int(size, 16) == len(event.sse) and rest == event.sse + b"\r\n"
    else:
        assert packed == event.sse


class DrainableConnection(FakeConnection):
    """A socket whose peer reads ``drain(n)`` bytes when the test says so."""

    def __init__(self):
        super().__init__()
        self.waiting = []

    def when_drained(self, callback):
        self.waiting.append(callback)

    def drain(self, n: int) -> None:
        self.queued = max(0, self.queued - n)
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback()


def _events(start: int, count: int, size: int = 1000):
    return [ev.encode_change({"_id": {"_data": f"82{i:016X}"}, "operationType": "insert",
                              "fullDocument": {"t": "x" * (size - 100)}})
            for i in range(start, start + count)]


def test_a_client_reading_faster_than_live_traffic_is_not_cut_off_behind_a_replay():
    """Live events queued behind a replay count against the limit only until they are written:
    a client that reads 110 KB for every 100 KB of live events catches up, however long."""
    connection = DrainableConnection()
    cut = []
    client = clients.WebSocketClient(connection, EVERYTHING, limit=4_000_000, peer="test",
                                     claims=None, on_end=cut.append)
    history = _events(0, 3000)  # 3 MB: written a chunk at a time as the client reads
    client.replay(history)
    sent, n = list(history), len(history)
    for _ in range(70):  # 7 MB of live events arrive meanwhile: more than the limit
        live = _events(n, 100)
        n += 100
        sent += live
        client.deliver(live, client.pack(live))
        connection.drain(110_000)
        assert not cut
    while client.backlog is not None:
        connection.drain(1 << 30)
    assert connection.data == b"".join(event.frame for event in sent)
    assert not cut


def test_a_client_reading_slower_than_live_traffic_behind_a_replay_is_cut_off():
    connection = DrainableConnection()
    cut = []
    client = clients.WebSocketClient(connection, EVERYTHING, limit=4_000_000, peer="test",
                                     claims=None, on_end=cut.append)
    client.replay(_events(0, 3000))
    n = 3000
    for _ in range(70):
        live = _events(n, 100)
        n += 100
        client.deliver(live, client.pack(live))
        connection.drain(20_000)
    assert cut == [client] and connection.closed_with == (1013, "slow consumer")


# -- GatedServer: Tornado serving heads the gate has read ---------------------------------------


def test_the_server_internals_still_exist():
    server = httpserver.HTTPServer(web.Application([]))
    assert server._connections == set() and server.conn_params.max_header_size
    assert server.max_buffer_size is None and server.read_chunk_size is None
    assert callable(HTTP1ServerConnection._server_request_loop)
    context = httpserver._HTTPRequestContext(iostream.IOStream(socket.socket()), ("1.2.3.4", 5),
                                             None, None)
    assert (context.remote_ip, context.protocol) == ("1.2.3.4", "http")


async def _until_closed(client: socket.socket) -> bytes:
    loop, reply = asyncio.get_running_loop(), b""
    async with asyncio.timeout(3):
        while chunk := await loop.sock_recv(client, 65536):
            reply += chunk
    return reply


def _gated_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection (the address family tells Tornado the peer is an IP)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        relay_end, _ = listener.accept()
    relay_end.setblocking(False)
    client.setblocking(False)
    return relay_end, client


async def test_a_gated_server_serves_one_request_and_hands_back_what_follows():
    """A request whose head was read already is served from the bytes handed over; a kept-alive
    connection comes back with the next request's bytes, unread, and the socket still open."""

    class Hello(web.RequestHandler):
        def get(self):
            self.finish(f"hello {self.request.remote_ip}")

    back = []
    server = GatedServer(web.Application([(r"/", Hello)]))
    server.next_head = lambda sock, address, unread: back.append((sock, address, unread))
    relay_end, client = _gated_pair()
    second = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    server.serve(relay_end, ("10.1.2.3", 4), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + second[:5])
    deadline = time.monotonic() + 3
    while not back:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    [(sock, address, unread)] = back
    assert sock is relay_end and address == ("10.1.2.3", 4) and unread == second[:5]
    assert server._connections == set()
    sock.send(b" and still open")
    sock.close()
    reply = await _until_closed(client)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"hello 10.1.2.3 and still open")
    client.close()


async def test_a_gated_server_closes_what_asked_to_be_closed():
    back = []
    server = GatedServer(web.Application([]))
    server.next_head = lambda *args: back.append(args)
    relay_end, client = _gated_pair()
    server.serve(relay_end, ("10.1.2.3", 4),
                 b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await _until_closed(client)).startswith(b"HTTP/1.1 404 ") and not back
    client.close()
