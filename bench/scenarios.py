"""What one measurement does: connect, warm up, send events, count every delivery, read /proc.

A *delivery* is one change event received by one client. Every run asserts zero loss: each client
must count exactly the events inserted, no fewer and no more, or the run is marked failed and its
throughput is not reported.

Timing uses ``time.monotonic()`` in every process; on Linux that is one system-wide clock, so
"first insert sent" (here) and "last frame received" (in the load client) are comparable.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bson import Int64, ObjectId
from pymongo import MongoClient

from .procs import LoadClient, Server, Source, core_busy_seconds, cpu_seconds, family, spawn
from .profile import Profiler

COLLECTION = "events"
ORDERS = "orders"  # the ingest runs' documents, a collection each, apart from the warm-up's
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
    relay_cpu_us_per_event: float = 0.0  # per change event read from the stream
    events_per_s: float = 0.0       # events / wall seconds, first insert -> last frame
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
        self.runs = itertools.count()
        self.orders_coll = self.client[db][ORDERS]
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

    def owned(self, owners: list[int], batch: int) -> None:
        """One small document per owner (``u<owner>``), ``batch`` per insert_many."""
        for start in range(0, len(owners), batch):
            self.coll.insert_many([{"n": next(self.numbers), "owner": f"u{owner}",
                                    "name": "bench", "value": 1.5}
                                   for owner in owners[start:start + batch]], ordered=False)

    def orders(self, n: int) -> None:
        """``n`` documents shaped like a shop's orders (``order``), for update events, in a
        collection of their own."""
        self.orders_coll = self.client[self.coll.database.name][f"{ORDERS}{next(self.runs)}"]
        for start in range(0, n, 500):
            self.orders_coll.insert_many([order(i) for i in range(start, min(n, start + 500))])

    def update_orders(self, rounds: int) -> None:
        """Every order updated ``rounds`` times, one update_many a round: an update event per
        order per round, each about 600 bytes of BSON with its looked-up document."""
        for version in range(2, rounds + 2):
            now = datetime.datetime.now(datetime.UTC)
            self.orders_coll.update_many({}, {"$set": {"status": f"shipped {version}",
                                                       "updated": now,
                                                       "version": Int64(version)}})

    def close(self) -> None:
        self.client.close()


def order(i: int) -> dict:
    """A realistic small document: nested fields, a 5-item array, dates, ObjectIds, a 64-bit
    int. Its update event, with this as the looked-up document, is about 600 bytes of BSON."""
    now = datetime.datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=datetime.UTC)
    return {
        "_id": ObjectId(), "owner": f"u{i % 1000}", "status": "paid", "total": 129.95 + i,
        "version": Int64(1), "created": now, "updated": now,
        "customer": {"id": ObjectId(), "name": "Ada Lovelace", "city": "London"},
        "items": [f"SKU-{1000 + k}" for k in range(5)],
    }


class Bench:
    """The shared parts of every run: the source, the inserter and the load client."""

    def __init__(self, source: Source, inserter: Inserter, load: LoadClient, db: str):
        self.source, self.inserter, self.load, self.db = source, inserter, load, db
        self.sources = (f"127.0.0.{n}" for n in itertools.count(2))

    def harness_cpu(self) -> float:
        """CPU of everything on the client core: load client, primary and this process."""
        return self.load.cpu() + self.source.cpu() + cpu_seconds(os.getpid(), descendants=False)

    def connect(self, server: Server, n: int, concurrency: int = 100,
                path: str = "/socket") -> dict:
        """Open ``n`` more connections from a fresh source address (no port reuse across runs);
        ``{i}`` in ``path`` is each connection's number (the reply's ``first`` and on)."""
        if n <= 0:
            return {"connected": 0, "failed": 0}
        reply = self.load.ask("connect", port=server.port, n=n, source=next(self.sources),
                              concurrency=concurrency, timeout=60, path=path)
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
                profile: Path | None = None, expect: int | None = None,
                only: list[int] | None = None) -> Run:
        """Time ``send()`` until every client has its events: ``expect`` each (default:
        ``events``), or with ``only`` just the clients of those numbers, the others none."""
        run = Run(server.name, scenario, 0, events)
        if only is None:
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
        result = self.load.ask("wait", expect=events if expect is None else expect,
                               timeout=timeout, only=only)
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
            run.deliveries = clients * events if only is None else len(only) * (expect or 1)
            run.deliveries_per_s = round(run.deliveries / wall)
            run.events_per_s = round(events / wall, 1)
            run.relay_cpu_us_per_event = round(run.relay_cpu_s / events * 1e6, 2)
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

    def per_user(self, server: Server, first: int, users: int, events: int, batch: int,
                 profile: Path | None = None) -> Run:
        """``events`` inserts, each owned by another of ``users`` clients (numbered from
        ``first``, each subscribed to its own owner): ``batch`` per insert_many, or with
        ``batch`` 1 one at a time, the next insert only once the last was delivered."""
        stride = max(1, users // events)
        owners = [first + (n * stride) % users for n in range(min(events, users))]
        self.wait_clients(server, users)

        def one_at_a_time() -> None:
            for owner in owners:
                self.inserter.owned([owner], 1)
                self.load.ask("wait", expect=1, only=[owner], timeout=60)

        send = one_at_a_time if batch == 1 else (lambda: self.inserter.owned(owners, batch))
        run = self.measure(server, "per-user", len(owners), send, profile, expect=1,
                           only=owners)
        run.detail.update(subscriptions=users, batch=batch)
        return run

    def wait_clients(self, server: Server, n: int) -> None:
        """Until the server counts ``n`` clients (``/readyz``): a client joins the hub in its
        handshake, so then every one is live."""
        self.wait_status(server, "clients", n)

    def wait_status(self, server: Server, name: str, n: int, timeout: float = 120) -> None:
        """Until ``/readyz`` says ``name`` is at least ``n``, or fail."""
        deadline = time.monotonic() + timeout
        while server.status().get(name, 0) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name}: {name} {server.status().get(name)}, "
                                   f"not {n}")
            time.sleep(0.1)  # a poll interval, not a synchronisation

    def prepare_orders(self, server: Server, n: int) -> None:
        """The ingest run's documents, written and read by the relay before its client comes:
        only the updates are counted."""
        published = server.status().get("published", 0)
        self.inserter.orders(n)
        self.wait_status(server, "published", published + n)

    def ingest(self, server: Server, orders: int, rounds: int,
               profile: Path | None = None) -> Run:
        """One all-events client; ``rounds`` update_many over ``orders`` documents."""
        run = self.measure(server, "ingest", orders * rounds,
                           lambda: self.inserter.update_orders(rounds), profile)
        run.detail.update(orders=orders, rounds=rounds)
        return run

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
