"""The load client: thousands of WebSocket connections in one process, cheap per frame.

A general WebSocket library spends more per message than the relay under test does, so the
numbers would measure the client. Here the handshake is written by hand, frames are split by
hand on ``asyncio.Protocol`` callbacks, and no frame is JSON-decoded: a change event is
recognised, and its latency read, by a regex scan for ``"wallTime":{"$date":"...Z"``.

Latency is wall clock at receipt minus the event's ``wallTime`` (set by the primary at commit,
truncated to the millisecond). Frames that arrive in one read and carry the same ``wallTime``
are counted together, so a batch of a thousand frames costs one subtraction. Latencies are
recorded on a sample of the connections (``latency_every``), counts on all of them.

The process is driven by the harness over stdin/stdout, one JSON object per line each way::

    {"op": "connect", "port": 8000, "n": 1000, "source": "127.0.0.2"}  -> {"connected": ...}
    {"op": "connect", ..., "path": "/socket?filter=...u{i}..."}  {i}: the connection's number
    {"op": "arm", "latency_every": 10}  forget counts and latencies; sample every 10th client
    {"op": "wait", "expect": 500, "timeout": 60}  -> counts, first/last receipt, percentiles
    {"op": "wait", "expect": 1, "only": [3, 7]}  connections 3 and 7 expect 1, the others 0
    {"op": "close", "keep": 100}   close all but 100 connections (close frame 1000, then FIN)
    {"op": "exit"}

Run ``python -m bench.loadclient`` by hand to type these yourself.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import hashlib
import json
import os
import re
import resource
import struct
import sys
import time
from collections import Counter

# The event's commit time, compact or spaced JSON: "wallTime":{"$date":"2026-11-27T21:19:04.123Z"
STAMP = re.compile(rb'"wallTime": ?\{"\$date": ?"([^"]+)"')
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BUCKET = 1e-4  # latency histogram resolution: 0.1 ms


def raise_open_files_limit() -> int:
    """10,000 sockets need more than the usual 1,024 descriptors; take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def stamp_seconds(stamp: bytes) -> float:
    """``2026-11-27T21:19:04.123Z`` as seconds since the epoch (UTC).

    Relaxed Extended JSON leaves the fraction out on a whole second: ``...T21:19:04Z``.
    """
    text = stamp.decode()
    if not text.endswith("Z"):
        raise ValueError(f"wallTime {text!r} is not UTC; these servers send ...Z")
    whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    fraction = text[19:-1]
    return whole + (float(fraction) if fraction else 0.0)


class Stats:
    """What every connection of this process received since the last ``arm``."""

    def __init__(self):
        self.stamps: dict[bytes, float] = {}
        self.arm()

    def arm(self, latency_every: int = 1) -> None:
        """Start counting afresh; every ``latency_every``-th connection records latencies.

        Every client gets the same events, so the latencies of a sample of clients estimate the
        distribution over all deliveries, and the others skip the scan for ``wallTime``.
        """
        self.hist: dict[int, int] = {}
        self.unstamped = 0
        self.first: float | None = None   # time.monotonic() of the first event frame
        self.last: float | None = None    # ...and of the latest
        self.events = 0
        self.controls = 0
        self.pings = 0
        self.reached = 0                  # connections whose count reached the target
        self.target = 0
        for index, conn in enumerate(Connection.all):
            conn.count = 0
            conn.sampled = index % latency_every == 0

    def latency(self, stamp: bytes, now: float, frames: int) -> None:
        sent = self.stamps.get(stamp)
        if sent is None:
            if len(self.stamps) > 100_000:
                self.stamps.clear()
            sent = self.stamps[stamp] = stamp_seconds(stamp)
        bucket = int((now - sent) / BUCKET)
        self.hist[bucket] = self.hist.get(bucket, 0) + frames

    def percentiles(self) -> dict:
        total = sum(self.hist.values())
        if not total:
            return {"samples": 0}
        out = {"samples": total}
        wanted = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)]
        seen, keys = 0, sorted(self.hist)
        for bucket in keys:
            seen += self.hist[bucket]
            while wanted and seen >= wanted[0][1] * total:
                out[wanted.pop(0)[0]] = round(bucket * BUCKET * 1000, 2)
        out["min"] = round(keys[0] * BUCKET * 1000, 2)
        out["max"] = round(keys[-1] * BUCKET * 1000, 2)
        return out


STATS: Stats


class Connection(asyncio.Protocol):
    """One client WebSocket (RFC 6455): handshake, then frame splitting, counting, pong."""

    all: list[Connection] = []
    opened_count = 0  # connections ever made: the next one's number

    def __init__(self, host: str, port: int, path: str):
        self.number = Connection.opened_count
        Connection.opened_count += 1
        self.request_target = (host, port, path.replace("{i}", str(self.number)))
        self.key = base64.b64encode(os.urandom(16))
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.handshaking = True
        self.pending = b""
        self.count = 0
        self.sampled = True  # records latencies (see Stats.arm)
        self.close_code: int | None = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport
        host, port, path = self.request_target
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (path.encode(), host.encode(), port, self.key))

    def connection_lost(self, exc):
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        if self.handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.pending = data
                return
            self._check_handshake(data[:end])
            data = data[end + 4:]
            if not data:
                return
        self._frames(data)

    def _check_handshake(self, head: bytes) -> None:
        self.handshaking = False
        accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            self.opened.set_exception(ConnectionError(
                "handshake refused: " + head.split(b"\r\n", 1)[0].decode(errors="replace")))
            self.transport.abort()
            return
        self.opened.set_result(self)
        Connection.all.append(self)

    def _frames(self, data: bytes) -> None:
        """Split complete frames off ``data``; keep the incomplete tail for the next read.

        Only headers are read in Python, plus one byte of each text frame: a change event
        starts ``{"_id"``, a control message ``{"type"``. Sampled connections then find the
        ``wallTime`` of every event frame with one regex scan in C.
        """
        size = len(data)
        pos = 0
        events = 0
        while size - pos >= 2:
            second = data[pos + 1]
            if second < 126:
                header = 2
                end = pos + 2 + second
            elif second == 126:
                if size - pos < 4:
                    break
                header = 4
                end = pos + 4 + ((data[pos + 2] << 8) | data[pos + 3])
            else:  # a 64-bit length, or the mask bit a server must not set (RFC 6455 §5.1)
                if second & 0x80:
                    raise ConnectionError("the server sent a masked frame")
                if size - pos < 10:
                    break
                header = 10
                end = pos + 10 + struct.unpack_from("!Q", data, pos + 2)[0]
            if end > size:
                break
            if data[pos] == 0x81 and end - pos > header + 2 and data[pos + header + 2] == 95:
                events += 1  # '_' of {"_id":
            else:
                self._control(data, pos, header, end)
            pos = end
        if pos < size:
            self.pending = data[pos:]
        if events:
            self._count(data, pos, events)

    def _count(self, data: bytes, end: int, events: int) -> None:
        stats = STATS
        now = time.monotonic()
        if self.sampled:
            wall = time.time()
            stamps = STAMP.findall(data, 0, end)
            if len(stamps) != events:
                stats.unstamped += events - len(stamps)
            if stamps and stamps[0] == stamps[-1]:
                stats.latency(stamps[0], wall, len(stamps))  # the usual case: one insert batch
            else:
                for stamp, frames in Counter(stamps).items():
                    stats.latency(stamp, wall, frames)
        stats.events += events
        if stats.first is None:
            stats.first = now
        stats.last = now
        before = self.count
        self.count = before + events
        if before < stats.target <= self.count:
            stats.reached += 1

    def _control(self, data: bytes, pos: int, header: int, end: int) -> None:
        opcode = data[pos] & 0x0F
        if data[pos] & 0x80 == 0 or opcode == 0:
            raise ConnectionError("fragmented messages are not expected from these servers")
        if opcode == 0x9:
            STATS.pings += 1
            self._send(0xA, data[pos + header:end])
        elif opcode == 0x8:
            length = end - pos - header
            self.close_code = ((data[pos + header] << 8 | data[pos + header + 1])
                               if length >= 2 else 1005)
            self.transport.close()
        else:
            STATS.controls += 1

    def _send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (RFC 6455 §5.3); control payloads are at most 125 bytes."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def close(self) -> None:
        """Start the closing handshake; the server answers and closes TCP (RFC 6455 §7)."""
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, struct.pack("!H", 1000))


async def connect(host: str, port: int, path: str, n: int, source: str | None,
                  concurrency: int, timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []
    opened = 0

    async def one():
        nonlocal opened
        async with gate:
            conn = Connection(host, port, path)
            try:
                await asyncio.wait_for(loop.create_connection(
                    lambda: conn, host, port,
                    local_addr=(source, 0) if source else None), timeout)
                await asyncio.wait_for(conn.opened, timeout)
                opened += 1
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if conn.transport is not None:
                    conn.transport.abort()

    started = time.monotonic()
    first = Connection.opened_count
    await asyncio.gather(*(one() for _ in range(n)))
    return {"connected": opened, "failed": len(errors), "errors": errors[:5], "first": first,
            "seconds": round(time.monotonic() - started, 3), "open": len(Connection.all)}


async def wait(expect: int, timeout: float, only: list[int] | None = None) -> dict:
    """Wait until every connection has ``expect`` events, or the deadline; then report.

    With ``only``, the connections of those numbers expect ``expect`` and the others none (a
    per-user run: each event is for one user)."""
    stats = STATS
    chosen = None if only is None else set(only)
    expecting = [conn for conn in Connection.all if chosen is None or conn.number in chosen]
    stats.target = expect
    stats.reached = sum(1 for conn in Connection.all if conn.count >= expect)
    deadline = time.monotonic() + timeout

    def done() -> bool:  # every connection counts towards ``reached``: only then is it enough
        if chosen is None:
            return stats.reached >= len(expecting)
        return all(conn.count >= expect for conn in expecting)

    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)  # a poll interval, not a synchronisation
    clients = len(Connection.all)
    wanted = [expect if chosen is None or conn.number in chosen else 0
              for conn in Connection.all]
    counts = [conn.count for conn in Connection.all]
    return {
        "clients": clients,
        "complete": bool(counts) and counts == wanted,
        "min": min(counts, default=0), "max": max(counts, default=0),
        "short": sum(1 for c, w in zip(counts, wanted, strict=True) if c < w),
        "over": sum(1 for c, w in zip(counts, wanted, strict=True) if c > w),
        "closed": sum(1 for conn in Connection.all if conn.lost),
        "events": stats.events, "controls": stats.controls, "pings": stats.pings,
        "unstamped": stats.unstamped,
        "first": stats.first, "last": stats.last,
        "latency_ms": stats.percentiles(),
    }


async def close(keep: int, timeout: float) -> dict:
    """Close all but the first ``keep`` connections; wait until the server has closed each.

    Waiting for the server's side matters: the tutorial server raises on ``write_message`` to a
    client that is closing but not yet out of its set, which would end its change stream loop.
    """
    going = Connection.all[keep:]
    del Connection.all[keep:]
    for conn in going:
        conn.close()
    deadline = time.monotonic() + timeout
    while any(not conn.lost for conn in going) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # a poll interval, not a synchronisation
    lingering = [conn for conn in going if not conn.lost]
    for conn in lingering:
        conn.transport.abort()
    return {"closed": len(going), "lingering": len(lingering), "open": len(Connection.all)}


async def serve() -> None:
    global STATS
    STATS = Stats()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    reply = {"ready": True, "nofile": raise_open_files_limit(), "pid": os.getpid()}
    while True:
        print(json.dumps(reply), flush=True)
        line = await reader.readline()
        if not line:
            return
        command = json.loads(line)
        op = command.pop("op")
        if op == "connect":
            reply = await connect(
                command.get("host", "127.0.0.1"), command["port"], command.get("path", "/socket"),
                command["n"], command.get("source"), command.get("concurrency", 100),
                command.get("timeout", 30))
        elif op == "arm":
            STATS.arm(command.get("latency_every", 1))
            reply = {"armed": len(Connection.all)}
        elif op == "wait":
            reply = await wait(command["expect"], command.get("timeout", 60),
                               command.get("only"))
        elif op == "close":
            reply = await close(command.get("keep", 0), command.get("timeout", 10))
        elif op == "exit":
            return
        else:
            reply = {"error": f"unknown op {op!r}; use connect, arm, wait, close or exit"}


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
