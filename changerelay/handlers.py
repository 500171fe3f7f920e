"""HTTP and WebSocket handlers. They stay thin: admit (``admission``), hand the client to the
relay.

Every refusal happens before the WebSocket upgrade or the first SSE byte, with an HTTP status and a
JSON body ``{"error": code, "message": fix}``, so a bad client costs one response and nothing else.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, NamedTuple

from tornado import web
from tornado.iostream import StreamClosedError

from . import admission, clients, frames, metrics
from .admission import Refusal
from .auth import bearer_header
from .connection import Connection, WebSocketConnection
from .metrics import check_scraper
from .protocol import WebSocketProtocol
from .snapshot import Plan
from .subscription import Subscription, parse_resume
from .tornado_internals import http_chunked, take_socket

if TYPE_CHECKING:
    from .app import Relay
    from .auth import Claims
    from .livequery import Opened

MAX_INBOUND_MESSAGE = 4096  # bytes in one message from a client; larger closes it with 1009
# Milliseconds EventSource waits before it reconnects (its own default is the browser's choice).
SSE_RETRY_MS = 1000


class Admitted(NamedTuple):
    subscription: Subscription
    resume_after: str | None
    claims: Claims | None  # None without auth
    slot: admission.Slot
    live: Plan | None  # snapshot=1: the live query's read


class RelayHandler(web.RequestHandler):
    """A handler of the relay, which its route hands in (``app.make_app``)."""

    def initialize(self, relay: Relay) -> None:
        self.relay = relay

    def is_handshake(self) -> bool:
        """Whether this request is a handshake, whose refusals the metrics count (a probe's or a
        page's are not)."""
        return False

    def refuse(self, exc: Refusal) -> None:
        if self.is_handshake():
            self.relay.metrics.refused(exc.status)
        self.set_status(exc.status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        if exc.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="changerelay"')
        self.finish(exc.body())


class HostChecked(RelayHandler):
    """Every route a browser can be sent to — the page, static files, both transports — answers
    only to the names the relay is reached by (``admission.check_host``), before anything else.
    The probes do not: they are sent to the pod's IP."""

    peer: str                             # the client's address, behind trusted proxies
    served: admission.Origin | None       # the origin of this relay's pages, as asked for

    def prepare(self) -> None:
        relay = self.relay
        self.peer, scheme = admission.forwarded(self.request, relay.config.trusted_proxies)
        self.served = admission.served_origin(self.request.headers.get("Host"), scheme)
        try:
            admission.check_host(self.served, relay.hosts)
        except Refusal as exc:
            self.refuse(exc)  # finished: Tornado calls no get()

    def allow_origin(self) -> None:
        """Refuse (403) a page whose origin may not connect; let an allowed one read the
        answer across origins."""
        origin = self.request.headers.get("Origin")
        admission.check_origin(origin, self.served, self.relay.config.allowed_origins)
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")


class Transport(HostChecked):
    """Admission for both transports, once per handshake, in ``admission``'s order."""

    # /events: EventSource sends the id of the last event it saw when it reconnects.
    resumes_from_last_event_id = False

    def is_handshake(self) -> bool:
        return "Upgrade" in self.request.headers or self.resumes_from_last_event_id

    def admitted(self) -> Admitted | None:
        """The client's subscription, start, claims and connection slot; None once refused."""
        relay = self.relay
        request = self.request
        try:
            admission.check_query_size(request.query)
            self.allow_origin()  # then fetch() and EventSource may read the answer, refusals too
            claims = relay.authenticate(request)
            values = admission.query_values(request.query_arguments)
            subscription, resume_after = relay.subscription_for(values, claims)
            live = relay.live_query(values, subscription)
            if live is not None:
                subscription = live.subscription
            last_event_id = request.headers.get("Last-Event-ID")
            if self.resumes_from_last_event_id and last_event_id and resume_after is None:
                resume_after = parse_resume(last_event_id)
            slot = relay.connections.acquire(self.peer)
        except Refusal as exc:
            self.refuse(exc)
            return None
        return Admitted(subscription, resume_after, claims, slot, live)

    async def snapshot_read(self, admitted: Admitted) -> tuple[bool, Opened | None]:
        """``(go on, the live query's opened read or None)``: a live query's read is placed and
        its size checked at the handshake, so that a snapshot over SNAPSHOT_LIMIT is a 400.
        Refused, it has answered and freed the connection slot: do not go on."""
        if admitted.live is None:
            return True, None
        try:
            opened = await self.relay.open_live_query(admitted.live, self.peer, admitted.claims)
        except Refusal as exc:
            admitted.slot.release()
            self.refuse(exc)
            return False, None
        return True, opened

    async def give_back(self, slot: admission.Slot, opened: Opened | None) -> None:
        """Admitted but not handed over (the peer went away, or only asked): its connection
        slot, and its live query's snapshot read and pool slot."""
        slot.release()
        if opened is not None:
            await opened.close()

    def hand_over(self, client: clients.Client, connection: Connection, slot: admission.Slot,
                  resume_after: str | None, unwritten: bytes, unread: bytes,
                  opened: Opened | None = None) -> None:
        """The connection, out of Tornado, is the client's: it joins the relay (a live query:
        after its snapshot), and leaves it (and frees its slot) when the connection closes."""
        relay = self.relay

        def lost() -> None:
            relay.lost(client)
            slot.release()

        connection.on_close = lost
        connection.start(unwritten, unread)
        if opened is None:
            relay.attach(client, resume_after)
        else:
            relay.start_live_query(client, opened, resume_after)


class ChangesHandler(Transport):
    """``/socket``: one WebSocket per client; every change event is one text frame.

    The handshake is answered here; then the socket leaves Tornado for a ``WebSocketConnection``
    (``connection.py``), which is all an open WebSocket costs us.

    The same URL fetched without ``Upgrade`` is a probe: browsers hide why a WebSocket was
    refused (the page sees 1006), so the JS client asks this way. It runs the handshake's
    admission, connection caps included, and answers its refusal, or 204 when the handshake
    would be admitted — without taking a connection.
    """

    async def get(self) -> None:
        admitted = self.admitted()  # first, so that curl shows what is wrong with a query
        if admitted is None:
            return
        subscription, resume_after, claims, slot, _ = admitted
        relay = self.relay
        if "Upgrade" not in self.request.headers:
            go, opened = await self.snapshot_read(admitted)
            if not go:
                return
            await self.give_back(slot, opened)
            self.set_status(204)
            self.set_header("Cache-Control", "no-store")
            self.finish()
            return
        try:
            accept, extensions = self.handshake(relay.config.ws_compression)
        except Refusal as exc:
            slot.release()
            self.refuse(exc)
            return
        go, opened = await self.snapshot_read(admitted)
        if not go:
            return
        try:
            self.set_status(101)
            self.set_header("Upgrade", "websocket")
            self.set_header("Connection", "Upgrade")
            self.set_header("Sec-WebSocket-Accept", accept)
            if extensions:
                self.set_header("Sec-WebSocket-Extensions", extensions)
            self.finish()
            sock, unread, unwritten = take_socket(self.detach())
        except StreamClosedError:
            await self.give_back(slot, opened)
            return
        deflate = extensions is not None
        connection = WebSocketConnection(sock, relay.buffers,
                                         WebSocketProtocol(MAX_INBOUND_MESSAGE, deflate))
        client = clients.WebSocketClient(
            connection, subscription, relay.config.client_buffer_bytes, self.peer, claims=claims,
            on_end=relay.detach, deflate=deflate)
        self.hand_over(client, connection, slot, resume_after, unwritten, unread, opened)

    def handshake(self, compression: bool) -> tuple[str, str | None]:
        """``(Sec-WebSocket-Accept, Sec-WebSocket-Extensions or None)``; a Refusal if the
        request is not a WebSocket handshake we can answer (RFC 6455 §4.2.1)."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            raise Refusal(
                "websocket_required", "/socket speaks WebSocket: connect with a WebSocket "
                "client (ws:// or wss://), or use /events for Server-Sent Events")
        connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
        if "upgrade" not in connection or self.request.version != "HTTP/1.1":
            raise Refusal(
                "bad_handshake", "a WebSocket handshake is an HTTP/1.1 GET with "
                "'Connection: Upgrade' and 'Upgrade: websocket'")
        if headers.get("Sec-WebSocket-Version") != "13":
            self.set_header("Sec-WebSocket-Version", "13")
            raise Refusal(
                "unsupported_websocket_version", "this relay speaks WebSocket version 13 "
                "(RFC 6455); send 'Sec-WebSocket-Version: 13'")
        accept = frames.accept_key(headers.get("Sec-WebSocket-Key", ""))
        if accept is None:
            raise Refusal(
                "bad_handshake", "Sec-WebSocket-Key must be the base64 of 16 random bytes")
        offers = ", ".join(headers.get_list("Sec-WebSocket-Extensions"))
        return accept, frames.negotiate_deflate(offers) if compression else None


class EventsHandler(Transport):
    """``/events``: the same stream as Server-Sent Events.

    Once its headers are out, the response leaves Tornado as a WebSocket does after its
    handshake: a ``connection.Connection`` writes the shared payloads with nothing copied, and
    counts what a stalled client holds.
    """

    resumes_from_last_event_id = True

    async def get(self) -> None:
        admitted = self.admitted()
        if admitted is None:
            return
        subscription, resume_after, claims, slot, _ = admitted
        go, opened = await self.snapshot_read(admitted)
        if not go:
            return
        relay = self.relay
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")
        self.set_header("Connection", "close")  # one stream per connection, ended by us
        self.write(b"retry: %d\n\n" % SSE_RETRY_MS)
        try:
            await self.flush()
            chunked = http_chunked(self)
            sock, unread, unwritten = take_socket(self.detach())
        except StreamClosedError:
            await self.give_back(slot, opened)
            return
        self.application.log_request(self)  # Tornado logs a request when it finishes it
        connection = Connection(sock, relay.buffers)
        client = clients.EventStreamClient(
            connection, chunked, subscription, relay.config.client_buffer_bytes, self.peer,
            claims=claims, on_end=relay.detach)
        self.hand_over(client, connection, slot, resume_after, unwritten, unread, opened)


class WebpageHandler(HostChecked):
    """``/``: the live page. Scripts come only from /static, so the CSP can forbid the rest."""

    def set_default_headers(self) -> None:
        host = self.request.host
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' ws://{host} wss://{host}; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'none'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")

    def get(self) -> None:
        config = self.relay.config
        self.render("index.html", watch_db=config.watch_db,
                    watch_collection=config.watch_collection, demo=config.demo)

    def head(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish()


class StaticHandler(HostChecked, web.StaticFileHandler):
    """``/static/…``: the page's scripts, under the same Host check as the page. A page on an
    allowed origin may import ``changerelay.js`` from here: ES modules load with CORS."""

    def initialize(self, relay: Relay, path: str,  # type: ignore[override]
                   default_filename: str | None = None) -> None:
        self.relay = relay
        web.StaticFileHandler.initialize(self, path, default_filename)

    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            with contextlib.suppress(Refusal):  # no header: the browser refuses it
                self.allow_origin()


class HealthHandler(web.RequestHandler):
    """``/healthz``: the process serves. Liveness only; MongoDB's state is /readyz's business."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"status": "ok"}))


class MetricsHandler(RelayHandler):
    """``/metrics``: Prometheus text, behind ``METRICS_TOKEN`` when it is set. Like the probes,
    no Host check: Prometheus scrapes the pod's address."""

    def get(self) -> None:
        relay = self.relay
        try:
            check_scraper(bearer_header(self.request), relay.config.metrics_token)
        except Refusal as exc:
            self.refuse(exc)
            return
        relay.refresh_metrics()
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.finish(relay.metrics.exposition())


class ReadyHandler(RelayHandler):
    """``/readyz``: 200 while the change stream is open, 503 naming the reason otherwise."""

    def get(self) -> None:
        relay = self.relay
        body = relay.status()
        self.set_status(200 if relay.source.ready else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))

