"""The send floor: what one pass over every socket costs with no relay at all.

At a fixed low rate every event is one ``send()`` of one frame to each client, so the relay's CPU
per delivery is mostly the kernel's. This measures that part alone: a bare loop of
``socket.send`` of one event frame's bytes to each of N loopback TCP connections, from the
server core, while a separate process on the client core reads the other ends with epoll.

It is a floor, not the relay's send cost: back-to-back sends are the cheapest. With a few µs of
Python between sends, as in a relay, each ``send()`` cost 2-3 µs more on the benchmark VM,
and 3-9 µs more with ``--loopback-rx client`` (5.5 back to back, 8.2 with 3 µs between, 11.2
with 10 µs between), presumably because the client core has drained its backlog by the next
packet and must be woken for each one.

Passes start every ``1 / rate`` seconds, as the fixed-rate runs' events do, so the reader has
drained and the caches have cooled between them like there; the first few are warm-up.

    python -m bench.sendfloor --bytes 523 --receiver-cores 1 1000 10000
        (start it pinned, e.g. under taskset -c 0) prints one JSON line: a list, one per count
    python -m bench.sendfloor --receive PORT N    the reader (started by the above)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

from .loadclient import raise_open_files_limit
from .procs import spawn

PASSES, WARM_UP = 15, 3
LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: 11,000 connections leave no TIME_WAIT


def frame_bytes(payload: int) -> int:
    """Bytes of one unmasked server-to-client text frame carrying ``payload`` bytes."""
    return payload + (2 if payload < 126 else 4 if payload < 1 << 16 else 10)


def run(counts: list[int], size: int, rate: float, sender_cores: set[int] | None,
        receiver_cores: set[int] | None) -> list[dict]:
    """The harness's entry: this module as its own process pinned to ``sender_cores``."""
    argv = [sys.executable, "-m", "bench.sendfloor", "--bytes", str(size), "--rate", str(rate),
            *map(str, counts)]
    if receiver_cores is not None:
        argv += ["--receiver-cores", ",".join(map(str, sorted(receiver_cores)))]
    proc = spawn(argv, sender_cores, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=60 + 10 * len(counts))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        raise RuntimeError(f"the send floor failed (exit {proc.returncode}); run "
                           f"{' '.join(argv[1:])} by hand to see why")
    return json.loads(out)


def measure(counts: list[int], size: int, receiver_cores: set[int] | None,
            rate: float = 5.0) -> list[dict]:
    return [measure_one(n, size, receiver_cores, rate) for n in counts]


def measure_one(n: int, size: int, receiver_cores: set[int] | None, rate: float) -> dict:
    """Median µs per ``send()`` (wall clock and this process's CPU) and ms per pass of ``n``."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.settimeout(1.0)
    reader = spawn([sys.executable, "-m", "bench.sendfloor", "--receive",
                    str(listener.getsockname()[1]), str(n)], receiver_cores,
                   stdout=subprocess.PIPE, text=True)
    conns: list[socket.socket] = []
    try:
        conns = accept(listener, n, reader)
        if reader.stdout.readline().strip() != "ready":
            raise RuntimeError("the send-floor reader did not connect; run python -m "
                               "bench.sendfloor by hand to see why")
        walls, cpus = passes(conns, b"x" * size, rate)
    finally:
        reader.kill()
        reader.wait()
        for conn in conns:
            conn.close()
        listener.close()
    return {"clients": n, "bytes": size, "passes": len(walls),
            "us_per_send": round(statistics.median(walls) / n * 1e6, 2),
            "cpu_us_per_send": round(statistics.median(cpus) / n * 1e6, 2),
            "pass_ms": round(statistics.median(walls) * 1e3, 2),
            "pass_ms_max": round(max(walls) * 1e3, 2)}


def accept(listener: socket.socket, n: int, reader: subprocess.Popen) -> list[socket.socket]:
    """Accept ``n`` connections as the relay holds them: non-blocking, Nagle off."""
    conns = []
    while len(conns) < n:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if reader.poll() is not None:
                raise RuntimeError(f"the send-floor reader exited after {len(conns)} of {n} "
                                   "connections") from None
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        conns.append(conn)
    return conns


def passes(conns: list[socket.socket], payload: bytes, rate: float) -> tuple[list, list]:
    """Wall and CPU seconds of each measured pass; a short write means the reader fell behind."""
    walls, cpus = [], []
    start = time.monotonic()
    for index in range(WARM_UP + PASSES):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the fixed-rate runs' spacing between events
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for conn in conns:
            if conn.send(payload) != len(payload):
                raise RuntimeError("short send: the send-floor reader is not keeping up")
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if index >= WARM_UP:
            walls.append(wall)
            cpus.append(cpu)
    return walls, cpus


def receive(port: int, n: int) -> None:
    """Open ``n`` connections to ``port`` and read them all until the sender kills us."""
    parent = os.getppid()
    poller = select.epoll()
    socks = {}
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.setblocking(False)
        socks[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    print("ready", flush=True)
    while os.getppid() == parent:  # an orphan (sender gone) stops reading and exits
        for fd, _ in poller.poll(1.0):
            try:
                if not socks[fd].recv(65536):
                    poller.unregister(fd)
            except (BlockingIOError, ConnectionError):
                pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sendfloor",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("counts", type=int, nargs="+", help="connections, e.g. 1000 10000")
    parser.add_argument("--bytes", type=int, default=frame_bytes(519),
                        help="bytes per send (default: one frame of a 519-byte event)")
    parser.add_argument("--rate", type=float, default=5.0, help="passes per second (default 5)")
    parser.add_argument("--receiver-cores", default=None,
                        help="cores of the reader, e.g. 1 (default: not pinned)")
    parser.add_argument("--receive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    if args.receive is not None:
        receive(args.receive, args.counts[0])
        return
    cores = None if args.receiver_cores is None else {
        int(core) for core in args.receiver_cores.split(",")}
    print(json.dumps(measure(args.counts, args.bytes, cores, args.rate)), flush=True)


if __name__ == "__main__":
    main()
