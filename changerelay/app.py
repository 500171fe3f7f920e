"""Wiring: one relay per process — config, change source, hub, catch-up, handlers, server.

The ``Relay`` is the object handlers talk to; it owns the policy decisions that involve more than
one room (admission, where a resuming client starts), so the handlers stay thin and the hub stays
free of I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import resource
import signal
import socket
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logzero import logger
from pymongo import AsyncMongoClient
from tornado import httpserver, netutil, web
from tornado.ioloop import PeriodicCallback

from . import admission, handlers, logs, metrics
from . import subscription as subs
from .catchup import CatchUp
from .clients import Client, EventStreamClient, WebSocketClient
from .config import Config, describe
from .disconnect import cause_of
from .hub import Hub
from .source import ChangeSource

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
# Tokens' exp is checked this often: a connection outlives its token (and LEEWAY_SECONDS) by at
# most this long, and a pass over 10,000 clients costs a few milliseconds.
EXPIRY_CHECK_SECONDS = 1.0
# Connections the kernel queues before they are accepted: room for a crowd of clients that
# reconnect at once after a restart (Tornado's default is 128).
LISTEN_BACKLOG = 1024
# Seconds an HTTP connection between requests stays open (Tornado closes it after).
IDLE_HTTP_SECONDS = 60
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
                                                config.catchup_streams, self.source.missing_image)
        self.connections = admission.Connections(config.max_connections,
                                                 config.max_connections_per_ip)
        self.hosts = admission.allowed_hosts(config.allowed_hosts, config.host, config.port)
        self.auth: Authenticator | None = None
        if config.auth_jwt_secret or config.auth_jwt_public_key:
            from .auth import Authenticator

            self.auth = Authenticator.from_config(config)
        self.started = time.monotonic()
        self._timers: list[PeriodicCallback] = []
        self._gone: asyncio.Event | None = None  # set during shutdown once every client left
        self._ping_slice = 0

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
        """At least two passes per POSITION_INTERVAL, so that a quiet client is told at most
        half an interval late; at least one a second, so that each pass's share stays small."""
        return min(1.0, self.config.position_interval / 2)

    def send_positions(self) -> None:
        """Tell quiet clients where they could resume from, a share of them per pass.

        Position messages are spread over the interval like pings: 10,000 quiet clients in one
        pass hold the loop for ~100 ms.
        """
        passes = self.config.position_interval / self._position_pass_seconds
        budget = math.ceil(len(self.hub.clients) / passes) + POSITION_SLACK
        self.hub.send_positions(self.config.position_interval, budget)

    def expire_tokens(self) -> None:
        """Close every connection whose token has expired, live or still catching up."""
        if self.auth is not None:
            self.auth.expire([*self.hub.clients, *self.catchup.clients()])

    def ping(self) -> None:
        """Ping one slice of the WebSockets; close those that left the last ping unanswered.

        Every connection is pinged once per WS_PING_INTERVAL, but a slice at a time: pinging
        10,000 sockets at once brings 10,000 pongs back at once, and live events wait behind
        them.
        """
        self._ping_slice = (self._ping_slice + 1) % PING_SLICES
        now = time.monotonic()
        timeout = self.config.ws_ping_interval * PONG_DEADLINE
        for client in tuple(self.hub.clients):
            if isinstance(client, WebSocketClient) and (
                    hash(client) % PING_SLICES == self._ping_slice):
                client.ping(now, timeout)

    def heartbeat(self) -> None:
        """A comment line on every event stream, so that proxies keep it open."""
        for client in tuple(self.hub.clients):
            if isinstance(client, EventStreamClient):
                client.heartbeat()

    async def shutdown(self) -> None:
        """Close every client (1001), give them half the shutdown time to go, then MongoDB."""
        for timer in self._timers:
            timer.stop()
        self._gone = asyncio.Event()
        clients = tuple(self.hub.clients) + tuple(self.catchup.clients())
        for client in clients:
            client.shutdown()
        await self.catchup.stop()
        self._check_gone()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone.wait(), self.config.shutdown_timeout / 2)
        await self.source.stop()

    def _check_gone(self) -> None:
        if self._gone is not None and not self.hub.clients and not self.catchup.count():
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

    # -- clients -------------------------------------------------------------------------------

    def attach(self, client: Client, resume_after: str | None) -> None:
        """Start a client live, from the log, or from MongoDB's history; tell it first when
        MongoDB is not there."""
        if not self.source.ready:
            client.send_control(self.source.message())
        if resume_after is None:
            self.hub.subscribe(client)
        elif not self.hub.resume(client, resume_after):
            self._from_history(client, resume_after)

    def _from_history(self, client: Client, after: str) -> None:
        self.catchup.add(client, after)

    def detach(self, client: Client) -> None:
        """``client`` ended (called again for one already gone: counted once)."""
        attached = client in self.hub.clients or client in self.catchup.clients()
        self.hub.unsubscribe(client)
        self.catchup.discard(client)
        if attached:
            cause = "shutdown" if self._gone is not None else cause_of(client.ended_with())
            self.metrics.disconnected(cause)
        self._check_gone()

    def tell_everyone(self, message: bytes) -> None:
        """A control message to every client, live or catching up."""
        self.hub.broadcast(message)
        for client in self.catchup.clients():
            client.send_control(message)

    def refresh_metrics(self) -> None:
        clients = [*self.hub.clients, *self.catchup.clients()]
        by_transport = Counter(metrics.transport(client.encoding) for client in clients)
        source = self.source
        self.metrics.refresh(metrics.State(
            by_transport, sum(job.running for job in self.catchup.jobs),
            self.hub.stats()["buffered_events"], source.ready, source.lag(), self.hub.published,
            max(0, source.opened - 1)))

    def status(self) -> dict[str, object]:
        return {**self.source.status(), **self.hub.stats(), "pid": os.getpid(),
                "catching_up": self.catchup.count(),
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
    server = httpserver.HTTPServer(make_app(relay), xheaders=False,
                                   idle_connection_timeout=IDLE_HTTP_SECONDS,
                                   max_header_size=handlers.MAX_HEADER_BYTES)
    server.add_sockets(sockets)
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
    logger.info("shutting down: closing %d clients", len(relay.hub.clients))
    server.stop()
    try:
        await asyncio.wait_for(relay.shutdown(), config.shutdown_timeout)
    except TimeoutError:
        logger.warning("shutdown took longer than %.1fs; exiting anyway", config.shutdown_timeout)
    logger.info("bye")
    return 0
