"""Wiring: one relay per process — config, change source, hub, catch-up, handlers, server.

The ``Relay`` is the object handlers talk to; it owns the policy decisions that involve more than
one room (admission, where a resuming client starts), so the handlers stay thin and the hub stays
free of I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import resource
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logzero import logger
from pymongo import AsyncMongoClient
from tornado import netutil, web
from tornado.ioloop import PeriodicCallback

from . import admission, handlers, logs, metrics, snapshot
from . import events as ev
from . import subscription as subs
from .buffers import Buffers
from .catchup import CatchUp
from .clients import Client, EventStreamClient, WebSocketClient
from .config import Config, describe
from .disconnect import cause_of
from .gate import Gate, Limits
from .hub import Hub
from .listener import Listener
from .livequery import LiveQueries, Opened
from .pinger import Pinger
from .source import ChangeSource
from .tornado_internals import GatedServer

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest

    from .auth import Authenticator, Claims


def _bundled(name: str) -> Path:
    """``templates/`` or ``static/``: at the top of a checkout, inside the package once installed
    (``pip install .`` maps them there; see pyproject.toml)."""
    package = Path(__file__).resolve().parent
    installed = package / name
    return installed if installed.is_dir() else package.parent / name


# WebSockets are pinged a slice at a time (see Relay.ping): with WS_PING_INTERVAL=20 one slice
# each second, so of 10,000 connections about 500 pongs come back together, not 10,000.
PING_SLICES = 20
# A pinged connection is closed when its slice comes round again unanswered: this share of
# WS_PING_INTERVAL, so that the next visit (one interval on) is past the deadline.
PONG_DEADLINE = 0.99
POSITION_SLACK = 100  # positions per pass on top of the even share
# Tokens' exp is checked this often: a connection outlives its token (and AUTH_LEEWAY_SECONDS) by at
# most this long, and a pass over 10,000 clients costs a few milliseconds.
EXPIRY_CHECK_SECONDS = 1.0
# Connections the kernel queues before they are accepted: room for a crowd of clients that
# reconnect at once after a restart (Tornado's default is 128).
LISTEN_BACKLOG = 1024
# SIGTERM's promise: the process has ended SHUTDOWN_TIMEOUT and at most this much after it.
EXIT_MARGIN_SECONDS = 0.5
# Seconds between the metrics' refreshes (a scrape refreshes its own process's too).
METRICS_REFRESH_SECONDS = 1.0
# The open-files limit asked for when the hard limit is unlimited.
OPEN_FILES_WHEN_UNLIMITED = 1 << 20


class Relay:
    def __init__(self, config: Config, mongo_client: AsyncMongoClient[Any] | None = None):
        self.config = config
        loop = asyncio.get_running_loop()
        self.metrics = metrics.Metrics()
        self.hub: Hub[Client] = Hub(loop.call_soon, self._from_history, config.replay_buffer,
                                    config.replay_buffer_bytes, self.metrics)
        self.source = ChangeSource(config, self.hub, mongo_client, on_state=self.tell_everyone)
        self.catchup: CatchUp[Client] = CatchUp(self.hub, self.source.open_stream,
                                                config.catchup_streams, self.source.missing_image,
                                                per_peer=config.catchup_streams_per_peer)
        self.live = LiveQueries(self.source.mongo, config.snapshot_reads,
                                config.snapshot_reads_per_peer, config.snapshot_limit,
                                self._mark, self._attach_live)
        self.snapshotting: set[Client] = set()  # live queries still sending their snapshot
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = admission.Connections(config.max_connections,
                                                 config.max_connections_per_ip)
        self.buffers = Buffers(config.max_buffered_bytes, loop.call_soon)
        self.hosts = admission.allowed_hosts(config.allowed_hosts, config.host, config.port)
        self.auth: Authenticator | None = None
        if config.auth_jwt_secret or config.auth_jwt_public_key:
            from .auth import Authenticator

            self.auth = Authenticator.from_config(config)
        self.started = time.monotonic()
        self._timers: list[PeriodicCallback] = []
        self._gone: asyncio.Event | None = None  # set during shutdown once every client left
        self._pinger: Pinger[WebSocketClient] = Pinger(PING_SLICES)  # the WebSockets, by slice

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.source.start()
        timers = [(self.send_positions, self._position_pass_seconds),
                  (self.heartbeat, self.config.sse_heartbeat),
                  (self.ping, self.config.ws_ping_interval / PING_SLICES),
                  (self.refresh_metrics, METRICS_REFRESH_SECONDS)]
        if self.auth is not None:
            timers.append((self.expire_tokens, EXPIRY_CHECK_SECONDS))
        for callback, seconds in timers:
            timer = PeriodicCallback(callback, seconds * 1000)
            timer.start()
            self._timers.append(timer)

    @property
    def _position_pass_seconds(self) -> float:
        """At least two passes per POSITION_INTERVAL, at least one a second, so that each
        pass's share stays small; each group is looked at once an interval, so a quiet client is
        told at most an interval late."""
        return min(1.0, self.config.position_interval / 2)

    def send_positions(self) -> None:
        """Tell quiet clients where they could resume from, a share of them per pass.

        Position messages are spread over the interval like pings: 10,000 quiet clients in one
        pass hold the loop for ~100 ms. So is looking for the clients due: each pass looks at
        its share of the groups.
        """
        passes = self.config.position_interval / self._position_pass_seconds
        budget = math.ceil(len(self.hub.clients) / passes) + POSITION_SLACK
        self.hub.send_positions(self.config.position_interval, budget, share=1 / passes)

    def expire_tokens(self) -> None:
        """Close every connection whose token has expired, live or still catching up."""
        if self.auth is not None:
            self.auth.expire(self._all_clients())

    def ping(self) -> None:
        """Ping one slice of the WebSockets, live or catching up; close those that left the last
        ping unanswered.

        Every connection is pinged once per WS_PING_INTERVAL, but a slice at a time: pinging
        10,000 sockets at once brings 10,000 pongs back at once, and live events wait behind
        them. The slices are kept as clients come and go (``pinger.py``): a tick walks its own.
        """
        now = time.monotonic()
        timeout = self.config.ws_ping_interval * PONG_DEADLINE
        for client in self._pinger.tick():
            if client.closed:  # ending: nothing to ping, whether or not it has left yet
                self._pinger.discard(client)
                continue
            try:
                client.ping(now, timeout)
            except Exception as exc:  # its own failure: the others are still pinged
                self.hub.failed(client, exc)

    def heartbeat(self) -> None:
        """A comment line on every event stream, so that proxies keep it open."""
        for client in self._all_clients():
            if isinstance(client, EventStreamClient):
                try:
                    client.heartbeat()
                except Exception as exc:
                    self.hub.failed(client, exc)

    async def shutdown(self) -> None:
        """Close every client (1001) and give them half the shutdown time to go, then MongoDB
        the rest of it. What does not finish in time is left behind, not waited for."""
        for timer in self._timers:
            timer.stop()
        loop = asyncio.get_running_loop()
        half = self.config.shutdown_timeout / 2
        deadline = loop.time() + self.config.shutdown_timeout
        self._gone = asyncio.Event()
        clients = self._all_clients()
        for client in clients:
            try:
                client.shutdown()
            except Exception as exc:
                self.hub.failed(client, exc)
        await _within(self.catchup.stop(), half, "closing the catch-up streams")
        self._check_gone()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone.wait(), max(0.0, deadline - half - loop.time()))
        await _within(self.source.stop(), deadline - loop.time(), "closing the change stream")

    def _all_clients(self) -> list[Client]:
        """Every connected client: live, catching up, or still sending a snapshot."""
        return [*self.hub.clients, *self.catchup.clients(), *self.snapshotting]

    def _check_gone(self) -> None:
        if self._gone is not None and not self.hub.clients and not self.catchup.count() \
                and not self.snapshotting:
            self._gone.set()

    # -- admission -----------------------------------------------------------------------------

    def authenticate(self, request: HTTPServerRequest) -> Claims | None:
        return None if self.auth is None else self.auth.authenticate(request)

    def subscription_for(self, values: Mapping[str, str],
                         claims: Claims | None) -> tuple[subs.Subscription, str | None]:
        subscription, resume_after = subs.parse(
            values, (self.config.watch_db, self.config.watch_collection))
        if self.auth is not None and claims is not None:
            subscription = self.auth.restrict(subscription, claims)
        return subscription, resume_after

    def live_query(self, values: Mapping[str, str],
                   subscription: subs.Subscription) -> snapshot.Plan | None:
        """The snapshot read a ``snapshot=1`` subscription asks for; None without it."""
        if "snapshot" not in values:
            return None
        if values["snapshot"] != "1":
            raise admission.Refusal("snapshot_unsupported", "snapshot takes 1 (snapshot=1): the "
                                    "current documents, then every change after them")
        return snapshot.plan(subscription.as_live(), pipeline=bool(self.config.pipeline),
                             redact=self.config.redact, full_document=self.config.full_document)

    async def open_live_query(self, plan: snapshot.Plan, peer: str,
                              claims: Claims | None) -> Opened:
        """The handshake's part of a live query: its read's slot, session and size check."""
        subject = None if claims is None else claims.subject
        charged = (f"peer {peer}",) if subject is None else (f"peer {peer}", f"sub {subject}")
        return await self.live.open(plan, charged)

    def _mark(self) -> str | None:
        return self.hub.mark

    # -- clients -------------------------------------------------------------------------------

    def attach(self, client: Client, resume_after: str | None) -> None:
        """Start a client live, from the log, or from MongoDB's history; tell it first when
        MongoDB is not there."""
        self.keep_alive(client)
        if not self.source.ready:
            client.send_control(self.source.message())
        if resume_after is None:
            self.hub.subscribe(client)
        elif not self.hub.resume(client, resume_after):
            self._from_history(client, resume_after)

    def start_live_query(self, client: Client, opened: Opened, resume_after: str | None) -> None:
        """A connected live query: ``reset`` if it reconnected (it snapshots afresh), then its
        snapshot, ``ready``, and the changes after (``livequery.py``)."""
        if resume_after is not None:
            client.send_control(ev.control("reset"))
        self.snapshotting.add(client)
        self.keep_alive(client)  # a long snapshot to a dead peer is found like any other

        async def serve() -> None:
            try:
                await self.live.serve(opened, client)
            finally:
                self.snapshotting.discard(client)
                self._check_gone()

        task = asyncio.get_running_loop().create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _attach_live(self, client: Client, after: str) -> None:
        """A live query's snapshot is out: it joins after the read, unless it left meanwhile."""
        if client in self.snapshotting:
            self.attach(client, after)

    def keep_alive(self, client: Client) -> None:
        """Ping ``client`` from now on, live or catching up, until it leaves (``detach``)."""
        if isinstance(client, WebSocketClient):
            self._pinger.add(client)

    def _from_history(self, client: Client, after: str) -> None:
        self.catchup.add(client, after)

    def detach(self, client: Client) -> None:
        self.snapshotting.discard(client)
        if isinstance(client, WebSocketClient):
            self._pinger.discard(client)
        self.hub.unsubscribe(client)
        self.catchup.discard(client)
        self._check_gone()

    def lost(self, client: Client) -> None:
        """``client``'s connection closed (once per connection, whoever ended it first): it
        leaves, and the metrics count why it ended."""
        self.detach(client)
        cause = "shutdown" if self._gone is not None else cause_of(client.ended_with())
        self.metrics.disconnected(cause)

    def tell_everyone(self, message: bytes) -> None:
        """A control message to every client, live or catching up."""
        self.hub.broadcast(message)
        for client in self.catchup.clients():
            client.send_control(message)

    def refresh_metrics(self) -> None:
        clients = self._all_clients()
        by_transport = Counter(metrics.transport(client.encoding) for client in clients)
        source = self.source
        self.metrics.refresh(metrics.State(
            by_transport, sum(job.running for job in self.catchup.jobs),
            self.hub.stats()["buffered_events"], source.ready, source.lag(), self.hub.published,
            max(0, source.opened - 1)))

    def status(self) -> dict[str, object]:
        return {**self.source.status(), **self.hub.stats(), "pid": os.getpid(),
                "catching_up": self.catchup.count(), "snapshotting": len(self.snapshotting),
                "snapshot_reads": self.live.reads, "unsent_bytes": self.buffers.total,
                "catchup_streams_opened": self.catchup.streams_opened,
                "uptime": round(time.monotonic() - self.started, 1)}


def make_app(relay: Relay) -> web.Application:
    """The routes; each handler is handed the relay (Tornado passes a route's arguments to its
    ``initialize``)."""
    given = {"relay": relay}
    return web.Application(
        [
            (r"/", handlers.WebpageHandler, given),
            (r"/socket", handlers.ChangesHandler, given),
            (r"/events", handlers.EventsHandler, given),
            (r"/healthz", handlers.HealthHandler),
            (r"/readyz", handlers.ReadyHandler, given),
            (r"/metrics", handlers.MetricsHandler, given),
        ],
        template_path=str(_bundled("templates")),
        static_path=str(_bundled("static")),
        static_handler_class=handlers.StaticHandler,
        static_handler_args=dict(given),  # Tornado adds the path to these
        compress_response=False,
        log_function=logs.log_request,
    )


def raise_open_files_limit() -> None:
    """10,000 connections need more than the usual 1,024 descriptors; take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else OPEN_FILES_WHEN_UNLIMITED
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            logger.info("open-files limit raised from %d to %d", soft, target)
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d: %s", soft, exc)


def bind(config: Config) -> list[socket.socket]:
    return netutil.bind_sockets(config.port, config.host, reuse_port=config.reuse_port > 0,
                                backlog=LISTEN_BACKLOG)


async def serve(config: Config, sockets: list[socket.socket]) -> int:
    """Run one relay process until SIGINT/SIGTERM; return the exit status."""
    # PORT=0 picks a port: the Host check's default names the one actually listened on.
    config = dataclasses.replace(config, port=sockets[0].getsockname()[1])
    relay = Relay(config)
    # Tornado reads no head of its own (the gate hands it each one, complete) and no body.
    server = GatedServer(make_app(relay), xheaders=False,
                         max_header_size=config.max_request_head_bytes, max_body_size=0)
    gate = Gate(Limits(config.max_request_head_bytes, config.request_head_timeout,
                       config.max_pending_requests), server.serve, relay.metrics.refused)
    server.next_head = gate.admit
    listener = Listener(sockets, gate.admit)
    listener.start()
    relay.start()
    logger.info("changerelay %d listening on http://%s:%d/ — %s", os.getpid(), config.host,
                config.port, describe(config))
    if relay.hosts is None and not config.allowed_hosts:
        logger.warning(
            "HOST=%s is not a loopback address and ALLOWED_HOSTS is unset: any Host header is "
            "answered, so a page on any site can reach the relay by DNS rebinding; set "
            "ALLOWED_HOSTS to the names clients use (e.g. ALLOWED_HOSTS=relay.example.com)",
            config.host)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    _exit_by(config.shutdown_timeout + EXIT_MARGIN_SECONDS)
    logger.info("shutting down: closing %d clients", len(relay.hub.clients))
    listener.stop()
    gate.close()
    await relay.shutdown()
    logger.info("bye")
    return 0


async def _within(work: Awaitable[None], seconds: float, what: str) -> None:
    """Wait for ``work`` at most ``seconds`` and not for its cancellation (a driver closing its
    connections to a silent server can outlast any timeout); one log line if it was left behind
    or failed, never a traceback."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieved)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, seconds))
    if not done:
        logger.warning("shutdown: %s took longer than %.1fs; left behind", what, seconds)
    elif not task.cancelled() and task.exception() is not None:
        logger.warning("shutdown: %s failed: %s", what, task.exception())


def _retrieved(task: asyncio.Future[None]) -> None:
    """Mark a left-behind task's exception as seen, so asyncio logs no traceback for it."""
    if not task.cancelled():
        task.exception()


def _exit_by(seconds: float) -> None:
    """End the process with status 0 after ``seconds``, from a thread of its own: the promise to
    SIGTERM holds even if what runs after ``serve`` (cancelling the driver's tasks, joining the
    resolver's threads) or the event loop itself is held up."""
    def end() -> None:
        logger.warning("shutdown took longer than %.1fs; exiting anyway", seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(0)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
