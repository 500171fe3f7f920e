"""Prometheus metrics: the relay's one registry, and the tallies the rest of the relay feeds it.

Why tallies: the per-event path must not pay for metrics. The hub adds a group's deliveries and
bytes to plain integers once per group per flush (``delivered``), and the counts the relay keeps
anyway (events published, streams reopened) are read, not counted twice; ``refresh`` turns all
of them into Prometheus values once a second and before every scrape, so a scrape is exact for
the process that answers it and at most a second behind for the others.

Why multiprocess mode: with ``REUSE_PORT=N`` workers a scrape reaches one worker at random, and
each worker has its own clients and change stream. The supervisor gives the workers a directory
of their own for the run (``worker_directory``); prometheus-client then keeps every worker's
values in memory-mapped files there, and any worker's ``/metrics`` adds them up. Gauges say how
they add up: clients and catch-up streams are summed over the live workers, ``source_up`` is
the lowest (0 when any worker's change stream is down), lag and buffer the highest.
"""

from __future__ import annotations

import hmac
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .admission import Refusal

# prometheus-client is imported where it is used, never when this module is: it decides at its
# first import whether values are shared between processes, so the supervisor must set up
# ``worker_directory`` first.

if TYPE_CHECKING:
    from .events import Delivery
    from .hub import Subscriber

DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
TRANSPORTS = ("ws", "sse")
# Seconds from a change's commit (its wallTime, milliseconds) to the socket: from a busy loopback
# to a relay minutes behind.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format 0.0.4


def transport(encoding: str) -> str:
    """``ws`` or ``sse``: a client encoding's first word (``ws-deflate``, ``sse-chunked``)."""
    return encoding.partition("-")[0]


@contextmanager
def worker_directory() -> Iterator[str]:
    """A directory for this run's workers to share their values in, removed at the end: one
    left from an earlier run would add that run's counts to this one's."""
    directory = tempfile.mkdtemp(prefix="changerelay-metrics-")
    os.environ[DIRECTORY_VARIABLE] = directory
    try:
        yield directory
    finally:
        del os.environ[DIRECTORY_VARIABLE]
        shutil.rmtree(directory, ignore_errors=True)


def check_scraper(bearer: str | None, token: str | None) -> None:
    """Let a scrape through when METRICS_TOKEN is unset or its ``Authorization: Bearer`` is
    METRICS_TOKEN; else a ``Refusal`` (401 without a token, 403 with another one)."""
    if token is None:
        return
    if bearer is None:
        raise Refusal("missing_token", "/metrics needs METRICS_TOKEN: send Authorization: "
                      "Bearer <METRICS_TOKEN> (Prometheus: authorization.credentials)")
    if not hmac.compare_digest(bearer.encode(), token.encode()):
        raise Refusal("metrics_token_mismatch", "this is not the relay's METRICS_TOKEN: check "
                      "the scraper's credentials")


def worker_gone(pid: int) -> None:
    """A worker exited: its live gauges no longer count (its counters still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class State:
    """What ``refresh`` reads: the gauges' values, and running totals the relay keeps."""

    __slots__ = ("buffered", "catchup_streams", "clients", "lag", "received", "reopens", "up")

    def __init__(self, clients: Mapping[str, int], catchup_streams: int, buffered: int,
                 up: bool, lag: float | None, received: int, reopens: int):
        self.clients = clients
        self.catchup_streams = catchup_streams
        self.buffered = buffered
        self.up = up
        self.lag = lag
        self.received = received
        self.reopens = reopens


class Metrics:
    """The registry (one per relay) and the tallies that feed it."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        # *_created series would differ between one process and many.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = self.registry = CollectorRegistry()
        self.shared = DIRECTORY_VARIABLE in os.environ
        self.clients = Gauge("changerelay_clients", "Connected clients", ["transport"],
                             registry=registry, multiprocess_mode="livesum")
        self.received = Counter("changerelay_events_received",
                                "Change events received from MongoDB", registry=registry)
        self.deliveries = Counter("changerelay_deliveries",
                                  "Events (and leaves) written to clients, one per client",
                                  ["transport"], registry=registry)
        self.bytes = Counter("changerelay_bytes_sent",
                             "Bytes of events written to clients (WebSocket frames; SSE records, "
                             "live ones with their HTTP/1.1 chunk framing)", ["transport"],
                             registry=registry)
        self.disconnects = Counter("changerelay_disconnects", "Clients gone, by reason",
                                   ["reason"], registry=registry)
        self.refusals = Counter("changerelay_handshake_refusals",
                                "Handshakes refused, by HTTP status", ["status"],
                                registry=registry)
        self.up = Gauge("changerelay_source_up", "1 while the change stream is open",
                        registry=registry, multiprocess_mode="livemin")
        self.reopens = Counter("changerelay_source_reopens",
                               "Change stream opened again after the first time",
                               registry=registry)
        self.catchup_streams = Gauge("changerelay_catchup_streams",
                                     "Catch-up change streams open", registry=registry,
                                     multiprocess_mode="livesum")
        self.buffered = Gauge("changerelay_replay_buffer_events", "Events in the replay buffer",
                              registry=registry, multiprocess_mode="livemax")
        self.lag = Gauge("changerelay_source_lag_seconds",
                         "Receive time minus the last event's wallTime", registry=registry,
                         multiprocess_mode="livemax")
        self.latency = Histogram("changerelay_delivery_latency_seconds",
                                 "Commit wallTime to written to the socket, once per "
                                 "subscription group per flush", registry=registry,
                                 buckets=LATENCY_BUCKETS)
        for name in TRANSPORTS:  # present from the start, at 0
            self.clients.labels(name)
            self.deliveries.labels(name)
            self.bytes.labels(name)
        self._delivered = dict.fromkeys(TRANSPORTS, 0)  # since the last refresh
        self._sent = dict.fromkeys(TRANSPORTS, 0)
        self._received = self._reopens = 0  # the running totals as of the last refresh

    # -- per flush ---------------------------------------------------------------------------

    def delivered(self, matched: Sequence[Delivery], payloads: Mapping[str, bytes],
                  encodings: Mapping[str, int]) -> None:
        """A group's flush: ``matched`` written as ``payloads[encoding]`` to its
        ``encodings[encoding]`` clients of each encoding."""
        count = len(matched)
        for encoding, payload in payloads.items():
            clients = encodings.get(encoding, 0)
            name = transport(encoding)
            self._delivered[name] += count * clients
            self._sent[name] += len(payload) * clients
        commit = matched[0].committed
        if commit is not None:
            self.latency.observe(max(0.0, time.time() - commit))

    def replayed(self, client: Subscriber, events: Sequence[Delivery]) -> None:
        """History (a replay, a catch-up) or events held back for a client resuming ahead."""
        name = transport(client.encoding)
        self._delivered[name] += len(events)
        self._sent[name] += sum(map(client.weight, events))

    # -- per connection ----------------------------------------------------------------------

    def refused(self, status: int) -> None:
        self.refusals.labels(str(status)).inc()

    def disconnected(self, reason: str) -> None:
        self.disconnects.labels(reason).inc()

    # -- per second and per scrape -----------------------------------------------------------

    def refresh(self, state: State) -> None:
        for name in TRANSPORTS:
            self.clients.labels(name).set(state.clients.get(name, 0))
            if self._delivered[name]:
                self.deliveries.labels(name).inc(self._delivered[name])
                self._delivered[name] = 0
            if self._sent[name]:
                self.bytes.labels(name).inc(self._sent[name])
                self._sent[name] = 0
        self.catchup_streams.set(state.catchup_streams)
        self.buffered.set(state.buffered)
        self.up.set(1 if state.up else 0)
        if state.lag is not None:
            self.lag.set(state.lag)
        if state.received > self._received:
            self.received.inc(state.received - self._received)
            self._received = state.received
        if state.reopens > self._reopens:
            self.reopens.inc(state.reopens - self._reopens)
            self._reopens = state.reopens

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of every worker in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not self.shared:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)
