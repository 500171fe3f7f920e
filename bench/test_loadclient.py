"""The load client's frame splitting and counting: ``pytest bench/test_loadclient.py``.

The benchmark's zero-loss check is only as good as this counting, so it is tested on its own,
with frames cut at every byte boundary, control frames mixed in and whole-second wallTimes.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from bench import loadclient as lc


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def event(stamp: str, pad: int = 0) -> bytes:
    return (b'{"_id":{"_data":"8263"},"operationType":"insert","wallTime":{"$date":"'
            + stamp.encode() + b'"},"fullDocument":{"p":"' + b"x" * pad + b'"}}')


class Transport:
    def __init__(self):
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data):
        self.written.append(data)

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


@pytest.fixture
def conn():
    async def make():
        c = lc.Connection("127.0.0.1", 1, "/socket")
        c.handshaking = False
        c.transport = Transport()
        return c

    lc.STATS = lc.Stats()
    c = asyncio.run(make())
    lc.Connection.all[:] = [c]
    yield c
    lc.Connection.all.clear()


def test_counts_events_cut_at_every_boundary(conn):
    stream = (frame(event("2026-11-27T21:19:04.123Z")) * 3 + frame(b'{"type":"position"}')
              + frame(event("2026-11-27T21:19:05Z", pad=300))
              + frame(event("2026-11-27T21:19:05.001Z", pad=70_000)))
    for cut in range(1, 60):
        lc.STATS.arm()
        for start in range(0, len(stream), cut):
            conn.data_received(stream[start:start + cut])
        assert (conn.count, lc.STATS.controls, lc.STATS.unstamped) == (5, 1, 0), cut
        assert conn.pending == b""


def test_latency_from_whole_second_and_fractional_stamps(conn):
    conn.data_received(frame(event("2026-11-27T21:19:05Z"))
                       + frame(event("2026-11-27T21:19:05.5Z")))
    assert lc.STATS.percentiles()["samples"] == 2
    assert lc.stamp_seconds(b"2026-11-27T21:19:05.5Z") - lc.stamp_seconds(
        b"2026-11-27T21:19:05Z") == pytest.approx(0.5)


def test_ping_is_answered_with_a_masked_pong(conn):
    conn.data_received(frame(b"hi", opcode=0x9))
    (pong,) = conn.transport.written
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2
    mask = pong[2:6]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(pong[6:])) == b"hi"
    assert conn.count == 0


def test_wait_reports_short_and_over_counts(conn):
    other = asyncio.run(_second())
    lc.Connection.all.append(other)
    lc.STATS.arm()
    conn.data_received(frame(event("2026-11-27T21:19:04.123Z")) * 2)
    other.data_received(frame(event("2026-11-27T21:19:04.123Z")) * 3)
    result = asyncio.run(lc.wait(expect=2, timeout=0.05))
    assert (result["complete"], result["short"], result["over"]) == (False, 0, 1)


async def _second():
    c = lc.Connection("127.0.0.1", 1, "/socket")
    c.handshaking = False
    c.transport = Transport()
    return c
