"""``python -m bench``: the tutorial's server and changerelay, side by side, one table.

Both servers are measured the same way, one after the other, against one test primary:

1. start the server on the relay core; note its RSS; open the most clients of the session
   (1,000, or 10,000 with ``--full``) and note its RSS again: memory per idle connection;
2. from the most clients down: a fixed-rate run (``--rate`` events/s, latency), then a max-rate
   run (``insert_many`` bursts of ``--batch`` documents, throughput), then close clients down to
   the next count;
3. with ``--reuse-port N``: changerelay with N processes against 1, at the most fixed-rate
   clients (fixed rate: latency) and at 1,000 clients (max rate).

Cores: the server gets core 0; the load client, the primary and this harness share core 1.
Loopback's receive processing stays where the kernel puts it (``--loopback-rx client`` steers it
to core 1, see ``bench/loopback.py``), and a bare loop of ``send()`` measures the floor under the
fixed-rate runs (``bench/sendfloor.py``). The results go to ``bench/results/<UTC time>.json``
and a Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import urllib.parse
from pathlib import Path

from . import baseline, loopback, report, sendfloor
from .loadclient import raise_open_files_limit
from .procs import ROOT, LoadClient, Relay, Source, Tutorial
from .profile import Profiler, summary
from .scenarios import Bench, Inserter, Run

RESULTS = Path(__file__).resolve().parent / "results"
DB = "bench"
IDLE_SECONDS = 3.0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="add 10,000 clients (throughput, fixed rate, idle memory); slow")
    parser.add_argument("--clients", type=int, nargs="+",
                        help="client counts for the throughput runs (default 100 1000 [10000])")
    parser.add_argument("--fixed-clients", type=int, nargs="*",
                        help="client counts for the fixed-rate runs (default 1000 [10000])")
    parser.add_argument("--rate", type=float, default=5.0,
                        help="events/s of the fixed-rate runs (default 5)")
    parser.add_argument("--fixed-events", type=int, default=100,
                        help="events per fixed-rate run (default 100, i.e. 20 s at 5/s)")
    parser.add_argument("--deliveries", type=int, default=1_000_000,
                        help="target deliveries per max-rate run; events = this / clients, "
                             "clamped to 50..3000 (default 1000000)")
    parser.add_argument("--batch", type=int, default=500,
                        help="documents per insert_many in max-rate runs (default 500)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="max-rate runs per client count; the table shows the median and "
                             "the range (default 1)")
    parser.add_argument("--reuse-port", type=int, default=0, metavar="N",
                        help="also compare changerelay with REUSE_PORT=N against 1 process")
    parser.add_argument("--profile", type=int, metavar="CLIENTS",
                        help="py-spy each server during its max-rate run at CLIENTS clients "
                             "(needs pip install py-spy); stacks saved next to the results")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: include native (C) frames, e.g. socket send")
    parser.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for changerelay, e.g. --relay-env WS_PING_INTERVAL=600 "
                             "(repeatable)")
    parser.add_argument("--servers", nargs="+", default=["tutorial", "changerelay"],
                        choices=["tutorial", "changerelay"])
    parser.add_argument("--loopback-rx", choices=["client", "sender"], default="sender",
                        help="which core does loopback's TCP receive work: as the kernel does "
                             "by default, the sender's, i.e. the server's (default), or the "
                             "clients' (rps_cpus on lo, restored afterwards, needs root)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the send floor (a bare send() loop at each fixed-rate count)")
    parser.add_argument("--scenario", nargs="+", default=["fan-out"],
                        choices=["fan-out", "per-user", "ingest"],
                        help="fan-out: today's clients sharing one subscription (default); "
                             "per-user: each client its own owner filter, events spread over "
                             "owners; ingest: one all-events client, ~600-byte update events "
                             "as fast as the source gives them")
    parser.add_argument("--subscriptions", type=int, nargs="+", default=[10_000],
                        help="per-user: clients, each with its own subscription "
                             "(default 10000)")
    parser.add_argument("--per-user-events", type=int, default=1000,
                        help="per-user: events per batched run, one per owner (default 1000)")
    parser.add_argument("--single-events", type=int, default=200,
                        help="per-user: events one at a time, each delivered before the next "
                             "is written (default 200)")
    parser.add_argument("--ingest-orders", type=int, default=2000,
                        help="ingest: documents updated per round (default 2000)")
    parser.add_argument("--ingest-rounds", type=int, default=5,
                        help="ingest: update_many rounds over them (default 5)")
    parser.add_argument("--baseline", metavar="REV",
                        help="per-user and ingest: also run REV's relay (a git revision, e.g. "
                             "main), one after the other in the same run")
    return parser.parse_args(argv)


def cores() -> tuple[set[int], set[int]]:
    """(server cores, client cores): core 0 for the server, the rest for everything else."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        print("only one core: server and clients share it; numbers are not comparable to a "
              "2-core run", file=sys.stderr)
        return set(available), set(available)
    return {available[0]}, set(available[1:])


def relay_env(args) -> dict:
    env = {}
    for item in args.relay_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--relay-env {item!r}: write NAME=VALUE, e.g. WS_PING_INTERVAL=600")
        env[name] = value
    return env


def events_for(clients: int, deliveries: int) -> int:
    return max(50, min(3000, deliveries // clients))


def revision() -> str:
    """The commit measured, with ``+dirty`` if the relay's code has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=RESULTS.parent.parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "changerelay", "server.py"],
                               capture_output=True, text=True, cwd=RESULTS.parent.parent,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    model = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "revision": revision(),
            "loadavg_before": open("/proc/loadavg").read().split()[:3]}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def measure_server(bench: Bench, server, counts, fixed, args, results) -> None:
    server.start()
    server.wait_ready()
    top = max(counts + fixed)
    before = server.rss()
    reply = bench.connect(server, top)
    after = server.rss()
    results["memory"].append({"server": server.name, "connections": top,
                              "rss_before": before, "rss_after": after,
                              "bytes_per_connection": round((after - before) / top),
                              "connect_seconds": reply["seconds"]})
    log(f"{server.name}: {top} connections in {reply['seconds']}s, "
        f"{(after - before) / top / 1024:.1f} KiB each")
    profile = profile_path(args, results, server, "idle", top)
    idle = bench.idle(server, IDLE_SECONDS * (5 if profile else 1), profile)
    keep_profile(results, server, "idle", top, profile)
    results["idle"].append({"server": server.name, "connections": top, "cpu_per_s": idle})
    log(f"{server.name}: idle with {top} clients: {idle * 1000:.1f} ms CPU per second")
    for n in sorted(set(counts + fixed), reverse=True):
        bench.close_to(n)
        if n in fixed:
            profile = profile_path(args, results, server, "fixed-rate", n)
            record(results, bench.fixed_rate(server, args.fixed_events, args.rate, profile))
            keep_profile(results, server, "fixed-rate", n, profile)
        if n in counts:
            for repeat in range(args.repeat):
                profile = profile_path(args, results, server, "max-rate", n) if not repeat \
                    else None
                record(results, bench.max_rate(server, events_for(n, args.deliveries),
                                               args.batch, profile))
                keep_profile(results, server, "max-rate", n, profile)
    bench.close_to(0)


def profile_path(args, results, server, scenario: str, clients: int) -> Path | None:
    if clients != args.profile:
        return None
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / f"{results['stamp']}-profile-{server.name}-{scenario}-{clients}.txt"


def keep_profile(results, server, scenario: str, clients: int, path: Path | None) -> None:
    if path is not None:
        results["profiles"][f"{server.name} {scenario} {clients}"] = summary(path)


def record(results: dict, run: Run) -> None:
    results["runs"].append(run.as_dict())
    status = "ok" if run.complete else f"LOSS {run.detail}"
    log(f"{run.server} {run.scenario} {run.clients} clients x {run.events} events: "
        f"{run.deliveries_per_s:,} deliveries/s, p99 {run.latency_ms.get('p99')} ms, "
        f"{run.relay_cpu_us_per_delivery} us/delivery, source {run.events_per_s_inserted}/s "
        f"[{status}]")


def send_floor(args, fixed, payload: int, server_cores, client_cores) -> list[dict]:
    """The bare ``send()`` loop at each fixed-rate count, before any server starts."""
    if args.no_floor or not fixed:
        return []
    size = sendfloor.frame_bytes(payload)
    floor = sendfloor.run(sorted(fixed), size, args.rate, server_cores, client_cores)
    for point in floor:
        log(f"send floor: {point['clients']} sockets x {size} bytes: {point['us_per_send']} us "
            f"per send, {point['pass_ms']} ms per pass")
    return floor


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    counts = args.clients or ([100, 1000, 10000] if args.full else [100, 1000])
    fixed = args.fixed_clients if args.fixed_clients is not None else (
        [1000, 10000] if args.full else [1000])
    Profiler.native = args.profile_native
    server_cores, client_cores = cores()
    raise_open_files_limit()  # inherited by the servers, which the tutorial server needs
    os.sched_setaffinity(0, client_cores)
    started = datetime.datetime.now(datetime.UTC)
    results = {"started": started.isoformat(timespec="seconds"), "machine": machine(),
               "args": vars(args), "server_cores": sorted(server_cores),
               "client_cores": sorted(client_cores), "runs": [], "memory": [], "profiles": {},
               "idle": [],
               "stamp": f"{started:%Y%m%dT%H%M%SZ}"}
    most = max(counts + fixed + ([1000] if args.reuse_port > 1 else []))
    steering = loopback.steer(args.loopback_rx, client_cores, server_cores, clients=most)
    if steering.mode == "client":
        log(f"loopback receive work steered to core {sorted(client_cores)}: rps_cpus "
            f"{steering.mask}, netdev_max_backlog {steering.backlog}")
    try:
        run_all(args, counts, fixed, server_cores, client_cores, results)
    finally:
        results["machine"]["loopback_rx"] = steering.record()
        steering.restore()
    if results["machine"]["loopback_rx"]["dropped"]:
        log(f"{results['machine']['loopback_rx']['dropped']} packets dropped at a receive "
            "backlog during the run: TCP retransmitted them, latencies include that")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{results['stamp']}.json"
    path.write_text(json.dumps(results, indent=1))
    print(report.markdown(results))
    print(f"\nresults: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    failed = [r for r in results["runs"] if not r["complete"]]
    return 1 if failed else 0


def run_all(args, counts, fixed, server_cores, client_cores, results) -> None:
    source = Source(client_cores)
    load = LoadClient(client_cores)
    inserter = Inserter(source, DB)
    bench = Bench(source, inserter, load, DB)
    servers = []
    try:
        if "fan-out" in args.scenario:
            fan_out(args, counts, fixed, server_cores, client_cores, results, bench, servers)
        relays = [("changerelay", ROOT)]
        if args.baseline:
            relays.append((f"changerelay@{args.baseline}", baseline.checkout(args.baseline)))
        for name, root in relays:
            if "per-user" in args.scenario:
                per_user(args, bench, name, root, server_cores, results, servers)
            if "ingest" in args.scenario:
                ingest(args, bench, name, root, server_cores, results, servers)
    finally:
        for server in servers:
            server.stop()
        load.stop()
        inserter.close()
        source.stop()


# One WS_PING_INTERVAL (20 s): a whole round of pings, and four POSITION_INTERVALs.
PER_USER_IDLE_SECONDS = 20.0
CONNECTIONS_PER_SOURCE = 20_000  # a loopback source address has about 28,000 ephemeral ports


def per_user(args, bench: Bench, name: str, root: Path, cores, results, servers) -> None:
    """Each client its own owner filter: the relay's work per event should follow the events'
    owners, not the number of distinct subscriptions."""
    server = Relay(bench.source.uri, DB, cores, env=relay_env(args), root=root)
    server.name = name
    servers.append(server)
    server.start()
    server.wait_ready()
    for users in sorted(args.subscriptions):
        bench.close_to(0)
        path = "/socket?filter=" + urllib.parse.quote('{"fullDocument.owner":"u{i}"}', safe="{}")
        first = None
        for start in range(0, users, CONNECTIONS_PER_SOURCE):
            reply = bench.connect(server, min(CONNECTIONS_PER_SOURCE, users - start), path=path)
            first = reply["first"] if first is None else first
        # Quiet clients are first told their position POSITION_INTERVAL after they connect, a
        # share per pass: measured apart (idle, the same clients), so that the runs below start
        # in the steady state a long-lived deployment is in.
        settling = bench.idle(server, PER_USER_IDLE_SECONDS)
        runs = []
        for batch, events in ((args.batch, args.per_user_events), (1, args.single_events)):
            profile = profile_path(args, results, server, f"per-user-{batch}", users)
            runs.append(bench.per_user(server, first, users, events, batch, profile))
            keep_profile(results, server, f"per-user-{batch}", users, profile)
        # The same clients with no events (after the runs: every client has been told its
        # position once, as in a steady state): what quiet connections cost whatever the events
        # do, taken off each run's CPU for its marginal cost per event.
        idle = bench.idle(server, PER_USER_IDLE_SECONDS)
        for run in runs:
            run.detail["idle_cpu_ms_per_s"] = round(idle * 1000, 2)
            run.detail["idle_after_connecting_ms_per_s"] = round(settling * 1000, 2)
            marginal = (run.relay_cpu_s - idle * run.seconds) / max(run.events, 1)
            run.detail["marginal_cpu_us_per_event"] = round(marginal * 1e6, 1)
            record(results, run)
    bench.close_to(0)
    server.stop()


def ingest(args, bench: Bench, name: str, root: Path, cores, results, servers) -> None:
    """One client of every event, update events with their looked-up documents: what one
    process can read, encode and send per second."""
    env = {**relay_env(args), "FULL_DOCUMENT": "updateLookup"}
    server = Relay(bench.source.uri, DB, cores, env=env, root=root)
    server.name = name
    servers.append(server)
    server.start()
    server.wait_ready()
    bench.close_to(0)
    bench.prepare_orders(server, args.ingest_orders)
    bench.connect(server, 1)
    profile = profile_path(args, results, server, "ingest", 1)
    record(results, bench.ingest(server, args.ingest_orders, args.ingest_rounds, profile))
    keep_profile(results, server, "ingest", 1, profile)
    bench.close_to(0)
    server.stop()


def fan_out(args, counts, fixed, server_cores, client_cores, results, bench: Bench,
            servers: list) -> None:
    source = bench.source
    results["payload_bytes"] = report.payload_size(source.uri, DB)
    results["send_floor"] = send_floor(args, fixed, results["payload_bytes"], server_cores,
                                       client_cores)
    ceiling_events = events_for(min(counts), args.deliveries)
    results["ceiling"] = bench.ceiling(ceiling_events, args.batch, server_cores)
    log(f"source ceiling: {results['ceiling']['events_per_s']} events/s through a bare "
        f"change stream ({ceiling_events} events)")
    for name in args.servers:
        if name == "tutorial":
            server = Tutorial(source.uri, DB, server_cores)
        else:
            server = Relay(source.uri, DB, server_cores, env=relay_env(args))
        servers.append(server)
        measure_server(bench, server, counts, fixed, args, results)
        server.stop()
    if args.reuse_port > 1:
        every = server_cores | client_cores
        for processes in (1, args.reuse_port):
            relay = Relay(source.uri, DB, every, reuse_port=processes if processes > 1 else 0,
                          env=relay_env(args))
            relay.name = f"changerelay x{processes}"
            servers.append(relay)
            relay.start()
            relay.wait_ready()
            # One event per flush at the most fixed-rate clients: every delivery is its own
            # send(), so a pass over the sockets is the work a second process splits.
            top = max(fixed, default=0)
            if top:
                bench.connect(relay, top)
                run = bench.fixed_rate(relay, args.fixed_events, args.rate)
                run.scenario = "reuse-port-fixed"
                run.detail["processes"] = processes
                record(results, run)
                bench.close_to(1000)
            bench.connect(relay, 1000 - min(top, 1000) if top else 1000)
            for _ in range(args.repeat):
                run = bench.max_rate(relay, events_for(1000, args.deliveries), args.batch)
                run.scenario = "reuse-port"
                run.detail["processes"] = processes
                record(results, run)
            bench.close_to(0)
            relay.stop()


if __name__ == "__main__":
    sys.exit(main())
