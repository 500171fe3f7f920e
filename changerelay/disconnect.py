"""Every way the relay ends or refuses a connection, and what a client should do next.

Why one table: a client decides from the close code (or, for a refused handshake, the HTTP
status) whether reconnecting can help, so each code's meaning is a contract with every client
ever shipped — a page that keeps retrying a refused filter loads the relay for nothing, and one
that gives up on a restart loses its user. Modelled on centrifuge's disconnect table
(``disconnect.go``: a code, a reason and whether to reconnect, per cause).

The code takes its closes and refusals from here: a client is closed for a cause
(``CLOSES["slow_consumer"]``), and an ``admission.Refusal`` is answered with the status its
``error`` is listed under. ``tests/test_disconnect.py`` fails when the places that carry the table
differ: this module and the code (every refusal raised is listed, every close is a cause here),
``DISCONNECTS`` in ``static/changerelay.js`` (the page's ``app.js`` imports it from there), and
the "Close codes and refusals" tables in ``README.md``.

To add a cause: add it to ``CLOSES`` (a WebSocket close) or to a status's ``errors`` in
``REFUSALS`` (a handshake refusal), then the same entry to ``DISCONNECTS`` in
``static/changerelay.js`` and a row to the README's table. A cause that shares a close code with
another needs a reason of its own — a frame flood closed with 1008 is not "token expired", and
clients tell the two apart by the reason alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Retry(enum.StrEnum):
    """What a client does after a close or a refusal."""

    NO = "no"                     # permanent: the same request fails again; show the message
    BACKOFF = "backoff"           # temporary: the same request later, with exponential backoff
    RESUME = "resume"             # reconnect (with backoff) and resume after the last id
    FRESH_TOKEN = "fresh_token"   # only with a new token; a client that cannot mint one stops


@dataclass(frozen=True)
class Close:
    """A WebSocket close after the handshake."""

    code: int
    reason: str | None  # the close frame's reason, exactly; None: it names the fault each time
    retry: Retry
    meaning: str

    @property
    def frame(self) -> tuple[int, str]:
        """``(code, reason)`` of the close frame that ends a connection for this cause."""
        return self.code, self.reason or ""


@dataclass(frozen=True)
class Refused:
    """A handshake refused with an HTTP status and a JSON body ``{"error": …, "message": …}``.

    Browsers do not show a refused WebSocket's status: a client learns it by fetching the same
    URL without ``Upgrade``, which runs the same admission and answers the same refusal (or 204).
    """

    retry: Retry
    errors: tuple[str, ...]  # the body's ``error`` codes; empty: not answered in JSON (yet)
    meaning: str


CLOSES: dict[str, Close] = {
    "ping_timeout": Close(
        1000, "ping timed out", Retry.RESUME,
        "a ping went unanswered for WS_PING_INTERVAL: the client or its network stalled"),
    "shutdown": Close(
        1001, "server shutting down", Retry.RESUME,
        "the relay is stopping (deploy, SIGTERM); another relay or its successor resumes"),
    "protocol_error": Close(
        1002, None, Retry.RESUME,
        "the client broke RFC 6455 (e.g. an unmasked frame); the reason names the fault"),
    "connection_lost": Close(
        1006, None, Retry.RESUME,
        "never sent: what a client sees when the connection ends without a close frame — cut, "
        "or refused at the handshake (then fetch the URL without Upgrade to learn why)"),
    "invalid_data": Close(
        1007, None, Retry.RESUME,
        "a text message or close reason that is not UTF-8, or a message that does not inflate"),
    "token_expired": Close(
        1008, "token expired", Retry.FRESH_TOKEN,
        "the token's exp passed during the connection; after an error frame token_expired"),
    "too_many_frames": Close(
        1008, "too many frames", Retry.RESUME,
        "the client sent far more frames than any client needs (pings, pongs, fragments, tiny "
        "messages): past its frame budget"),
    "message_too_big": Close(
        1009, None, Retry.RESUME,
        "a client message over 4 KiB (clients have nothing to say to the relay)"),
    "server_error": Close(
        1011, None, Retry.RESUME,
        "an unexpected condition in the relay (RFC 6455 §7.4.1); the reason names it"),
    "internal_error": Close(
        1011, "internal error", Retry.RESUME,
        "serving this client raised (a relay bug, logged); the others go on; after an error "
        "frame internal_error"),
    "slow_consumer": Close(
        1013, "slow consumer", Retry.RESUME,
        "the client fell CLIENT_BUFFER_BYTES behind, or held the most when all clients together "
        "reached MAX_BUFFERED_BYTES; after an error frame slow_consumer"),
}

REFUSALS: dict[int, Refused] = {
    400: Refused(Retry.NO, (
        "unknown_parameter", "repeated_parameter", "invalid_ns", "ns_outside_scope",
        "invalid_ops", "unknown_operation_type", "invalid_json", "invalid_filter",
        "unknown_operator", "unknown_field", "invalid_regex", "regex_too_long", "regex_too_complex",
        "filter_too_large", "filter_too_deep", "filter_too_complex", "invalid_resume_after",
        "invalid_encoding", "websocket_required", "bad_handshake", "malformed_request",
        "snapshot_unsupported", "snapshot_too_large",
    ), "the request is wrong; the message says what to change"),
    401: Refused(Retry.FRESH_TOKEN, ("missing_token", "invalid_token", "token_expired"),
                 "no valid token: retry only with a new one"),
    403: Refused(Retry.NO, ("origin_not_allowed", "ns_forbidden", "row_rules_need_post_images",
                            "row_rule_reads_redacted_field", "metrics_token_mismatch"),
                 "not allowed: this page's origin, namespaces outside the token's ns claim, a "
                 "row rule this relay cannot decide (no post-images, or a redacted field), or "
                 "a scrape of /metrics with a token other than METRICS_TOKEN"),
    404: Refused(Retry.NO, (), "no such endpoint (Tornado's own page, not JSON): check the path"),
    408: Refused(Retry.BACKOFF, ("request_timeout",),
                 "the request head took longer than REQUEST_HEAD_TIMEOUT: send it at once"),
    413: Refused(Retry.NO, ("body_not_allowed",),
                 "the request announces a body (Content-Length above 0, Transfer-Encoding): no "
                 "route reads one"),
    414: Refused(Retry.NO, ("query_too_large", "uri_too_long"),
                 "the query string is over 32 KiB, or the request line over "
                 "MAX_REQUEST_HEAD_BYTES"),
    421: Refused(Retry.NO, ("host_not_allowed",), "a Host the relay does not answer to"),
    426: Refused(Retry.NO, ("unsupported_websocket_version",),
                 "a WebSocket version other than 13"),
    429: Refused(Retry.BACKOFF, ("too_many_connections_from_address",),
                 "MAX_CONNECTIONS_PER_IP reached: retry once a connection of this address ends"),
    431: Refused(Retry.NO, ("headers_too_large", "too_many_headers"),
                 "the request line and headers are over MAX_REQUEST_HEAD_BYTES, or over 100 "
                 "header lines"),
    503: Refused(Retry.BACKOFF, ("too_many_connections", "too_many_pending_requests",
                                 "snapshot_unavailable"),
                 "MAX_CONNECTIONS reached, MAX_PENDING_REQUESTS and this request was the "
                 "slowest, or a live query before the relay's change stream is open: retry "
                 "later, or on another relay"),
}

# The status each refusal is answered with: ``admission.Refusal`` takes it from here.
STATUS_OF: dict[str, int] = {error: status for status, refusal in REFUSALS.items()
                             for error in refusal.errors}

# Why a client left when the relay sent it no close: it closed, or its connection was cut.
CLIENT_CLOSED = "client_closed"


def cause_of(close: tuple[int, str] | None) -> str:
    """The cause in ``CLOSES`` of the close frame ``(code, reason)`` the relay ended a
    connection with (an SSE stream: the close its cause lists); ``CLIENT_CLOSED`` for None."""
    if close is None:
        return CLIENT_CLOSED
    code, reason = close
    named = [cause for cause, entry in CLOSES.items() if entry.frame == (code, reason)]
    by_code = [cause for cause, entry in CLOSES.items()
               if entry.code == code and entry.reason is None]
    return (named or by_code or ["server_error"])[0]
