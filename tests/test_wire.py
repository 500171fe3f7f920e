"""The fast write path against Tornado itself: same bytes on the wire, same buffer accounting.

These tests are the tripwire for a Tornado upgrade: ``changerelay/wire.py`` uses private
attributes (``IOStream._write_buffer``, ``WebSocketProtocol13._compressor``,
``HTTP1Connection._chunking_output``) and must fail here, loudly, if they change.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import pytest
from tornado import httpserver, iostream, netutil, web, websocket
from tornado.http1connection import HTTP1Connection

from changerelay import clients, wire
from changerelay import events as ev
from changerelay.subscription import ALL

MESSAGES = ["", "x", "é" * 40, "a" * 125, "b" * 126, "c" * 65535, "d" * 65536, "e" * 200_000]


def test_private_attributes_still_exist():
    stream = iostream.IOStream(socket.socket())
    assert len(stream._write_buffer) == 0 and stream._write_buffer._size == 0
    assert hasattr(websocket.WebSocketProtocol13, "_write_frame")
    assert "_compressor" in websocket.WebSocketProtocol13._create_compressors.__code__.co_names
    assert "_chunking_output" in HTTP1Connection.__init__.__code__.co_names
    stream.close()


async def _raw_ws_client(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


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


def test_prebuilt_frames_are_byte_identical_to_write_message():
    async def scenario():
        opened = asyncio.get_running_loop().create_future()

        class Handler(websocket.WebSocketHandler):
            def open(self):
                opened.set_result(self)

        server = httpserver.HTTPServer(web.Application([(r"/ws", Handler)]))
        [sock] = netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets([sock])
        reader, writer = await _raw_ws_client(sock.getsockname()[1])
        handler = await opened
        direct = wire.StreamWriter(wire.ws_stream(handler))
        for message in MESSAGES:
            await handler.write_message(message)
            direct.write(ev.ws_frame(message.encode()))
            theirs = await _read_frame(reader)
            ours = await _read_frame(reader)
            assert ours == theirs, message[:10]
        writer.close()
        server.stop()

    asyncio.run(scenario())


def test_direct_writes_keep_order_when_the_kernel_pushes_back():
    """Fill the socket until the kernel refuses, then keep writing: nothing reordered or lost."""
    async def scenario():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        stream = iostream.IOStream(a)
        writer = wire.StreamWriter(stream)
        chunks = [bytes([i % 251]) * 10_000 for i in range(300)]  # 3 MB: beyond socket buffers
        for chunk in chunks:
            writer.write(chunk)
        assert writer.buffered() > 0
        reader = iostream.IOStream(b)
        received = await reader.read_bytes(sum(map(len, chunks)))
        assert received == b"".join(chunks)
        assert writer.buffered() == 0
        stream.close()
        reader.close()

    asyncio.run(scenario())


class FakeWriter:
    def __init__(self):
        self.queued = 0
        self.data = b""

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


class FakeHandler:
    def __init__(self):
        self.closed_with = None

    def close(self, code, reason):
        self.closed_with = (code, reason)


def test_client_never_buffers_past_its_limit_and_is_cut_off_with_1013():
    handler = FakeHandler()
    client = clients.WebSocketClient(handler, ALL, limit=1000, peer="test")
    client.writer = FakeWriter()
    cut = []
    client.on_cut = lambda: cut.append(True)
    frame = ev.ws_frame(b"y" * 300)
    for _ in range(10):
        client.send(frame)
    assert client.writer.queued <= 1000 + 4096
    assert client.writer.data.count(frame) == 3
    assert handler.closed_with == (1013, "slow consumer")
    assert cut == [True]
    assert b'"code":"slow_consumer"' in client.writer.data


@pytest.mark.parametrize("chunked", [True, False])
def test_sse_records_are_framed_like_tornado_chunks(chunked):
    client = clients.EventStreamClient(None, ALL, limit=1 << 20, peer="test")
    client.chunked = chunked
    event = ev.encode_change({"_id": {"_data": "82AB"}, "operationType": "delete"})
    packed = client.pack([event])
    if chunked:
        size, _, rest = packed.partition(b"\r\n")
        assert int(size, 16) == len(event.sse) and rest == event.sse + b"\r\n"
    else:
        assert packed == event.sse


def test_split_frames_inverts_ws_frame():
    payloads = [m.encode() for m in MESSAGES]
    joined = b"".join(ev.ws_frame(p) for p in payloads) + clients.PING
    parts = list(wire.split_frames(joined))
    assert [bytes(payload) for _, _, payload in parts[:-1]] == payloads
    assert [opcode for opcode, _, _ in parts] == [0x1] * len(payloads) + [0x9]
    assert b"".join(bytes(frame) for _, frame, _ in parts) == joined
