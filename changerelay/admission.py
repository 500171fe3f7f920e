"""Admission: every check a request passes before it costs the relay a connection, as plain
functions of the request and the settings, and the one refusal type they raise.

Both transports (and the page, for ``Host``) call the same rules, in the same order, once per
handshake: ``Host`` (421), the query's size (414), ``Origin`` (403), the token (``auth``), the
query's parameters (400), the subscription (``subscription``), then the connection caps (429,
503). A refused request gets an HTTP status and ``{"error": code, "message": fix}``.

Why ``Host`` matters: a page on ``evil.example`` can rebind its own name to 127.0.0.1 (DNS
rebinding); the browser then sends ``Host: evil.example`` and a matching ``Origin``, so comparing
the two proves nothing. Only a list of the names the relay is really reached by tells that page
from ours.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from .disconnect import STATUS_OF

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest

DEFAULT_PORTS = {"http": 80, "https": 443}
# What a proxy may report in X-Forwarded-Proto, as the scheme of the page that connects.
FORWARDED_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

# host[:port]: a DNS name (RFC 1035 labels; "_" too, as in container and service names) with an
# optional trailing dot — an IPv4 address has the same characters — or an IPv6 address in
# brackets, without a zone id (it names an interface, not a host).
_HOST = re.compile(r"(?:(?P<name>[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*)\.?"
                   r"|\[(?P<ipv6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?")
_LONGEST_HOST = 253 + 1 + 1 + 5  # a name, its trailing dot, ":" and a port
_SHOWN = 100  # characters of a refused header echoed back in the message
MAX_PORT = 65535

# The query parameters of /socket and /events; anything else is refused, so that a typo is not
# silently a subscription to everything.
PARAMETERS = ("ns", "ops", "filter", "resume_after", "access_token", "snapshot")
# A subscription's query string: a filter (4 KiB, up to three times that percent-encoded), a token,
# namespaces and a resume token fit with room to spare. Below the request head's own limit
# (MIN_REQUEST_HEAD_BYTES), so that a long query is refused as one here (414 query_too_large),
# with room left for the headers.
MAX_QUERY_BYTES = 32 * 1024
MIN_REQUEST_HEAD_BYTES = MAX_QUERY_BYTES + 16 * 1024


class Refusal(Exception):
    """A request the relay turns away before it costs a connection: a stable ``code`` that
    clients branch on (the body's ``error``), a ``message`` that says how to fix the request,
    and the HTTP ``status`` that ``disconnect.REFUSALS`` lists the code under (a code it does
    not list is a KeyError: every refusal is in the table clients follow)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = STATUS_OF[code]

    def body(self) -> str:
        return json.dumps({"error": self.code, "message": self.message})


class Origin(NamedTuple):
    """A web origin (scheme, host, port), with the scheme's default port filled in."""

    scheme: str
    host: str
    port: int


HostName = tuple[str, int | None]  # (host, port or None: any port), as ALLOWED_HOSTS lists them
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_host(text: str) -> HostName | None:
    """``(host, port or None)`` of a ``host[:port]``, normalised — lower case, no trailing dot,
    IPv6 in brackets and compressed — or None if it is not one."""
    if not text or len(text) > _LONGEST_HOST:
        return None
    match = _HOST.fullmatch(text.lower())
    if match is None:
        return None
    host, ipv6, port = match.group("name", "ipv6", "port")
    if ipv6 is not None:
        try:
            host = f"[{ipaddress.IPv6Address(ipv6).compressed}]"
        except ValueError:
            return None
    if port is None:
        return host, None
    number = int(port)
    return (host, number) if 0 < number <= MAX_PORT else None


def parse_origin(text: str) -> Origin | None:
    """The ``Origin`` header's (or an ALLOWED_ORIGINS entry's) origin, or None (``null``, a
    path, credentials, another scheme)."""
    scheme, separator, authority = text.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in DEFAULT_PORTS:
        return None
    return served_origin(authority.removesuffix("/"), scheme)


def served_origin(host: str | None, scheme: str) -> Origin | None:
    """The origin of a page served over ``scheme`` under this ``Host``, or None if ``Host`` is
    not a ``host[:port]``."""
    parsed = parse_host(host) if host is not None else None
    if parsed is None:
        return None
    name, port = parsed
    return Origin(scheme, name, port or DEFAULT_PORTS[scheme])


def forwarded(request: HTTPServerRequest, proxies: Networks) -> tuple[str, str]:
    """The client's address and the scheme its page was served over.

    X-Forwarded-For and X-Forwarded-Proto are believed only from TRUSTED_PROXIES: each trusted
    proxy appends the address and scheme it received, so both lists are walked back from the
    nearest hop for as long as the hop is one of our proxies.
    """
    address, scheme = request.remote_ip or "", request.protocol
    if not proxies:
        return address, scheme
    hops = _list(request.headers.get("X-Forwarded-For", ""))
    schemes = _list(request.headers.get("X-Forwarded-Proto", ""))
    while (hops or schemes) and _in_networks(address, proxies):
        if schemes:
            scheme = FORWARDED_SCHEMES.get(schemes.pop().lower(), scheme)
        if not hops:
            break
        address = hops.pop()
    return address, scheme


def allowed_hosts(setting: tuple[HostName | str, ...], listen_host: str,
                  port: int) -> frozenset[HostName] | None:
    """The ``(host, port or None)`` pairs the relay answers to; None: any ``Host``.

    ALLOWED_HOSTS unset: a relay on a loopback address answers to the loopback names on the
    port it listens on — only pages on this machine reach it, and none of them by a rebound
    name. On any other address the names are the operator's to give (start-up warns).
    """
    if "*" in setting:
        return None
    if setting:
        return frozenset(name for name in setting if not isinstance(name, str))
    names: tuple[str, ...]
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        if listen_host.lower() != "localhost":
            return None
        names = LOOPBACK_NAMES
    else:
        if not address.is_loopback:
            return None
        own = f"[{address.compressed}]" if address.version == 6 else address.compressed
        names = (*LOOPBACK_NAMES, own)
    return frozenset((name, port) for name in names)


def check_host(served: Origin | None, allowed: frozenset[HostName] | None) -> None:
    """Refuse (421 Misdirected Request) a request whose ``Host`` (``served_origin``) the relay
    does not answer to.

    A listed name without a port stands for every port; with one, ``Host`` without a port means
    the scheme's default port.
    """
    if allowed is None:
        return
    if served is not None and ((served.host, None) in allowed
                               or (served.host, served.port) in allowed):
        return
    named = "a Host that is not host[:port]" if served is None else (
        f"Host {served.host}:{served.port}")
    raise Refusal(
        "host_not_allowed", f"this relay does not answer to {named}; if clients reach it by "
        "that name, add it to ALLOWED_HOSTS (comma-separated host[:port])")


def check_origin(origin: str | None, served: Origin | None,
                 allowed: tuple[Origin | str, ...]) -> None:
    """Refuse (403) a browser page from an origin that may not connect.

    ALLOWED_ORIGINS unset: only the relay's own origin (``served_origin``) — the scheme it is
    served over, and the host and port of ``Host`` — so an ``https`` page never passes for an
    ``http`` relay.
    """
    if origin is None or "*" in allowed:
        return  # not a browser: origin checks protect browsers' ambient credentials only
    page = parse_origin(origin)
    if page is not None and (page in allowed if allowed else page == served):
        return
    raise Refusal(
        "origin_not_allowed", f"origin {_shown(origin)} may not connect; add it to "
        "ALLOWED_ORIGINS (default: the relay's own scheme, host and port only; behind a TLS "
        "proxy, list it in TRUSTED_PROXIES so that its X-Forwarded-Proto counts)")


def check_query_size(query: str) -> None:
    """Refuse (414) a query string too long to be a subscription, before anything reads it."""
    if len(query) > MAX_QUERY_BYTES:
        raise Refusal(
            "query_too_large", f"the query string is over {MAX_QUERY_BYTES // 1024} KiB; "
            "filters are limited to 4 KiB")


def query_values(arguments: Mapping[str, list[bytes]]) -> dict[str, str]:
    """The query's parameters, one text value each: refuse (400) bytes that are not UTF-8, a
    name that is not one of ``PARAMETERS`` and a name given twice."""
    try:
        decoded = {name: [value.decode("utf-8", "strict") for value in values]
                   for name, values in arguments.items()}
    except UnicodeDecodeError:
        raise Refusal("invalid_encoding",
                      "the query string is not valid UTF-8 after percent-decoding") from None
    unknown = sorted(set(decoded) - set(PARAMETERS))
    if unknown:
        raise Refusal(
            "unknown_parameter", f"unknown query parameter {unknown[0]!r}; "
            f"the accepted ones are {', '.join(PARAMETERS)}")
    values = {}
    for name, items in decoded.items():
        if len(items) != 1:
            raise Refusal(
                "repeated_parameter", f"{name} is given {len(items)} times; give it once "
                "(use commas inside one value for several namespaces or operation types)")
        values[name] = items[0]
    return values


class Connections:
    """Open connections in total and per client address, against MAX_CONNECTIONS and
    MAX_CONNECTIONS_PER_IP (0: no cap)."""

    def __init__(self, total: int = 0, per_address: int = 0):
        self.total_cap = total
        self.per_address_cap = per_address
        self.total = 0
        self.by_address: Counter[str] = Counter()

    def acquire(self, address: str) -> Slot:
        """Count one more connection from ``address``, or refuse it (503, 429)."""
        if self.total_cap and self.total >= self.total_cap:
            raise Refusal(
                "too_many_connections", f"this relay holds its maximum of {self.total_cap} "
                "connections (MAX_CONNECTIONS); retry later or connect to another relay")
        if self.per_address_cap and self.by_address[address] >= self.per_address_cap:
            raise Refusal(
                "too_many_connections_from_address", f"{address} already has "
                f"{self.per_address_cap} connections (MAX_CONNECTIONS_PER_IP); close one first")
        self.total += 1
        self.by_address[address] += 1
        return Slot(self, address)

    def _release(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


class Slot:
    """One counted connection. ``release`` gives it back once, however often it is called: a
    connection can end on several paths (a failed handshake, the socket closing, shutdown)."""

    __slots__ = ("_connections", "address")

    def __init__(self, connections: Connections, address: str):
        self._connections: Connections | None = connections
        self.address = address

    def release(self) -> None:
        connections, self._connections = self._connections, None
        if connections is not None:
            connections._release(self.address)


def _list(header: str) -> list[str]:
    return [item.strip() for item in header.split(",") if item.strip()]


def _in_networks(address: str, networks: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")
