"""Abusive HTTP clients do not slow a bystander down, nor grow the relay's memory without bound.

A bystander receives 20 events/s. Its latency is measured with no one else connected, then while
another process abuses the HTTP layer as the issue found it could be: 200 connections sending an
endless header (up to 2 MiB each, coming back when closed), connections dribbling a head a byte at
a time, requests of 5,000 tiny headers, and requests promising a 95 MB body and sending it. The
phases alternate five times and their median p95s are compared (one stray pause on a shared
machine sets a p99 of 80 samples, their second largest); the relay's resident memory while abused
must stay within a bound that the heads it may hold explain.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import psutil
import pytest

from tests.support import WS, latencies, p95

pytestmark = [pytest.mark.e2e, pytest.mark.load]

SECONDS = 4
RATE = 20  # bystander events per second
ROUNDS = 5
# 200 parked heads at the 64 KiB limit, with a bytearray's slack, plus what refused connections
# linger with: far below the 400 MiB that 200 heads of 2 MiB took.
RSS_GROWTH_BOUND = 64 * 1024 * 1024

TICKER = f"""
import sys, time
from pymongo import MongoClient
uri, db, phase = sys.argv[1], sys.argv[2], sys.argv[3]
with MongoClient(uri) as client:
    started = time.monotonic()
    for i in range({SECONDS * RATE}):
        client[db].c.insert_one({{"_id": f"{{phase}}-{{i}}"}})
        time.sleep(max(0.0, started + (i + 1) / {RATE} - time.monotonic()))
"""

ABUSER = """
import select, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
START = b"GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n"
# An abuser comes back, but not in a tight loop: a flood of new connections costs any server
# per connection (a proxy's or the firewall's rate limit is the answer to it), while what is
# tested here is what one connection can make the relay hold and do.
REOPEN_SECONDS = 0.5
TURN_SECONDS = 0.05  # each connection sends once per turn: 200 parked ones, 32 MB/s

class Abuse:
    \"\"\"A connection sending ``head`` then ``more`` (as much as the relay takes, ``pace`` bytes
    per turn) up to ``most`` bytes, then holding on; opened again a moment after the relay
    answers or closes it.\"\"\"
    def __init__(self, head, more, pace, most):
        self.head, self.more, self.pace, self.most = head, more, pace, most
        self.open()
    def open(self):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.sent = 0
        self.closed_at = None
    def close(self):
        self.sock.close()
        self.closed_at = time.monotonic()
    def turn(self, answered):
        if self.closed_at is not None:
            if time.monotonic() - self.closed_at >= REOPEN_SECONDS:
                self.open()
            return
        if self.sock in answered:  # or closed
            self.close()
            return
        if self.sent >= self.most:
            return
        data = self.head if self.sent < len(self.head) or not self.more else self.more
        try:
            self.sent += self.sock.send(data[self.sent % len(data):][:self.pace])
        except BlockingIOError:
            pass
        except OSError:
            self.close()

MiB = 1024 * 1024
tiny = b"".join(b"X-%d: 1\\r\\n" % n for n in range(5000))
abusers = (
    [Abuse(START + b"X-Parked: ", b"p" * 8192, 8192, 2 * MiB) for _ in range(200)]
    + [Abuse(START + b"X-Slow: ", b"s", 1, 10 * MiB) for _ in range(20)]
    + [Abuse(START + tiny + b"\\r\\n", b"", 65536, len(START + tiny) + 2) for _ in range(5)]
    + [Abuse(START + b"Content-Length: 95000000\\r\\n\\r\\n", b"b" * 65536, 65536, 95 * MiB)
       for _ in range(5)]
)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    live = [abuser.sock for abuser in abusers if abuser.closed_at is None]
    answered = set(select.select(live, [], [], 0)[0])
    for abuser in abusers:
        abuser.turn(answered)
    time.sleep(TURN_SECONDS)
"""


async def phase(mongo, relay, bystander: WS, name: str, hostile: bool) -> tuple[float, int]:
    """The bystander's p95 over one phase, and the relay's peak resident memory during it."""
    process = psutil.Process(relay.proc.pid)
    abuser = None
    if hostile:
        abuser = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ABUSER, str(relay.port), str(SECONDS + 1))
    ticker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TICKER, mongo.uri, mongo.db, name)
    measuring = asyncio.ensure_future(latencies(bystander, SECONDS * RATE))
    peak = 0
    while not measuring.done():
        peak = max(peak, process.memory_info().rss)
        await asyncio.wait({measuring}, timeout=0.2)
    assert await ticker.wait() == 0
    if abuser is not None:
        assert await abuser.wait() == 0
    return p95(measuring.result()), peak


async def test_http_abuse_does_not_slow_a_bystander(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, LOG_LEVEL="INFO")
    relay.wait_ready()
    bystander = await WS.connect(relay.ws_url)
    alone, abused, peaks = [], [], []
    baseline = psutil.Process(relay.proc.pid).memory_info().rss
    cpu = psutil.Process(relay.proc.pid).cpu_times()
    for round_ in range(ROUNDS):
        alone.append((await phase(mongo, relay, bystander, f"alone{round_}", False))[0])
        started = time.monotonic()
        latency, peak = await phase(mongo, relay, bystander, f"abused{round_}", True)
        abused.append(latency)
        peaks.append(peak)
        assert relay.get("/healthz").code == 200, "the probe after an abused phase"
        assert time.monotonic() - started < SECONDS * 3

    used = psutil.Process(relay.proc.pid).cpu_times()
    print("bystander p95 alone " + ", ".join(f"{p * 1000:.1f}" for p in alone) + " ms; abused "
          + ", ".join(f"{p * 1000:.1f}" for p in abused) + " ms; relay RSS "
          f"{baseline / 2**20:.0f} MiB before, peaks " + ", ".join(
              f"{p / 2**20:.0f}" for p in peaks) + " MiB; relay CPU "
          f"{used.user + used.system - cpu.user - cpu.system:.1f} s")
    assert max(peaks) - baseline < RSS_GROWTH_BOUND
    # The abusing process runs on the same two cores as the relay and the bystander's reader: the
    # same abuse aimed at a bare asyncio sink, not the relay, moved the bystander's p99 to
    # 90-340 ms. Hence 25 ms of slack, not the other load tests' 10; main's relay, which read
    # every header Tornado was sent, took 28 s for an abused phase.
    assert statistics.median(abused) <= 2 * statistics.median(alone) + 0.025
