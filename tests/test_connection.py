"""An open WebSocket on a bare socket (``changerelay/connection.py``), against a raw peer."""

from __future__ import annotations

import asyncio
import fcntl
import select
import socket
import struct
import termios

import pytest
from tornado.iostream import StreamClosedError

from changerelay import connection as conn_module
from changerelay import frames, protocol
from changerelay.buffers import ENTRY_COST, SLOT_COST, Buffers
from changerelay.connection import WebSocketConnection
from changerelay.disconnect import CLOSES
from changerelay.protocol import WebSocketProtocol
from tests.support import dropped, masked


class Peer:
    """The client end of a socketpair, read with asyncio."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    async def read(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        while len(self.buffer) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), 5)
            if not chunk:
                raise EOFError(f"EOF after {len(self.buffer)} of {n} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def frame(self) -> tuple[int, bytes]:
        head = await self.read(2)
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self.read(8))[0]
        return head[0] & 0x0F, await self.read(length)

    async def eof(self) -> bool:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), 5) == b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def unread(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` that nobody has read (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Loopback TCP with small buffers, so that the kernel pushes back after a few hundred KB."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.socket()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        theirs.connect(server.getsockname())
        ours, _ = server.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    return ours, theirs


def pair(max_size: int = 4096, deflate: bool = False, start: bool = True,
         buffers: Buffers | None = None):
    """A connection (started, unless ``start=False``), its peer, and what it reported."""
    ours, theirs = tcp_pair()
    theirs.setblocking(False)
    buffers = buffers or Buffers(0, asyncio.get_running_loop().call_soon)
    connection = WebSocketConnection(ours, buffers, WebSocketProtocol(max_size, deflate))
    events = {"pongs": 0, "closed": 0, "gone": asyncio.Event(), "pong": asyncio.Event()}

    def closed():
        events["closed"] += 1
        events["gone"].set()

    def ponged():
        events["pongs"] += 1
        events["pong"].set()

    connection.on_pong = ponged
    connection.on_close = closed
    if start:
        connection.start()
    return connection, Peer(theirs), events


@pytest.fixture
def quick_close(monkeypatch):
    """The peer gets 0.2 s, not 5, to answer our close frame."""
    monkeypatch.setattr(conn_module, "CLOSE_TIMEOUT", 0.2)


async def test_writes_keep_order_when_the_kernel_pushes_back_and_drain_is_reported():
    connection, peer, _ = pair()
    chunks = [bytes([i % 251]) * 10_000 for i in range(300)]  # 3 MB: beyond socket buffers
    for chunk in chunks:
        connection.write(chunk)
    assert connection.buffered() > 0
    assert not connection.write_within(b"x", connection.buffered())  # a queue has a limit
    drained = asyncio.Event()
    connection.when_drained(drained.set)
    assert await peer.read(3_000_000) == b"".join(chunks)
    await asyncio.wait_for(drained.wait(), 5)
    assert connection.buffered() == 0
    assert connection.write_within(b"y" * 100, 10)  # nothing queued: the kernel takes it
    assert await peer.read(100) == b"y" * 100


async def test_a_queue_costs_its_bytes_and_an_entry_each_and_shared_payloads_count_once():
    buffers = Buffers(0, asyncio.get_running_loop().call_soon)
    (first, peer, _), (second, _, _) = pair(buffers=buffers), pair(buffers=buffers)
    big = [b"x" * 3_000_000, b"y" * 3_000_000]
    for connection, payload in zip((first, second), big, strict=True):
        connection.write(payload)  # more than the kernel takes: the rest is queued
    before = first.buffered()
    shared = b"the same payload, queued by both"
    for _ in range(1000):
        first.write(shared)  # behind a queue: each is an entry, its bytes counted each time
        second.write(shared)
    assert first.buffered() == before + 1000 * (len(shared) + ENTRY_COST)
    # Together: each payload once (a partly sent one whole), each entry's slot.
    assert buffers.total == 2 * (3_000_000 + ENTRY_COST) + len(shared) + ENTRY_COST + (
        2 * 1000 - 1) * SLOT_COST
    second.abort()
    assert buffers.total == 3_000_000 + ENTRY_COST + len(shared) + ENTRY_COST + 999 * SLOT_COST
    await peer.read(3_000_000 + 1000 * len(shared))  # all of it: the queue is gone, its cost too
    assert first.buffered() == 0 and buffers.total == 0


async def test_dropping_what_is_unsent_keeps_a_partly_sent_chunk_and_its_cost():
    buffers = Buffers(0, asyncio.get_running_loop().call_soon)
    connection, peer, _ = pair(buffers=buffers)
    frame = frames.ws_frame(b"z" * 3_000_000)
    connection.write(frame)
    queued = connection.buffered()  # the tail of a partial send
    for _ in range(10):
        connection.write(frames.ws_frame(b"later"))
    connection.drop_unsent()
    assert connection.buffered() == queued  # its unsent tail, and the entry
    assert buffers.total == len(frame) + ENTRY_COST  # what the kernel has not taken keeps it whole
    assert await peer.frame() == (frames.TEXT, b"z" * 3_000_000)  # whole, then nothing
    assert connection.buffered() == 0 and buffers.total == 0


async def test_ping_is_answered_with_its_payload_and_pongs_are_reported():
    connection, peer, events = pair(start=False)
    connection.start(pending_in=masked(b"early", frames.PING))  # sent behind the handshake
    assert await peer.frame() == (frames.PONG, b"early")
    peer.send(masked(b"abc", frames.PING) + masked(b"", frames.PONG))
    assert await peer.frame() == (frames.PONG, b"abc")
    await asyncio.wait_for(events["pong"].wait(), 5)
    assert events["pongs"] == 1


async def test_peer_close_is_echoed_then_the_socket_closes_once():
    connection, peer, events = pair()
    peer.send(masked(struct.pack("!H", 1001) + b"bye", frames.CLOSE))
    assert await peer.frame() == (frames.CLOSE, struct.pack("!H", 1001))
    assert await peer.eof()
    await asyncio.wait_for(events["gone"].wait(), 5)
    assert events["closed"] == 1 and connection.closed
    with pytest.raises(StreamClosedError):
        connection.write(b"late")


async def test_our_close_waits_for_the_answer_and_refuses_writes_meanwhile():
    connection, peer, events = pair()
    connection.close(*CLOSES["slow_consumer"].frame)
    assert await peer.frame() == (frames.CLOSE, struct.pack("!H", 1013) + b"slow consumer")
    with pytest.raises(StreamClosedError):
        connection.write(b"more")
    assert not connection.closed  # waiting for the peer's close frame
    peer.send(masked(struct.pack("!H", 1013), frames.CLOSE))
    assert await peer.eof()
    await asyncio.wait_for(events["gone"].wait(), 5)
    assert events["closed"] == 1


async def test_a_silent_peer_is_dropped_after_the_close_timeout(quick_close):
    connection, peer, events = pair()
    connection.shutdown()
    assert await peer.frame() == (frames.CLOSE, struct.pack("!H", 1001) +
                                  b"server shutting down")
    await asyncio.wait_for(events["gone"].wait(), 5)
    assert await peer.eof()  # it read all we sent: an ordinary close


@pytest.mark.parametrize("data, code", [
    (bytes([0x81, 0x01]) + b"x", 1002),    # unmasked
    (masked(b"x" * 5000), 1009),
    (masked(b"\xc3\x28"), 1007),
])
async def test_protocol_errors_close_with_their_code_then_end_the_stream(data, code):
    _, peer, events = pair()  # the loop holds the connection
    peer.send(data)
    opcode, payload = await peer.frame()
    assert (opcode, frames.close_code(payload)) == (frames.CLOSE, code)
    assert await peer.eof()  # we stop writing at once; the peer may still say goodbye
    peer.sock.close()
    await asyncio.wait_for(events["gone"].wait(), 5)


async def test_a_peer_that_never_reads_our_close_is_reset_at_the_close_timeout(quick_close):
    """Closing the socket is not enough: the kernel would keep what the peer never read and
    probe its zero window for minutes, the peer seeing an open connection all along. At the
    close timeout the connection is reset (RST), which frees both ends."""
    connection, peer, events = pair()
    for _ in range(100):  # 10 MB queued: far more than the socket buffers hold
        connection.write(b"z" * 100_000)
    connection.close(*CLOSES["slow_consumer"].frame)
    await asyncio.wait_for(events["gone"].wait(), 5)
    assert await dropped([peer.sock], 2)


async def test_a_flooding_peer_gets_1008_is_no_longer_read_and_is_dropped(quick_close):
    connection, peer, events = pair()
    flood = masked(b"", frames.PING) * (protocol.FRAME_BURST + 1)
    peer.send(flood)
    while (received := await peer.frame())[0] == frames.PONG:
        pass
    assert received == (frames.CLOSE, struct.pack("!H", 1008) + b"too many frames")
    assert not connection.closed
    # Not read any more: what it sends now stays with the kernel until the close timeout.
    peer.send(b"\x00" * 1000)
    async with asyncio.timeout(2):
        while unread(connection.sock) < 1000:
            await asyncio.sleep(0.01)  # the loop runs meanwhile: a reader would take them
    await asyncio.wait_for(events["gone"].wait(), 5)
    assert await dropped([peer.sock], 2)


async def test_peer_vanishing_is_reported_once():
    connection, peer, events = pair()
    peer.sock.close()
    await asyncio.wait_for(events["gone"].wait(), 5)
    connection.close()  # harmless afterwards
    assert events["closed"] == 1


async def test_closing_a_reset_connection_raises_nothing_and_reports_once():
    connection, peer, events = pair(start=False)  # nothing reads: send() meets the RST
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.close()  # RST
    with pytest.raises(StreamClosedError):  # the RST is on loopback at once
        for _ in range(1000):
            connection.write(b"x")
    await asyncio.wait_for(events["gone"].wait(), 5)
    connection.close(*CLOSES["slow_consumer"].frame)
    connection.shutdown()
    for _ in range(3):  # a second report could only be a callback already scheduled
        await asyncio.sleep(0)
    assert events["closed"] == 1


async def test_a_peer_that_closes_but_never_reads_our_reply_is_dropped(quick_close):

    connection, peer, events = pair()
    for _ in range(100):  # 10 MB queued: far more than the socket buffers hold
        connection.write(b"z" * 100_000)
    assert connection.buffered() > 0
    peer.send(masked(struct.pack("!H", 1000), frames.CLOSE))
    await asyncio.wait_for(events["gone"].wait(), 5)


async def test_a_client_whose_replay_meets_a_reset_does_not_stay_in_the_hub():
    """on_close must not run inside the write that failed: the hub is mid-way through a resume
    (or a flush) and would put the client back into a group, or fail on its own dicts."""
    from changerelay.clients import WebSocketClient
    from changerelay.hub import Hub
    from changerelay.subscription import Subscription
    from tests.support import event, token

    left: list[asyncio.Event] = []

    async def reset_client(hub):
        connection, peer, _ = pair(start=False)  # nothing reads: the first send() meets the RST
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.sock.close()
        assert select.select([connection.sock], [], [], 5)[0]  # the RST is in: readable
        client = WebSocketClient(connection, Subscription(), 1 << 20, "test", claims=None,
                                 on_end=hub.unsubscribe)
        gone = asyncio.Event()
        left.append(gone)

        def on_close():
            hub.unsubscribe(client)
            gone.set()

        connection.on_close = on_close
        return client

    hub = Hub(call_soon=lambda flush: None, behind=lambda client, after: None, max_events=100,
              max_bytes=1 << 20)
    hub.start(token(0))
    for n in range(1, 4):
        hub.publish(event(n))
    hub.flush()
    replayed = await reset_client(hub)
    assert hub.resume(replayed, token(0))  # replays events 1-3 into the reset socket
    ahead = await reset_client(hub)
    assert hub.resume(ahead, token(4))  # from a relay one event ahead of us
    hub.publish(event(4))
    hub.publish(event(5))
    hub.flush()  # event 5 goes to `ahead`, whose socket is reset
    assert replayed.closed and ahead.closed
    await asyncio.wait_for(asyncio.gather(*(gone.wait() for gone in left)), 5)
    groups = [group.clients for group in hub._groups.values()]
    assert not any(replayed in clients or ahead in clients for clients in groups)
    assert hub.clients == set()


async def test_a_ping_behind_a_long_queue_is_answered_once_the_queue_is_short():
    """RFC 6455 §5.5.2: every ping gets a pong (§5.5.3: at least the latest one), even while a
    replay keeps megabytes queued; a dropped pong makes keepalive clients give up on us."""
    connection, peer, events = pair()
    frame = frames.ws_frame(b"z" * 100_000)
    for _ in range(30):  # 3 MB queued: far more than the socket buffers hold
        connection.write(frame)
    queued = connection.buffered()
    assert queued > protocol.PONG_BACKLOG
    # A pong behind the pings: once it is reported, the connection has read them all.
    peer.send(masked(b"one", frames.PING) * 1000 + masked(b"two", frames.PING)
              + masked(b"", frames.PONG))
    await asyncio.wait_for(events["pong"].wait(), 5)
    assert connection.buffered() == queued  # no pongs piling up behind the queue
    received = [await peer.frame() for _ in range(31)]
    assert received[:30] == [(frames.TEXT, b"z" * 100_000)] * 30
    assert received[30] == (frames.PONG, b"two")
    peer.send(masked(b"three", frames.PING))  # its pong comes next: no other was queued
    assert await peer.frame() == (frames.PONG, b"three")
    assert connection.buffered() == 0 and peer.buffer == b""


async def test_a_peer_that_closes_then_half_closes_still_gets_our_close_frame():
    """A peer may send its close frame and then FIN (shutdown(SHUT_WR)): it still reads, and we
    still owe it a close frame (RFC 6455 §5.5.1), after whatever frame was in flight."""
    connection, peer, events = pair()
    frame = frames.ws_frame(b"z" * 100_000)
    for _ in range(30):  # 3 MB queued: far more than the socket buffers hold
        connection.write(frame)
    peer.send(masked(struct.pack("!H", 1000), frames.CLOSE))
    peer.sock.shutdown(socket.SHUT_WR)
    while (received := await peer.frame())[0] == frames.TEXT:
        assert received[1] == b"z" * 100_000
    assert received == (frames.CLOSE, struct.pack("!H", 1000))
    assert await peer.eof()
    await asyncio.wait_for(events["gone"].wait(), 5)


async def test_a_peer_closing_behind_a_long_queue_gets_our_answer_without_the_queue():
    connection, peer, events = pair()
    frame = frames.ws_frame(b"z" * 100_000)
    for _ in range(100):  # 10 MB queued: far more than the socket buffers hold
        connection.write(frame)
    peer.send(masked(struct.pack("!H", 1001), frames.CLOSE))
    received = 0
    while True:
        opcode, payload = await peer.frame()
        if opcode == frames.CLOSE:
            break
        assert payload == b"z" * 100_000  # whole frames only
        received += 1
    assert payload == struct.pack("!H", 1001)
    assert received < 100
    assert await peer.eof()
    await asyncio.wait_for(events["gone"].wait(), 5)


async def test_a_ping_read_with_a_bad_frame_gets_its_pong_before_the_close():
    """RFC 6455 §5.5.2: the pong is owed for a ping that came before the protocol error."""
    connection, peer, events = pair(start=False)
    connection.start(pending_in=masked(b"first", frames.PING) + bytes([0x81, 0x01]) + b"x")
    assert await peer.frame() == (frames.PONG, b"first")
    opcode, payload = await peer.frame()
    assert (opcode, frames.close_code(payload)) == (frames.CLOSE, frames.PROTOCOL_ERROR)
    assert await peer.eof()
    peer.sock.close()
    await asyncio.wait_for(events["gone"].wait(), 5)


async def test_a_close_read_with_junk_behind_it_completes_the_closing_handshake():
    """RFC 6455 §5.5.1: the peer's Close is answered with its code; what follows it is not
    read, so junk behind it cannot turn the answer into a 1002."""
    connection, peer, events = pair(start=False)
    connection.start(pending_in=masked(struct.pack("!H", 1001), frames.CLOSE) + b"\x00junk")
    assert await peer.frame() == (frames.CLOSE, struct.pack("!H", 1001))
    assert await peer.eof()
    await asyncio.wait_for(events["gone"].wait(), 5)
    assert events["closed"] == 1
