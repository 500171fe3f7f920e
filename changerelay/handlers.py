"""HTTP and WebSocket handlers. They stay thin: parse, admit, hand the client to the relay.

Every refusal happens before the WebSocket upgrade or the first SSE byte, with an HTTP status and a
JSON body ``{"error": code, "message": fix}``, so a bad client costs one response and nothing else.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from tornado import httputil, web, websocket

from . import clients
from .subscription import SubscriptionError

GOING_AWAY = 1001
# Tornado drops a request whose headers exceed its limit without answering; we let it read up to
# MAX_HEADER_BYTES (set on the server) so that an oversized query gets a JSON 414 instead.
MAX_QUERY_BYTES = 512 * 1024
MAX_HEADER_BYTES = 2 * 1024 * 1024


class RelayHandlerMixin:
    """Admission shared by both transports: origin, auth, limits, subscription."""

    def admit(self):
        """Return ``(subscription, resume_after, claims)`` or raise SubscriptionError."""
        relay = self.application.relay
        self.peer = relay.peer_address(self.request)
        if len(self.request.query) > MAX_QUERY_BYTES:
            raise SubscriptionError(
                "query_too_large", f"the query string is over {MAX_QUERY_BYTES // 1024} KiB; "
                "filters are limited to 4 KiB", status=414)
        relay.check_origin(self.request)
        claims = relay.authenticate(self.request)
        arguments = {
            name: [value.decode("utf-8", "strict") for value in values]
            for name, values in self.request.query_arguments.items()
        }
        return (*relay.subscription_for(arguments, claims), claims)

    def refuse(self, exc: SubscriptionError) -> None:
        self.set_status(exc.status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        if exc.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="changerelay"')
        self.finish(exc.body())

    def admitted(self):
        try:
            return self.admit()
        except SubscriptionError as exc:
            self.refuse(exc)
        except UnicodeDecodeError:
            self.refuse(SubscriptionError(
                "invalid_encoding", "the query string is not valid UTF-8 after percent-decoding"))
        return None


class ChangesHandler(RelayHandlerMixin, websocket.WebSocketHandler):
    """``/socket``: one WebSocket per client; every change event is one text frame."""

    async def get(self, *args, **kwargs):
        admitted = self.admitted()  # first, so that curl shows what is wrong with a query
        if admitted is None:
            return
        self.subscription, self.resume_after, self.claims = admitted
        relay = self.application.relay
        try:
            self.slot = relay.connections.acquire(self.peer)
        except SubscriptionError as exc:
            self.refuse(exc)
            return
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            self._release()
            self.refuse(SubscriptionError(
                "websocket_required", "/socket speaks WebSocket: connect with a WebSocket "
                "client (ws:// or wss://), or use /events for Server-Sent Events", status=400))
            return
        self.client = None
        try:
            await super().get(*args, **kwargs)
        finally:
            if self.client is None:
                self._release()

    def _release(self) -> None:
        if self.slot is not None:
            self.application.relay.connections.release(self.slot)
            self.slot = None

    def check_origin(self, origin: str) -> bool:
        return True  # already decided in admit(), with a JSON reason

    def get_compression_options(self):
        return {} if self.application.relay.config.ws_compression else None

    def open(self, *args, **kwargs):
        relay = self.application.relay
        self.set_nodelay(True)
        self.client = clients.WebSocketClient(
            self, self.subscription, relay.config.client_buffer_bytes, self.peer)
        self.client.attach()
        relay.attach(self.client, self.resume_after, self.claims)
        self.subscription = self.claims = self.resume_after = None
        _forget_request_details(self.request)
        self._headers = _NO_HEADERS  # the 101 response went out: its headers are done with

    def on_pong(self, data):
        if self.client is not None:
            self.client.pinged = None

    def on_message(self, message):
        # Clients are not expected to send anything; oversized frames are closed with 1009 by
        # Tornado (websocket_max_message_size), the rest is ignored.
        pass

    def on_close(self):
        relay = self.application.relay
        if getattr(self, "client", None) is not None:
            relay.detach(self.client)
        if getattr(self, "slot", None) is not None:
            self._release()

    def shutdown(self) -> None:
        self.close(GOING_AWAY, "server shutting down")


class EventsHandler(RelayHandlerMixin, web.RequestHandler):
    """``/events``: the same stream as Server-Sent Events."""

    async def get(self):
        admitted = self.admitted()
        if admitted is None:
            return
        subscription, resume_after, claims = admitted
        last_event_id = self.request.headers.get("Last-Event-ID")
        relay = self.application.relay
        if last_event_id and resume_after is None:
            try:
                resume_after = relay.parse_resume(last_event_id)
            except SubscriptionError as exc:
                self.refuse(exc)
                return
        try:
            slot = relay.connections.acquire(self.peer)
        except SubscriptionError as exc:
            self.refuse(exc)
            return
        self._done = asyncio.get_running_loop().create_future()
        try:
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Accel-Buffering", "no")
            self.set_header("Connection", "close")  # one stream per connection, ended by us
            origin = self.request.headers.get("Origin")
            if origin:  # admitted above, so allowed: let EventSource read it cross-origin
                self.set_header("Access-Control-Allow-Origin", origin)
                self.set_header("Vary", "Origin")
            self.write(b"retry: 1000\n\n")
            await self.flush()
            self.client = clients.EventStreamClient(
                self, subscription, relay.config.client_buffer_bytes, self.peer)
            self.client.attach()
            relay.attach(self.client, resume_after, claims)
            await self._done
        finally:
            client = getattr(self, "client", None)
            if client is not None:
                client.closed = True
                relay.detach(client)
            relay.connections.release(slot)
        if not self._finished:
            self.finish()

    def on_connection_close(self):
        self.end_stream()

    def end_stream(self) -> None:
        done = getattr(self, "_done", None)
        if done is not None and not done.done():
            done.set_result(None)

    def shutdown(self) -> None:
        self.end_stream()


class WebpageHandler(web.RequestHandler):
    """``/``: the live page. Scripts come only from /static, so the CSP can forbid the rest."""

    def set_default_headers(self):
        host = self.request.host
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' ws://{host} wss://{host}; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'none'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")

    def get(self):
        self.render("index.html")

    def head(self):
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish()


class HealthHandler(web.RequestHandler):
    """``/healthz``: the process serves. Liveness only; MongoDB's state is /readyz's business."""

    def get(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"status": "ok"}))


class ReadyHandler(web.RequestHandler):
    """``/readyz``: 200 while the change stream is open, 503 naming the reason otherwise."""

    def get(self):
        relay = self.application.relay
        body = relay.status()
        self.set_status(200 if relay.source.ready else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))


_NO_HEADERS = httputil.HTTPHeaders()


def _forget_request_details(request) -> None:
    """An open WebSocket lives for hours; its handshake's headers and arguments need not."""
    request.headers = _NO_HEADERS
    request.arguments = request.query_arguments = request.body_arguments = {}


def same_origin(origin: str, host: str) -> bool:
    return urlsplit(origin).netloc.lower() == host.lower()
