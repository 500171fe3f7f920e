"""Turning results into the tables of BENCHMARKS.md (also usable on a saved JSON file).

``python -m bench.report bench/results/<file>.json`` prints the tables of an earlier run.
"""

from __future__ import annotations

import json
import sys

from bson import json_util
from pymongo import MongoClient

from .loopback import WHY


def payload_size(uri: str, db: str) -> int:
    """Bytes of one insert event as both servers send it (relaxed Extended JSON, compact)."""
    client = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        with client[db].watch(full_document="updateLookup") as stream:
            client[db]["probe"].insert_one({"n": -1, "name": "bench", "value": 1.5})
            change = stream.next()
        return len(json_util.dumps(change, json_options=json_util.RELAXED_JSON_OPTIONS,
                                   separators=(",", ":")).encode())
    finally:
        client.close()


def _rate(run: dict | None) -> str:
    if run is None:
        return "-"
    if not run["complete"]:
        return f"LOSS ({run['detail']['short']} short, {run['detail']['over']} over)"
    text = f"{run['deliveries_per_s']:,} /s"
    if run.get("repeats", 1) > 1:
        text += f" ({run['dps_low']:,}-{run['dps_high']:,}, {run['repeats']} runs)"
    return text + f", p99 {run['latency_ms'].get('p99', '?')} ms"


def _cpu(run: dict | None) -> str:
    if run is None or not run["complete"]:
        return "-"
    text = f"{run['relay_cpu_us_per_delivery']:.2f}"
    if run.get("repeats", 1) > 1:
        text += f" ({run['cpu_low']:.2f}-{run['cpu_high']:.2f})"
    return text


def _find(runs, server, scenario, clients):
    """The median of the matching runs (by deliveries/s), with the range of the others."""
    found = [r for r in runs if (r["server"], r["scenario"], r["clients"])
             == (server, scenario, clients)]
    if not found:
        return None
    if any(not r["complete"] for r in found):
        return next(r for r in found if not r["complete"])
    found.sort(key=lambda r: r["deliveries_per_s"])
    median = dict(found[len(found) // 2])
    cpus = [r["relay_cpu_us_per_delivery"] for r in found]
    median.update(repeats=len(found), dps_low=found[0]["deliveries_per_s"],
                  dps_high=found[-1]["deliveries_per_s"], cpu_low=min(cpus), cpu_high=max(cpus))
    return median


def markdown(results: dict) -> str:
    runs = results["runs"]
    m = results["machine"]
    out = [f"Machine: {m['nproc']} x {m['cpu']}, Python {m['python']}, Linux {m['kernel']}, "
           f"load average before the run {' '.join(m.get('loadavg_before', '?'))}, "
           f"revision {m.get('revision', '?')}; "
           f"server on core {results['server_cores']}, load client + primary + harness on core "
           f"{results['client_cores']}. Payload: {results.get('payload_bytes', '?')} bytes per "
           f"event. {_loopback(m, results['client_cores'])}", ""]
    ceiling = results.get("ceiling")
    if ceiling:
        out += [f"Source ceiling: a bare change stream on the server core received "
                f"{ceiling['events_per_s']:,} events/s ({ceiling['events']:,} events inserted "
                f"{ceiling['batch']} per insert_many at {ceiling['insert_events_per_s']:,}/s, "
                f"{ceiling['getmore_batches']} getMore batches): no server can relay faster.", ""]

    if any(r["scenario"] in ("max-rate", "reuse-port") for r in runs):
        out += _fan_out(runs)
    out += _scale(runs)

    fixed = [r for r in runs if r["scenario"] == "fixed-rate"]
    if fixed:
        out += ["", "### Fixed event rate (latency wallTime → frame received)", "",
                "| clients | rate | tutorial p50 / p99 / max ms | changerelay p50 / p99 / max ms "
                "| relay CPU µs/delivery (tutorial / changerelay) | server core busy (t / c) "
                "| kernel share (t / c) |",
                "|---:|---:|---|---|---|---|---|"]
        for n in sorted({r["clients"] for r in fixed}):
            t, c = (_find(runs, s, "fixed-rate", n) for s in ("tutorial", "changerelay"))
            rate = (t or c)["detail"]["rate"]
            out.append(f"| {n:,} | {rate:g}/s | {_lat(t)} | {_lat(c)} | {_cpu(t)} / {_cpu(c)} "
                       f"| {_busy(t)} / {_busy(c)} | {_kernel(t)} / {_kernel(c)} |")
    out += _floor(results)

    if results["memory"]:
        out += ["", "### Memory per idle connection (RSS delta ÷ connections)", "",
                "| server | connections | RSS before → after | per connection |",
                "|---|---:|---|---:|"]
        for mem in results["memory"]:
            out.append(f"| {mem['server']} | {mem['connections']:,} | "
                       f"{mem['rss_before'] / 2**20:.1f} → {mem['rss_after'] / 2**20:.1f} MiB | "
                       f"{mem['bytes_per_connection'] / 1024:.1f} KiB |")

    if results.get("idle"):
        out += ["", "Idle CPU (clients connected, no events): " + "; ".join(
            f"{i['server']} {i['cpu_per_s'] * 1000:.1f} ms/s with {i['connections']:,} clients"
            for i in results["idle"]) + "."]

    reuse = [r for r in runs if r["scenario"] == "reuse-port"]
    if reuse:
        out += ["", "### REUSE_PORT (relay allowed on every core, sharing core 1 with the "
                "clients)", "", "| processes | clients | deliveries/s, p99 | relay CPU µs/delivery "
                "| server CPU s / wall s |", "|---:|---:|---|---:|---:|"]
        for processes in sorted({r["detail"]["processes"] for r in reuse}):
            name = f"changerelay x{processes}"
            run = _find(reuse, name, "reuse-port", 1000)
            out.append(f"| {processes} | {run['clients']:,} | {_rate(run)} | "
                       f"{_cpu(run)} | {run['relay_core_busy']} |")
    reuse_fixed = [r for r in runs if r["scenario"] == "reuse-port-fixed"]
    if reuse_fixed:
        out += ["", "At a fixed rate (one event per flush: one send() per client per event, so "
                "the time of a pass over the sockets is what a second process can split):", "",
                "| processes | clients | rate | p50 / p99 / max ms | relay CPU µs/delivery "
                "| server CPU s / wall s |", "|---:|---:|---:|---|---:|---:|"]
        for run in sorted(reuse_fixed, key=lambda r: r["detail"]["processes"]):
            out.append(f"| {run['detail']['processes']} | {run['clients']:,} | "
                       f"{run['detail']['rate']:g}/s | {_lat(run)} | {_cpu(run)} | "
                       f"{run['relay_core_busy']} |")
    for name, table in results.get("profiles", {}).items():
        out += ["", f"### Profile: {name} (py-spy, busy samples of all threads)", "", table]
    return "\n".join(out)


def _fan_out(runs: list[dict]) -> list[str]:
    """The max-rate fan-out table and what bounded each run."""
    out = ["### Max-rate fan-out (deliveries/s, p99 latency wallTime → frame received)", "",
            "| clients | tutorial deliveries/s, p99 | changerelay deliveries/s, p99 "
            "| relay CPU µs/delivery (tutorial / changerelay) |",
            "|---:|---|---|---|"]
    counts = sorted({r["clients"] for r in runs if r["scenario"] == "max-rate"})
    for n in counts:
        t, c = _find(runs, "tutorial", "max-rate", n), _find(runs, "changerelay", "max-rate", n)
        out.append(f"| {n:,} | {_rate(t)} | {_rate(c)} | {_cpu(t)} / {_cpu(c)} |")

    out += ["", "What bounded each max-rate run (events/s the source achieved while inserting; "
            "CPU seconds per wall second: the server, our client side, and other programs on this "
            "machine during the run):", "",
            "| server | clients | events | inserted events/s | wall s "
            "| server core busy (kernel share) "
            "| client core busy | other programs | load client µs/delivery "
            "| p50 / p99 / max ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        if run["scenario"] in ("max-rate", "reuse-port"):
            out.append(_bounds(run))
    return out


def _scale(runs: list[dict]) -> list[str]:
    """The per-user and ingest runs: relay CPU per change event, and events/s end to end."""
    out: list[str] = []
    per_user = [r for r in runs if r["scenario"] == "per-user"]
    if per_user:
        out += ["", "### Per-user subscriptions (each client its own owner filter, each event "
                "for one of them)", "",
                "| server | subscriptions | events arrive | events | relay CPU µs per event "
                "| minus idle, µs per event | idle ms/s | events/s | p50 / p99 ms |",
                "|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for run in per_user:
            detail = run["detail"]
            batch = detail["batch"]
            arrive = "one at a time" if batch == 1 else f"{batch} per insert_many"
            marginal = detail.get("marginal_cpu_us_per_event")
            idle = detail.get("idle_cpu_ms_per_s")
            out.append(f"| {run['server']} | {detail['subscriptions']:,} | {arrive} | "
                       f"{run['events']:,} | {_per_event(run)} | "
                       f"{'-' if marginal is None else f'{marginal:,.1f}'} | "
                       f"{'-' if idle is None else idle} | {_events_per_s(run)} | "
                       f"{_lat(run)} |")
    ingest = [r for r in runs if r["scenario"] == "ingest"]
    if ingest:
        out += ["", "### Ingest (one all-events client, update events with their looked-up "
                "documents)", "",
                "| server | events | relay CPU µs per event | events/s delivered "
                "| events/s written | server core busy | primary CPU s |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for run in ingest:
            out.append(f"| {run['server']} | {run['events']:,} | {_per_event(run)} | "
                       f"{_events_per_s(run)} | {run['events_per_s_inserted']:,} | "
                       f"{run['relay_core_busy']} | {run['source_cpu_s']} |")
    return out


def _per_event(run: dict) -> str:
    return f"{run['relay_cpu_us_per_event']:,.1f}" if run["complete"] else "LOSS"


def _events_per_s(run: dict) -> str:
    return f"{run['events_per_s']:,.0f}" if run["complete"] else "-"


def _loopback(machine: dict, client_cores) -> str:
    """Which core did the clients' TCP receive work; results before ``--loopback-rx`` don't say."""
    rx = machine.get("loopback_rx")
    if rx is None:
        return ("Loopback receive work: not recorded (an older results file; the kernel default "
                "does it inside the sender's send(), on the server core).")
    drops = rx.get("dropped")
    drops = "" if drops is None else (
        f" Packets dropped at a receive backlog during the run: {drops:,}"
        + (" (TCP retransmitted them; latencies include that)." if drops else "."))
    if rx["mode"] == "client":
        return (f"Loopback receive work on the client core {client_cores} (rps_cpus {rx['mask']} "
                f"on lo, netdev_max_backlog {rx.get('backlog', '?')}): {WHY}.{drops}")
    why = f" ({rx['reason']})" if rx.get("reason") else ""
    return (f"Loopback receive work in the sender's send(){why}: the server core also pays for "
            "its clients' kernel receive work, which a real network does on the client's "
            f"machine.{drops}")


def _floor(results: dict) -> list[str]:
    """The bare ``send()`` loop next to the fixed-rate table: the sends alone, no relay."""
    floor = results.get("send_floor")
    if not floor:
        return []
    out = ["", f"Send floor, what one pass over every socket costs with no relay at all: a bare "
           f"loop of socket.send of {floor[0]['bytes']} bytes (one event frame) to each loopback "
           f"TCP connection, on core {results['server_cores']}, read by an epoll loop on core "
           f"{results['client_cores']}; median of {floor[0]['passes']} passes. A floor: spaced "
           "by the relay's own work, each send costs more.", "",
           "| clients | µs per send (wall / CPU) | one pass, ms (median / max) |",
           "|---:|---|---|"]
    for point in floor:
        out.append(f"| {point['clients']:,} | {point['us_per_send']:.2f} / "
                   f"{point['cpu_us_per_send']:.2f} | {point['pass_ms']:.1f} / "
                   f"{point['pass_ms_max']:.1f} |")
    return out


def _bounds(run: dict) -> str:
    lat = run["latency_ms"]
    return (f"| {run['server']} | {run['clients']:,} | {run['events']:,} | "
            f"{run['events_per_s_inserted']:,} | {run['seconds']:.2f} | {run['relay_core_busy']} "
            f"({run.get('relay_system_share', '?')}) "
            f"| {run['client_core_busy']} | {run.get('others_busy', '?')} "
            f"| {run.get('load_cpu_us_per_delivery', '?')} "
            f"| {lat.get('p50', '?')} / {lat.get('p99', '?')} / "
            f"{lat.get('max', '?')} |")


def _lat(run: dict | None) -> str:
    if run is None:
        return "-"
    lat = run["latency_ms"]
    text = f"{lat.get('p50', '?')} / {lat.get('p99', '?')} / {lat.get('max', '?')}"
    return text if run["complete"] else f"LOSS ({text})"


def _kernel(run: dict | None) -> str:
    return "-" if run is None else f"{run.get('relay_system_share', '?')}"


def _busy(run: dict | None) -> str:
    return "-" if run is None else f"{run['relay_core_busy']}"


if __name__ == "__main__":
    with open(sys.argv[1]) as saved:
        print(markdown(json.loads(saved.read())))
