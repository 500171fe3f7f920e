"""What one measurement does: connect, warm up, send events, count every delivery, read /proc.

A *delivery* is one change event received by one client. Every run asserts zero loss: each client
must count exactly the events inserted, no fewer and no more, or the run is marked failed and its
throughput is not reported.

Timing uses ``time.monotonic()`` in every process; on Linux that is one system-wide clock, so
"first insert sent" (here) and "last frame received" (in the load client) are comparable.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pymongo import MongoClient

from .procs import LoadClient, Server, Source, core_busy_seconds, cpu_seconds, family, spawn
from .profile import Profiler

COLLECTION = "events"
LATENCY_CLIENTS = 100  # latencies are recorded on about this many clients of a run


@dataclass
class Run:
    """One measured run; ``asdict`` of it is what goes into the JSON results."""

    server: str
    scenario: str
    clients: int
    events: int
    complete: bool = False
    deliveries: int = 0
    seconds: float = 0.0            # first insert sent -> last frame received
    deliveries_per_s: float = 0.0
    insert_seconds: float = 0.0     # first insert sent -> last insert acknowledged
    events_per_s_inserted: float = 0.0
    relay_cpu_s: float = 0.0        # from /proc/PID/task/*/schedstat (ns)
    relay_cpu_s_stat: float = 0.0   # the same from /proc/PID/stat utime+stime (10 ms ticks)
    relay_system_share: float = 0.0  # stime / (utime + stime): the kernel's part (send())
    relay_cpu_us_per_delivery: float = 0.0
    relay_core_busy: float = 0.0    # relay CPU seconds / wall seconds (1.0 = one core saturated)
    client_core_busy: float = 0.0   # load client + primary + harness CPU / wall seconds
    others_busy: float = 0.0        # CPU other programs used on both cores / wall seconds
    load_cpu_us_per_delivery: float = 0.0  # the load client's own cost, to show it is not the limit
    source_cpu_s: float = 0.0       # the test primary's CPU during the run
    latency_ms: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Inserter:
    """Inserts small documents into the watched database through the real driver."""

    def __init__(self, source: Source, db: str):
        self.client = MongoClient(source.uri, serverSelectionTimeoutMS=5000)
        self.coll = self.client[db][COLLECTION]
        self.numbers = itertools.count()

    def docs(self, n: int) -> list[dict]:
        return [{"n": next(self.numbers), "name": "bench", "value": 1.5} for _ in range(n)]

    def burst(self, events: int, batch: int) -> None:
        left = events
        while left:
            n = min(batch, left)
            self.coll.insert_many(self.docs(n), ordered=False)
            left -= n

    def paced(self, events: int, rate: float) -> None:
        """One insert every 1/rate seconds on a fixed schedule (late ticks do not drift it)."""
        start = time.monotonic()
        for index in range(events):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the source, not waiting for a result
            self.coll.insert_one(self.docs(1)[0])

    def close(self) -> None:
        self.client.close()


class Bench:
    """The shared parts of every run: the source, the inserter and the load client."""

    def __init__(self, source: Source, inserter: Inserter, load: LoadClient, db: str):
        self.source, self.inserter, self.load, self.db = source, inserter, load, db
        self.sources = (f"127.0.0.{n}" for n in itertools.count(2))

    def harness_cpu(self) -> float:
        """CPU of everything on the client core: load client, primary and this process."""
        return self.load.cpu() + self.source.cpu() + cpu_seconds(os.getpid(), descendants=False)

    def connect(self, server: Server, n: int, concurrency: int = 100) -> dict:
        """Open ``n`` more connections from a fresh source address (no port reuse across runs)."""
        if n <= 0:
            return {"connected": 0, "failed": 0}
        reply = self.load.ask("connect", port=server.port, n=n, source=next(self.sources),
                              concurrency=concurrency, timeout=60)
        if reply["failed"]:
            raise RuntimeError(f"{server.name}: {reply['failed']} of {n} connections failed, "
                               f"e.g. {reply['errors']}")
        return reply

    def close_to(self, keep: int) -> dict:
        return self.load.ask("close", keep=keep, timeout=30)

    def warm_up(self, server: Server) -> None:
        """One event to every client: proves the stream is open and every client is live."""
        self.load.ask("arm")
        self.inserter.burst(1, 1)
        result = self.load.ask("wait", expect=1, timeout=30)
        if not result["complete"]:
            raise RuntimeError(f"{server.name}: warm-up event did not reach every client "
                               f"exactly once: {result}")

    def measure(self, server: Server, scenario: str, events: int, send,
                profile: Path | None = None) -> Run:
        run = Run(server.name, scenario, 0, events)
        self.warm_up(server)
        every = max(1, self.load.ask("arm")["armed"] // LATENCY_CLIENTS)
        self.load.ask("arm", latency_every=every)
        profiler = None if profile is None else Profiler(family(server.proc.pid), profile)
        ticks0, load0, source0 = server.cpu_ticks(), self.load.cpu(), self.source.cpu()
        system0 = server.cpu_ticks(system_only=True)
        cpu0, other0, cores0 = server.cpu(), self.harness_cpu(), core_busy_seconds()
        start = time.monotonic()
        send()
        inserted = time.monotonic()
        timeout = 60 + events * 0.5
        result = self.load.ask("wait", expect=events, timeout=timeout)
        cpu1, other1, cores1 = server.cpu(), self.harness_cpu(), core_busy_seconds()
        run.relay_cpu_s_stat = round(server.cpu_ticks() - ticks0, 2)
        if run.relay_cpu_s_stat:
            system = server.cpu_ticks(system_only=True) - system0
            run.relay_system_share = round(system / run.relay_cpu_s_stat, 2)
        load_cpu = self.load.cpu() - load0
        run.source_cpu_s = round(self.source.cpu() - source0, 3)
        if profiler is not None:
            run.detail["profile"] = str(profiler.stop())
        clients = result["clients"]
        run.clients = clients
        run.complete = result["complete"]
        run.insert_seconds = round(inserted - start, 4)
        run.events_per_s_inserted = round(events / max(inserted - start, 1e-9), 1)
        run.latency_ms = result["latency_ms"]
        run.detail.update({k: result[k] for k in ("min", "max", "short", "over", "closed",
                                                  "controls", "pings", "unstamped")})
        run.detail["latency_every"] = every
        run.relay_cpu_s = round(cpu1 - cpu0, 3)
        last = result["last"] or time.monotonic()
        wall = max(last - start, 1e-9)
        run.seconds = round(wall, 4)
        run.relay_core_busy = round(run.relay_cpu_s / wall, 3)
        run.client_core_busy = round((other1 - other0) / wall, 3)
        everyone = sum(cores1.values()) - sum(cores0.values())
        run.others_busy = round(max(0.0, everyone - run.relay_cpu_s - (other1 - other0)) / wall,
                                3)
        if run.complete:
            run.deliveries = clients * events
            run.deliveries_per_s = round(run.deliveries / wall)
            run.relay_cpu_us_per_delivery = round(run.relay_cpu_s / run.deliveries * 1e6, 3)
            run.load_cpu_us_per_delivery = round(load_cpu / run.deliveries * 1e6, 3)
        return run

    def ceiling(self, events: int, batch: int, cpus: set[int] | None) -> dict:
        """Events/s through a bare change stream on the server core (see ``bench/ceiling.py``)."""
        proc = spawn([sys.executable, "-m", "bench.ceiling", self.source.uri, self.db,
                      str(events)], cpus, stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("bench/ceiling.py did not start; run it by hand to see why")
            start = time.monotonic()
            self.inserter.burst(events, batch)
            inserted = time.monotonic()
            result = json.loads(proc.stdout.readline())
        finally:
            proc.kill()
            proc.wait()
        seconds = result["last"] - start
        return {"events": events, "batch": batch, "seconds": round(seconds, 3),
                "events_per_s": round(events / seconds, 1),
                "insert_events_per_s": round(events / (inserted - start), 1),
                "getmore_batches": result["batches"]}

    def max_rate(self, server: Server, events: int, batch: int,
                 profile: Path | None = None) -> Run:
        return self.measure(server, "max-rate", events,
                            lambda: self.inserter.burst(events, batch), profile)

    def idle(self, server: Server, seconds: float, profile: Path | None = None) -> float:
        """Server CPU seconds per wall second with its clients connected and no events."""
        profiler = None if profile is None else Profiler(family(server.proc.pid), profile)
        cpu0, start = server.cpu(), time.monotonic()
        time.sleep(seconds)  # a measurement window, not a synchronisation
        idle = round((server.cpu() - cpu0) / (time.monotonic() - start), 4)
        if profiler is not None:
            profiler.stop()
        return idle

    def fixed_rate(self, server: Server, events: int, rate: float,
                   profile: Path | None = None) -> Run:
        run = self.measure(server, f"{rate:g}/s", events,
                           lambda: self.inserter.paced(events, rate), profile)
        run.scenario = "fixed-rate"
        run.detail["rate"] = rate
        return run
