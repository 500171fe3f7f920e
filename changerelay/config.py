"""Settings, read once at start-up from flags, the environment and a ``.env`` file.

Precedence is the usual one: a command-line flag beats an environment variable, which beats
``.env`` in the working directory, which beats the default. Every problem is raised as one
:class:`ConfigError` naming the setting and the fix, so ``server.py`` can print a single line and
exit with status 2 instead of a traceback.

A setting is one declaration — a field of :class:`Config` with its variable, default, help and
the converter that reads it — so adding one is one edit.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from . import admission, namespaces
from .pipeline import PipelineError, parse_pipeline, parse_redact

FULL_DOCUMENT_MODES = ("default", "updateLookup", "whenAvailable", "required")
BEFORE_CHANGE_MODES = ("off", "whenAvailable", "required")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
MAX_REPLAY_BUFFER = 10_000_000  # events: at about a kilobyte each, already gigabytes of memory
MAX_REQUEST_HEAD_BYTES = 1024 * 1024  # the most MAX_REQUEST_HEAD_BYTES may be: 16 times its default


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the setting and how to fix it."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting}: {message}")
        self.setting = setting


# A converter reads one setting: (where it came from — a flag or a variable —, its text) to its
# value, or a ConfigError naming where it came from.
Converter = Callable[[str, str], Any]


def _text(source: str, raw: str) -> str:
    return raw


def _whole(minimum: int = 0, maximum: int | None = None) -> Converter:
    def convert(source: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(source, f"{raw!r} is not a whole number, e.g. {source}=100") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(source, f"{value} is out of range; it must be {bound}")
        return value
    return convert


def _seconds(source: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(source, f"{raw!r} is not a number of seconds, e.g. 5 or 0.5") from None
    if not value > 0:
        raise ConfigError(source, f"{raw!r} must be greater than 0")
    return value


def _boolean(source: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(source, f"{raw!r} is not a boolean; use true or false")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _choice(options: tuple[str, ...], fold: bool = False) -> Converter:
    def convert(source: str, raw: str) -> str:
        value = raw.upper() if fold else raw
        if value not in options:
            raise ConfigError(source, f"{raw!r} is not one of {', '.join(options)}")
        return value
    return convert


def _mongo_uri(source: str, raw: str) -> str:
    if not raw.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(
            source, f"{redact_uri(raw)!r} must start with mongodb:// or mongodb+srv://, "
            "e.g. mongodb://localhost:27017/?replicaSet=rs0")
    if raw.startswith("mongodb+srv://"):
        # SRV records are resolved when we connect, so a DNS hiccup at start-up is retried like
        # any other unreachable deployment instead of failing the process.
        _check_srv_syntax(source, raw)
        return raw
    try:
        from pymongo.uri_parser import parse_uri

        parse_uri(raw)
    except Exception as exc:  # pymongo raises InvalidURI / ConfigurationError / ValueError
        message = str(exc).replace(raw, redact_uri(raw))
        raise ConfigError(source, f"invalid connection string: {message}") from None
    return raw


def _check_srv_syntax(source: str, raw: str) -> None:
    host = urlsplit(raw).netloc.rpartition("@")[2]
    if not host or "," in host or ":" in host:
        raise ConfigError(
            source, "a mongodb+srv:// string takes exactly one host name and no port, "
            "e.g. mongodb+srv://user:pass@cluster0.example.net/")


def _db_name(source: str, raw: str) -> str:
    try:
        return namespaces.database(raw)
    except namespaces.NamespaceError as exc:
        raise ConfigError(source, str(exc)) from None


def _collection_name(source: str, raw: str) -> str:
    try:
        return namespaces.collection(raw)
    except namespaces.NamespaceError as exc:
        raise ConfigError(source, f"{exc}: not a collection that can be watched") from None


def _parsed(parse: Callable[[str], Any]) -> Converter:
    """A converter from one of pipeline.py's parsers: its refusal names this setting."""
    def convert(source: str, raw: str) -> Any:
        try:
            return parse(raw)
        except PipelineError as exc:
            raise ConfigError(source, str(exc)) from None
    return convert


def _names(parse: Callable[[str], Any], what: str, example: str) -> Converter:
    """A comma-separated list of what ``parse`` accepts, normalised by it; ``*`` stands for any."""
    def convert(source: str, raw: str) -> tuple[Any, ...]:
        names = []
        for item in _csv(raw):
            name = item if item == "*" else parse(item)
            if name is None:
                raise ConfigError(source, f"{item!r} is not {what}; write {example}, or * for any")
            names.append(name)
        return tuple(names)
    return convert


def _networks(source: str, raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _csv(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                source, f"{item!r} is not an IP address or network, e.g. 10.0.0.1 or 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _pem_path(source: str, raw: str) -> str:
    if not Path(raw).is_file():
        raise ConfigError(source, f"{raw!r} is not a readable file; give the path to a PEM key")
    return raw


@dataclass(frozen=True)
class Setting:
    env: str
    default: object
    help: str
    convert: Converter
    aliases: tuple[str, ...] = ()


def _setting(env: str, default: object, help: str, convert: Converter, *aliases: str) -> Any:
    return field(default=default, metadata={"spec": Setting(env, default, help, convert, aliases)})


@dataclass(frozen=True)
class Config:
    """Every setting, already validated and converted. Field order is the order in ``--help``."""

    mongo_uri: str = _setting(
        "MONGO_SRV", "mongodb://localhost:27017",
        "MongoDB connection string, mongodb:// or mongodb+srv://", _mongo_uri, "MONGODB_URI")
    watch_db: str | None = _setting(
        "WATCH_DB", None, "database to watch; unset: the whole deployment", _db_name)
    watch_collection: str | None = _setting(
        "WATCH_COLLECTION", None, "collection to watch inside WATCH_DB; unset: the whole database",
        _collection_name)
    host: str = _setting("HOST", "127.0.0.1", "address to listen on", _text)
    port: int = _setting("PORT", 8000, "port to listen on", _whole(0, admission.MAX_PORT))
    full_document: str = _setting(
        "FULL_DOCUMENT", "updateLookup", "fullDocument mode: " + ", ".join(FULL_DOCUMENT_MODES)
        + "; row rules need post-images (whenAvailable)", _choice(FULL_DOCUMENT_MODES))
    full_document_before_change: str = _setting(
        "FULL_DOCUMENT_BEFORE_CHANGE", "off", "pre-images (fullDocumentBeforeChange): "
        + ", ".join(BEFORE_CHANGE_MODES) + "; let row rules decide deletes and leaves",
        _choice(BEFORE_CHANGE_MODES))
    pipeline: tuple[dict[str, Any], ...] = _setting(
        "PIPELINE", (), "JSON array of stages appended after $changeStream",
        _parsed(parse_pipeline))
    log_level: str = _setting(
        "LOG_LEVEL", "INFO", "one of " + ", ".join(LOG_LEVELS), _choice(LOG_LEVELS, fold=True))
    log_format: str = _setting("LOG_FORMAT", "text", "text or json", _choice(LOG_FORMATS))
    replay_buffer: int = _setting(
        "REPLAY_BUFFER", 10000, "recent events kept in memory for fast resume",
        _whole(0, MAX_REPLAY_BUFFER))
    replay_buffer_bytes: int = _setting(
        "REPLAY_BUFFER_BYTES", 64 * 1024 * 1024, "byte bound of the replay buffer", _whole())
    client_buffer_bytes: int = _setting(
        "CLIENT_BUFFER_BYTES", 8 * 1024 * 1024,
        "outbound bytes a client may have pending before it is cut off as a slow consumer",
        _whole(1))
    catchup_streams: int = _setting(
        "CATCHUP_STREAMS", 8, "change streams opened at once for clients resuming from history",
        _whole(1))
    position_interval: float = _setting(
        "POSITION_INTERVAL", 5.0, "seconds without a frame before a position message is sent "
        "(again: when the last one is about to leave the replay buffer, or after 120 of them)",
        _seconds)
    sse_heartbeat: float = _setting(
        "SSE_HEARTBEAT", 15.0, "seconds between SSE comment heartbeats (keeps proxies open)",
        _seconds)
    ws_ping_interval: float = _setting(
        "WS_PING_INTERVAL", 20.0, "seconds between WebSocket pings; a client that does not "
        "answer within as long again is closed", _seconds)
    ws_compression: bool = _setting(
        "WS_COMPRESSION", False,
        "accept permessage-deflate (each event compressed once; clients pay to inflate)",
        _boolean)
    reuse_port: int = _setting(
        "REUSE_PORT", 0, "run N processes sharing the port with SO_REUSEPORT (0: one process)",
        _whole())
    shutdown_timeout: float = _setting(
        "SHUTDOWN_TIMEOUT", 4.0, "seconds given to close clients and MongoDB on SIGTERM",
        _seconds)
    auth_jwt_secret: str | None = _setting(
        "AUTH_JWT_SECRET", None, "HS256 secret; turns token authentication on", _text)
    metrics_token: str | None = _setting(
        "METRICS_TOKEN", None, "a secret that GET /metrics then requires as a Bearer token",
        _text)
    auth_jwt_public_key: str | None = _setting(
        "AUTH_JWT_PUBLIC_KEY", None, "path to a PEM public key (RS256/ES256); turns auth on",
        _pem_path)
    auth_leeway_seconds: int = _setting(
        "AUTH_LEEWAY_SECONDS", 5, "seconds of clock difference allowed between the token's "
        "issuer and the relay, both ways, when exp and nbf are checked (0-300)", _whole(0, 300))
    redact: tuple[str, ...] = _setting(
        "REDACT", (), "comma-separated document fields (fullDocument.x.y) removed inside MongoDB "
        "from every event", _parsed(lambda raw: parse_redact(_csv(raw))))
    allowed_origins: tuple[admission.Origin | str, ...] = _setting(
        "ALLOWED_ORIGINS", (), "comma-separated origins allowed to connect; default same origin",
        _names(admission.parse_origin, "an origin",
               "scheme://host[:port], e.g. https://app.example.com"))
    max_connections: int = _setting(
        "MAX_CONNECTIONS", 0, "total connection cap (0: off)", _whole())
    max_connections_per_ip: int = _setting(
        "MAX_CONNECTIONS_PER_IP", 0, "connections per client address (0: off)", _whole())
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        "TRUSTED_PROXIES", (), "comma-separated proxy addresses/networks whose X-Forwarded-For "
        "and X-Forwarded-Proto are believed", _networks)
    allowed_hosts: tuple[tuple[str, int | None] | str, ...] = _setting(
        "ALLOWED_HOSTS", (), "comma-separated host[:port] names clients reach the relay by; any "
        "other Host gets 421, except on /healthz, /readyz and /metrics (* = any). Unset: the "
        "loopback names on the listening port if HOST is loopback, else no check",
        _names(admission.parse_host, "a host[:port]", "the names clients use, "
               "e.g. relay.example.com,relay.example.com:8443,[::1]:8000"))
    demo: bool = _setting(
        "DEMO", False, "run with a built-in MongoDB stand-in on 127.0.0.1 and a writer of demo "
        "data (no MongoDB needed; MONGO_SRV is ignored): `changerelay --demo`", _boolean)
    max_buffered_bytes: int = _setting(
        "MAX_BUFFERED_BYTES", 256 * 1024 * 1024, "unsent bytes all clients together may hold; "
        "past it the clients holding the most are cut off as slow consumers (0: off)", _whole())
    max_request_head_bytes: int = _setting(
        "MAX_REQUEST_HEAD_BYTES", 64 * 1024, "bytes of a request's line and headers; more: 431 "
        "(or 414, when the request line alone is longer)",
        _whole(admission.MIN_REQUEST_HEAD_BYTES, MAX_REQUEST_HEAD_BYTES))
    request_head_timeout: float = _setting(
        "REQUEST_HEAD_TIMEOUT", 10.0, "seconds a connection has to send a whole request head, "
        "from its opening or its last response; later: 408, or closed if it sent nothing",
        _seconds)
    max_pending_requests: int = _setting(
        "MAX_PENDING_REQUESTS", 1024, "connections still sending their request head at once; "
        "past it the oldest is closed (503)", _whole(1))
    catchup_streams_per_peer: int = _setting(
        "CATCHUP_STREAMS_PER_PEER", 2, "of the CATCHUP_STREAMS, at most this many for one client "
        "address (and one token subject, when auth is on); more wait, taking turns with other "
        "peers",
        _whole(1))
    snapshot_limit: int = _setting(
        "SNAPSHOT_LIMIT", 10_000, "documents one live query's snapshot (snapshot=1) may hold; "
        "more is refused (400 snapshot_too_large)", _whole(1))
    snapshot_reads: int = _setting(
        "SNAPSHOT_READS", 4, "live queries' snapshot reads at once; more wait, taking turns with "
        "other peers", _whole(1))
    snapshot_reads_per_peer: int = _setting(
        "SNAPSHOT_READS_PER_PEER", 1, "of the SNAPSHOT_READS, at most this many for one client "
        "address (and one token subject, when auth is on)", _whole(1))

    @property
    def scope(self) -> str:
        """``deployment``, ``database`` or ``collection``: what one ``watch()`` covers."""
        if self.watch_collection:
            return "collection"
        return "database" if self.watch_db else "deployment"

    @property
    def redacted_uri(self) -> str:
        return redact_uri(self.mongo_uri)


def redact_uri(uri: str) -> str:
    """The connection string with its password replaced, safe for logs and responses."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable connection string>"
    if "@" not in parts.netloc:
        return uri
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def _specs() -> list[tuple[str, Setting]]:
    return [(f.name, f.metadata["spec"]) for f in fields(Config)]


def _flag(env: str) -> str:
    return "--" + env.lower().replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("command line", f"{message}; see --help")


def build_parser(prog: str = "changerelay") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Relay MongoDB change streams to browsers over WebSockets and SSE.",
        epilog="Every flag can also be set as the environment variable shown, or in ./.env. "
        "Flags win over the environment, which wins over .env.",
    )
    for name, spec in _specs():
        envs = (spec.env, *spec.aliases)
        default = "unset" if spec.default in (None, ()) else spec.default
        switch: dict[str, Any] = (
            {"nargs": "?", "const": "true"} if isinstance(spec.default, bool) else {})
        parser.add_argument(
            *map(_flag, envs), dest=name, metavar=spec.env, default=None, **switch,
            help=f"{spec.help} (env {' / '.join(envs)}; default: {default})",
        )
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         dotenv_path: str | os.PathLike[str] | None = ".env",
         prog: str = "changerelay") -> Config:
    """Read and validate every setting; raise :class:`ConfigError` on the first bad one."""
    environ = os.environ if environ is None else environ
    args = build_parser(prog).parse_args(argv)
    dotenv = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        dotenv = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    values = {}
    for name, spec in _specs():
        raw = getattr(args, name)
        source = _flag(spec.env)
        if raw is None:
            for mapping in (environ, dotenv):
                for key in (spec.env, *spec.aliases):
                    if raw is None and mapping.get(key, "") != "":
                        raw, source = mapping[key], key
        if raw is None or raw == "":
            continue
        values[name] = spec.convert(source, raw.strip())
    config = Config(**values)
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    if config.demo and config.reuse_port > 1:
        raise ConfigError("DEMO", "runs one process with its own MongoDB stand-in; unset "
                          "REUSE_PORT (each worker would watch a stand-in of its own)")
    if config.watch_collection:
        if not config.watch_db:
            raise ConfigError("WATCH_COLLECTION",
                              "needs WATCH_DB too: set WATCH_DB to the collection's database")
        try:
            namespaces.make(config.watch_db, config.watch_collection)
        except namespaces.NamespaceError as exc:
            raise ConfigError("WATCH_COLLECTION", str(exc)) from None
    for setting, mode in (("FULL_DOCUMENT", config.full_document),
                          ("FULL_DOCUMENT_BEFORE_CHANGE", config.full_document_before_change)):
        if mode == "required" and not config.watch_collection:
            raise ConfigError(
                setting, "required needs WATCH_COLLECTION: on a database or deployment watch, "
                "one change in a collection without changeStreamPreAndPostImages fails the "
                "shared stream with error 47 (NoMatchingDocument) on every reopen, and every "
                "client stalls; use whenAvailable, or watch one collection")
    if config.auth_jwt_secret and config.auth_jwt_public_key:
        raise ConfigError(
            "AUTH_JWT_SECRET", "set AUTH_JWT_SECRET (HS256) or AUTH_JWT_PUBLIC_KEY, not both")


def describe(config: Config) -> str:
    """One line for the start-up log, with the password masked."""
    scope = {"deployment": "the whole deployment", "database": f"database {config.watch_db}",
             "collection": f"{config.watch_db}.{config.watch_collection}"}[config.scope]
    return (f"watching {scope} on {config.redacted_uri} (fullDocument={config.full_document}, "
            f"fullDocumentBeforeChange={config.full_document_before_change}, "
            f"{len(config.pipeline)} pipeline stages)")
