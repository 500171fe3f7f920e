"""``python -m bench.hub``: the hub's CPU per event with many distinct subscriptions, in process.

A per-user feed gives every client its own subscription (``{"fullDocument.owner": "u<i>"}`` as
its filter, or as its token's row rule). This builds a ``Hub`` with one fake client per user
(no sockets: a client counts what it is handed), publishes events spread over the users, and
times the hub's own work — matching and packing — per event, both in batches (as a busy change
stream delivers them) and one at a time (a flush per event, as a quiet one does). Every client
must have been handed exactly its own events, or the run fails: a fast wrong hub measures
nothing. ``--kind shared`` gives every client the one subscription to everything instead (fan-out),
to check that routing costs shared subscriptions nothing; ``--kind live`` makes each a live
query's (``snapshot=1``): filed by its collection, so every one judges every event (the
inserts here are not its own: no leave).

``--baseline REV`` runs the same measurement on another revision's ``changerelay`` (see
``bench/baseline.py``) and prints both.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Sequence

from changerelay import events as ev
from changerelay.filters import compile_filter
from changerelay.hub import Hub
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription

from .baseline import checkout


class FakeClient:
    """What the hub needs of a client (``hub.Subscriber``), counting instead of sending."""

    encoding = "ws"

    def __init__(self, subscription: Subscription):
        self.subscription = subscription
        self.last_send = 0.0
        self.told: str | None = None
        self.announced = False  # told ready (once, at subscribe)
        self.received = 0

    def pack(self, events: Sequence[ev.Delivery]) -> bytes:
        return b"".join(event.frame for event in events)

    def deliver(self, events: Sequence[ev.Delivery], payload: bytes) -> None:
        self.received += len(events)

    def replay(self, events: Sequence[ev.Delivery]) -> None:
        self.received += len(events)

    def send_control(self, message: bytes, token: str | None = None) -> None:
        pass


def subscription(user: int, kind: str) -> Subscription:
    if kind == "shared":
        return Subscription()  # fan-out: every client shares one subscription to everything
    spec = {"fullDocument.owner": f"u{user}"}
    if kind == "rule":
        return Subscription(access=AccessRule(spec, post_images=True))
    if kind == "live":  # a live query: every change in its collection, a leave when not its own
        return Subscription([("bench", "events")], filter=compile_filter(spec), live=True)
    return Subscription(filter=compile_filter(spec))


def change(n: int, user: int) -> ev.Event:
    """An insert of a small document owned by ``user``."""
    return ev.encode_change({
        "_id": {"_data": f"82{n:016X}"}, "operationType": "insert",
        "ns": {"db": "bench", "coll": "events"}, "documentKey": {"_id": n},
        "fullDocument": {"_id": n, "owner": f"u{user}", "n": n, "name": "bench", "value": 1.5}})


def measure(users: int, events: int, batch: int, kind: str) -> dict:
    hub: Hub[FakeClient] = Hub(lambda flush: None, lambda client, after: None, 10_000, 1 << 26)
    hub.start(f"82{0:016X}")
    clients = [FakeClient(subscription(user, kind)) for user in range(users)]
    for client in clients:
        hub.subscribe(client)
    stride = max(1, users // events)  # spread over the users, every event to one of them
    owners = [(n * stride) % users for n in range(events)]
    published = [change(n + 1, owner) for n, owner in enumerate(owners)]
    gc.collect()
    started = time.process_time()
    for start in range(0, events, batch):
        for event in published[start:start + batch]:
            hub.publish(event)
        hub.flush()
    seconds = time.process_time() - started
    expected = {owner: owners.count(owner) for owner in set(owners)}
    everything = kind == "shared"
    wrong = sum(client.received != (events if everything else expected.get(user, 0))
                for user, client in enumerate(clients))
    if wrong:
        raise SystemExit(f"{wrong} of {users} clients were handed the wrong events")
    return {"subscriptions": users, "kind": kind, "batch": batch, "events": events,
            "us_per_event": round(seconds / events * 1e6, 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__)
    parser.add_argument("--subscriptions", type=int, nargs="+",
                        default=[100, 1000, 10_000, 100_000])
    parser.add_argument("--events", type=int, default=2000,
                        help="events per run; at most 2000/10 one at a time past 1,000 "
                             "subscriptions on a hub that asks every one (default 2000)")
    parser.add_argument("--batch", type=int, default=500, help="events per flush (default 500)")
    parser.add_argument("--kind", choices=["filter", "rule", "shared", "live"], nargs="+",
                        default=["filter"],
                        help="the owner condition as the client's filter or a token's row rule; "
                             "shared: one subscription to everything for every client (fan-out)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of CPU a run may take, from the first run's cost per "
                             "subscription: fewer events when the hub is slow (default 20)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure REV's changerelay (a git revision), side by side")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    results = []
    per_subscription_event = None  # seconds, from the first run: sizes the later ones
    for kind in args.kind:
        for users in args.subscriptions:
            for batch in (args.batch, 1):
                events = args.events
                if per_subscription_event is not None:
                    affordable = int(args.budget / (per_subscription_event * users) + 1)
                    events = max(20, min(events, affordable))
                result = measure(users, events, batch, kind)
                cost = result["us_per_event"] / 1e6 / users
                per_subscription_event = max(per_subscription_event or 0.0, cost)
                results.append(result)
                if args.json:
                    print(json.dumps(result), flush=True)
                else:
                    print(f"{kind} {users:>7,} subscriptions, "
                          f"{'one at a time' if batch == 1 else f'batches of {batch}'}: "
                          f"{result['us_per_event']:,.1f} µs per event ({events} events)",
                          file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ours = run(args)
    if args.baseline is None:
        print(table({"this checkout": ours}))
        return
    root = checkout(args.baseline)
    forwarded = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    at = forwarded.index("--baseline")
    del forwarded[at:at + 2]
    lines = subprocess.run([sys.executable, "-m", "bench.hub", *forwarded, "--json"],
                           cwd=root, check=True, stdout=subprocess.PIPE, text=True).stdout
    theirs = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    print(table({"this checkout": ours, args.baseline: theirs}))


def table(runs: dict[str, list[dict]]) -> str:
    names = list(runs)
    out = ["| condition | subscriptions | events per flush | "
           + " | ".join(f"µs per event, {name}" for name in names) + " |",
           "|---|---:|---:|" + "---:|" * len(names)]
    keyed = {name: {(r["kind"], r["subscriptions"], r["batch"]): r for r in results}
             for name, results in runs.items()}
    for key in keyed[names[0]]:
        kind, users, batch = key
        cells = [f"{keyed[name][key]['us_per_event']:,.1f}" if key in keyed[name] else "-"
                 for name in names]
        out.append(f"| {kind} | {users:,} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
