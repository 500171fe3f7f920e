"""The gate: every request head is read here, within its limits, before Tornado sees it.

Why not Tornado's own reading: it answers a head over its limit by closing the connection without
a word, rescans the whole head for its end at every read (a head dribbled a byte at a time costs
its length squared), reads a request body of up to 100 MB before any handler runs, and bounds
neither the connections that have not finished their request nor how long they take. Here each
head — of a new connection, and of each request on a connection kept alive — is read by one rule:
at most MAX_REQUEST_HEAD_BYTES and ``MAX_HEADER_LINES`` headers, complete within
REQUEST_HEAD_TIMEOUT however it is paced, and announcing no body, since no route of the relay
reads one. A head that breaks the rule is refused like any request (``admission.Refusal``: a
status and a JSON body); only a complete, admissible head reaches Tornado, which then parses a
small head and has nothing left to read.

At most MAX_PENDING_REQUESTS connections may be unfinished at once; past it the oldest goes. A
slow-loris client keeps its connections unfinished as long as it can, so the oldest is most likely
one of its; a probe or a browser sends its head at once and is through in a round trip, so
``/healthz`` and ``/readyz`` are answered even while the cap is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from logzero import logger
from tornado import httputil

from .admission import MAX_QUERY_BYTES, Refusal

# A head ends where Tornado's END_OF_HEAD pattern ends its first match (http1connection.py,
# HTTP1Connection._read_message_inner: ``\r?\n\r?\n``), so that Tornado reads exactly the head
# checked here: after the first "\n\n" or "\n\r\n", whichever ends first.
BLANK_LINES = (b"\n\n", b"\n\r\n")
# Header lines a request may have (Apache's LimitRequestFields): browsers send about 20 and each
# proxy adds a few; Tornado's parsing costs per line, so a cap on the bytes alone allows 16,000.
MAX_HEADER_LINES = 100
RECEIVE_BYTES = 16 * 1024  # bytes asked of the socket per recv
# After a refusal the client may still be sending (the rest of its head, a body). Reading and
# dropping that for a moment lets the refusal reach it: closing a socket with unread bytes resets
# the connection, and the reset can overtake the answer (RFC 9112 §9.6). Apache lingers 2 s too.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
_DIGITS = re.compile(r"[0-9]+")  # Content-Length, as Tornado reads it (http1connection.py)

Address = Any  # the peer's address as socket.accept() gives it: (host, port[, ...])
Serve = Callable[[socket.socket, Address, bytes], None]


@dataclass(frozen=True)
class Limits:
    head_bytes: int      # MAX_REQUEST_HEAD_BYTES: request line and headers, blank line included
    seconds: float       # REQUEST_HEAD_TIMEOUT: from the connection's start, or its last answer
    unfinished: int      # MAX_PENDING_REQUESTS: connections still sending their head


def check_head(head: bytes) -> None:
    """Refuse a complete head with too many header lines, one Tornado cannot read, or one that
    announces a body (``Content-Length`` above 0, any ``Transfer-Encoding``)."""
    lines = head.count(b"\n") - 2  # less the request line's end and the blank line's
    if lines > MAX_HEADER_LINES:
        raise Refusal("too_many_headers", f"the request has {lines} header lines; at most "
                      f"{MAX_HEADER_LINES} are read")
    # As Tornado splits a head (HTTP1Connection._parse_headers) and reads it, with its own
    # parsers and checks (the Host header's and the query's are in HTTPServerRequest).
    text = head.decode("latin-1").lstrip("\r\n")
    end_of_line = text.find("\n")
    try:
        start_line = httputil.parse_request_start_line(text[:end_of_line].rstrip("\r"))
        headers = httputil.HTTPHeaders.parse(text[end_of_line:])
        httputil.HTTPServerRequest(start_line=start_line, headers=headers)
    except httputil.HTTPInputError as exc:
        raise Refusal("malformed_request", f"the request head is not HTTP/1.x that this relay "
                      f"reads: {exc}") from None
    lengths = [value.strip() for field in headers.get_list("Content-Length")
               for value in field.split(",")]
    if not all(_DIGITS.fullmatch(length) for length in lengths):
        raise Refusal("malformed_request", "Content-Length is not a number of bytes")
    if "Transfer-Encoding" in headers or any(int(length) for length in lengths):
        raise Refusal("body_not_allowed", "no route of this relay reads a request body; send the "
                      "request without one (no Content-Length above 0, no Transfer-Encoding)")


def end_of_head(data: bytearray, start: int = 0) -> int:
    """The length of the head at the start of ``data``, if it has ended at or after ``start``,
    else -1. A search for one byte (memchr, ~30 times faster than for two), then two substring
    searches from the first line's end, if there is one: a fraction of what the pattern costs
    per byte, which a head dribbled or pushed in pieces pays on every piece."""
    start = data.find(b"\n", start)
    if start < 0:
        return -1
    ends = [found + len(blank) for blank in BLANK_LINES
            if (found := data.find(blank, start)) >= 0]
    return min(ends, default=-1)


def too_large(data: bytearray, limit: int) -> Refusal:
    """The refusal of ``data``, over ``limit`` bytes without a head's end: the request line's
    (414) if it has not ended yet, else the headers' (431)."""
    if data.find(b"\n", 0, limit) < 0:
        return Refusal("uri_too_long", f"the request line is over {limit // 1024} KiB "
                       f"(MAX_REQUEST_HEAD_BYTES); a subscription's query string is at most "
                       f"{MAX_QUERY_BYTES // 1024} KiB")
    return Refusal("headers_too_large", f"the request line and headers are over {limit // 1024} "
                   "KiB (MAX_REQUEST_HEAD_BYTES); send fewer or smaller headers")


def response(refusal: Refusal) -> bytes:
    """A refusal as a complete HTTP/1.1 response that closes the connection."""
    body = refusal.body().encode()
    return (f"HTTP/1.1 {refusal.status} {http.HTTPStatus(refusal.status).phrase}\r\n"
            "Content-Type: application/json\r\nCache-Control: no-store\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class Gate:
    """The connections still sending their head, oldest first; ``serve`` gets each one whose
    head is complete and admissible, with every byte read so far. ``refused`` is told the
    status of every refusal answered (the metrics count them)."""

    def __init__(self, limits: Limits, serve: Serve,
                 refused: Callable[[int], None] = lambda status: None):
        self.limits = limits
        self.serve = serve
        self.refused = refused
        self.unfinished: dict[_Unfinished, None] = {}  # insertion order: oldest first
        self.loop = asyncio.get_running_loop()

    def admit(self, sock: socket.socket, address: Address, data: bytes = b"") -> None:
        """Read the next request head of ``sock``; ``data``: what has come of it already (a
        kept-alive connection's next request may be in the bytes read with the last)."""
        while len(self.unfinished) >= self.limits.unfinished:
            next(iter(self.unfinished)).evict(Refusal(
                "too_many_pending_requests", f"the relay holds its maximum of "
                f"{self.limits.unfinished} connections still sending their request "
                "(MAX_PENDING_REQUESTS), and this one had taken the longest; retry"))
        connection = _Unfinished(self, sock, address, bytearray(data))
        self.unfinished[connection] = None
        connection.start()

    def close(self) -> None:
        """Drop every unfinished connection: on shutdown no request of theirs would be served."""
        for connection in list(self.unfinished):
            connection.drop()


class _Unfinished:
    """One connection while its head arrives, or while a refusal it got lingers."""

    __slots__ = ("address", "data", "dropped", "fd", "gate", "lingering", "scanned", "sock",
                 "timer")

    def __init__(self, gate: Gate, sock: socket.socket, address: Address, data: bytearray):
        self.gate = gate
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.data = data
        self.scanned = 0  # bytes of data searched for the head's end
        self.timer: asyncio.TimerHandle | None = None
        self.lingering = False  # refused, reading what still comes only to drop it
        self.dropped = 0

    def start(self) -> None:
        loop = self.gate.loop
        self.timer = loop.call_later(self.gate.limits.seconds, self._expired)
        loop.add_reader(self.fd, self._readable)
        if self.data:
            self._scan()

    def _readable(self) -> None:
        limit = self.gate.limits.head_bytes
        try:
            while True:
                asked = min(RECEIVE_BYTES, limit + 1 - len(self.data))
                chunk = self.sock.recv(asked)
                if not chunk:  # the client gave up on its request
                    self.drop()
                    return
                self.data += chunk
                # Less than asked: the socket is drained (another recv would only raise).
                if self._scan() or len(chunk) < asked:
                    return
        except BlockingIOError:
            return
        except OSError:
            self.drop()

    def _scan(self) -> bool:
        """Find the head's end in what arrived; True once the connection is served or refused."""
        limit = self.gate.limits.head_bytes
        end = end_of_head(self.data, max(0, self.scanned - 2))  # a blank line across pieces
        self.scanned = len(self.data)
        if end < 0 and self.scanned <= limit:
            return False
        if end < 0 or end > limit:
            self.refuse(too_large(self.data, limit))
            return True
        try:
            check_head(bytes(self.data[:end]))
        except Refusal as exc:
            self.refuse(exc)
            return True
        self._leave()
        self.gate.serve(self.sock, self.address, bytes(self.data))
        return True

    def _expired(self) -> None:
        if not self.data.strip():  # nothing asked (an idle or kept-alive connection): no answer
            self.drop()
            return
        self.refuse(Refusal(
            "request_timeout", f"the request head did not arrive within "
            f"{self.gate.limits.seconds:g} s (REQUEST_HEAD_TIMEOUT); send it whole, at once"))

    def refuse(self, refusal: Refusal, linger: bool = True) -> None:
        """Answer ``refusal`` and close, after lingering unless told not to."""
        logger.debug("refused %s before its request: %d %s", self.address, refusal.status,
                     refusal.code)
        self.gate.refused(refusal.status)
        with contextlib.suppress(OSError):
            self.sock.send(response(refusal))  # a few hundred bytes: the socket takes them all
            if linger:
                self.sock.shutdown(socket.SHUT_WR)
                self._linger()
                return
        self.drop()

    def evict(self, refusal: Refusal) -> None:
        """Make room: answer ``refusal`` if something was asked and not answered yet, and close
        at once."""
        if self.lingering or not self.data.strip():
            self.drop()
        else:
            self.refuse(refusal, linger=False)

    def _linger(self) -> None:
        loop = self.gate.loop
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_later(LINGER_SECONDS, self.drop)
        self.lingering = True
        loop.add_reader(self.fd, self._discard)  # in place of _readable

    def _discard(self) -> None:
        try:
            while chunk := self.sock.recv(RECEIVE_BYTES):
                self.dropped += len(chunk)
                if self.dropped > LINGER_BYTES:
                    break
        except BlockingIOError:
            return
        except OSError:
            pass
        self.drop()

    def _leave(self) -> None:
        self.gate.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
        self.gate.unfinished.pop(self, None)

    def drop(self) -> None:
        self._leave()
        self.sock.close()
