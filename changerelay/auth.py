"""Token authentication: the browser holds a JWT, the relay holds MongoDB.

A token is read from ``Authorization: Bearer`` or, because browsers cannot set headers on
WebSocket and EventSource requests, from the ``access_token`` query parameter. Its claims narrow
what the bearer may see:

* ``ns`` — the namespaces the bearer may subscribe to (a list, or a comma-separated string);
* ``filter`` — a row rule in the safe filter language, ANDed with the client's own filter and
  decided on each event as it was (``rows.py``).

A rule that reads ``fullDocument`` needs post-images: with ``FULL_DOCUMENT=updateLookup`` an
update's document is looked up when the event is read, so such a token is refused at the
handshake (403 ``row_rules_need_post_images``) rather than admitted to a stream whose updates
could only ever be withheld.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from logzero import logger

from . import filters, namespaces, pipeline
from .admission import Refusal
from .namespaces import Namespace
from .rows import POST_IMAGE_MODES, AccessRule
from .subscription import Subscription

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest

    from .config import Config

HMAC_ALGORITHMS = ["HS256"]
PUBLIC_KEY_ALGORITHMS = ["RS256", "ES256"]
ENABLE_POST_IMAGES = (
    "enable post-images: run db.runCommand({collMod: \"<collection>\", "
    "changeStreamPreAndPostImages: {enabled: true}}) on each watched collection (MongoDB 6.0+) "
    "and set FULL_DOCUMENT=whenAvailable")


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a valid token that the relay acts on, each of a checked type.

    PyJWT validates ``exp``, ``nbf`` and ``iat`` but lets a numeric string or a boolean
    through, and the relay reads ``exp`` again once a second for the life of the connection;
    so every claim it reads is checked here, once, and a bad one refuses the token.
    """

    expires: float                            # exp: seconds since 1970
    namespaces: frozenset[Namespace] | None   # ns: None grants the whole watched scope
    rule: AccessRule | None        # filter
    subject: str | None = None     # sub (PyJWT checks it is a string): whose catch-ups these are


TIME_CLAIMS = ("exp", "nbf", "iat")


class Expiring(Protocol):
    """A connection that holds a token: what ``Authenticator.expire`` reads and calls."""

    claims: Claims | None
    peer: str

    def expire(self) -> None: ...


class Authenticator:
    def __init__(self, key: str, algorithms: list[str], full_document: str = "updateLookup",
                 redact: tuple[str, ...] = (), leeway_seconds: float = 0):
        self.key = key
        # AUTH_LEEWAY_SECONDS: exp and nbf are checked against our clock, and a token minted a
        # moment ago by an issuer whose clock is a little ahead or behind must still pass.
        self.leeway_seconds = leeway_seconds
        self.algorithms = algorithms
        self.full_document = full_document  # the FULL_DOCUMENT mode of every stream we read
        self.redact = redact                # REDACT: fields no event the relay reads has

    @classmethod
    def from_config(cls, config: Config) -> Authenticator:
        if config.full_document == "updateLookup":
            logger.warning("auth is on and FULL_DOCUMENT=updateLookup: tokens whose filter "
                           "claim reads fullDocument will be refused (403); to use row rules, "
                           "%s", ENABLE_POST_IMAGES)
        if config.auth_jwt_secret:
            return cls(config.auth_jwt_secret, HMAC_ALGORITHMS, config.full_document,
                       config.redact, config.auth_leeway_seconds)
        if config.auth_jwt_public_key:
            return cls(Path(config.auth_jwt_public_key).read_text(), PUBLIC_KEY_ALGORITHMS,
                       config.full_document, config.redact, config.auth_leeway_seconds)
        raise ValueError("auth is off: neither AUTH_JWT_SECRET nor AUTH_JWT_PUBLIC_KEY is set")

    def authenticate(self, request: HTTPServerRequest) -> Claims:
        token = _bearer(request)
        if not token:
            raise Refusal(
                "missing_token", "this relay requires a token: send Authorization: Bearer "
                "<jwt> or ?access_token=<jwt>")
        try:
            payload = jwt.decode(token, self.key, algorithms=self.algorithms,
                                 leeway=self.leeway_seconds, options={"require": ["exp"]})
        except jwt.ExpiredSignatureError:
            raise Refusal("token_expired", "the token has expired; get a fresh one") from None
        except jwt.MissingRequiredClaimError:
            raise Refusal("invalid_token", "the token has no exp claim; tokens must "
                          "expire (keep them short-lived)") from None
        except jwt.InvalidTokenError as exc:
            raise Refusal("invalid_token", f"the token is not valid ({exc})") from None
        for name in TIME_CLAIMS:
            if name in payload and not _seconds(payload[name]):
                raise _bad_claim(name, "must be a number of seconds since 1970, not "
                                 f"{type(payload[name]).__name__}")
        return Claims(payload["exp"], self._namespaces(payload), self._rule(payload),
                      payload.get("sub"))

    def _rule(self, payload: dict[str, Any]) -> AccessRule | None:
        if "filter" not in payload:
            return None
        spec = payload["filter"]
        if not isinstance(spec, dict):
            raise _bad_claim("filter", "must be an object in the filter language")
        try:
            rule = AccessRule(spec, post_images=self.full_document in POST_IMAGE_MODES)
        except filters.FilterError as exc:
            raise _bad_claim("filter", f"is invalid: {exc.message}") from None
        if rule.reads_document and self.full_document == "updateLookup":
            raise Refusal(
                "row_rules_need_post_images", "this token's filter claim reads fullDocument, "
                "and with FULL_DOCUMENT=updateLookup an update's document is the one found when "
                "the event is read, not the one at the event, so it cannot decide access; "
                + ENABLE_POST_IMAGES)
        for path in sorted(rule.paths):
            redacted = pipeline.redacted_field(path, self.redact)
            if redacted is not None:
                # Missing from every event: {"$ne": x} would pass all of them.
                raise Refusal(
                    "row_rule_reads_redacted_field", f"this token's filter claim reads {path}, "
                    f"and REDACT={redacted} removes that field from every event before the "
                    "relay sees it, so the rule cannot decide access; base the rule on a field "
                    "that is not redacted")
        return rule

    def _namespaces(self, payload: dict[str, Any]) -> frozenset[Namespace] | None:
        if "ns" not in payload:
            return None
        raw = payload["ns"]
        try:
            if isinstance(raw, str):
                return namespaces.parse_list(raw)
            if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
                if not raw:
                    raise Refusal("ns_forbidden", "the token's ns claim is an empty "
                                  "list, which grants no namespace")
                return frozenset(namespaces.parse(item) for item in raw)
        except namespaces.NamespaceError as exc:
            raise _bad_claim("ns", f"is malformed: {exc}") from None
        raise _bad_claim("ns", "must be a list of db or db.collection names")

    def restrict(self, subscription: Subscription, claims: Claims) -> Subscription:
        allowed = claims.namespaces
        wanted = subscription.namespaces
        if allowed is not None:
            if wanted is None:
                wanted = allowed
            elif not namespaces.within(wanted, allowed):
                raise Refusal(
                    "ns_forbidden", "the token does not allow these namespaces; subscribe "
                    "within " + ", ".join(sorted(map(str, allowed))))
        return Subscription(wanted, subscription.ops, subscription.filter, claims.rule, allowed)

    def expire(self, clients: Iterable[Expiring]) -> None:
        """Close connections whose token's ``exp`` has passed (checked once a second).

        One client's state must not stop the pass for the others: a client whose expiry cannot
        be read is closed (fail closed), and one that fails to close is logged and skipped.
        """
        deadline = time.time() - self.leeway_seconds
        for client in tuple(clients):
            try:
                due = client.claims is not None and client.claims.expires <= deadline
            except Exception:
                logger.exception("cannot read the token expiry of %s; closing it",
                                 getattr(client, "peer", "a client"))
                due = True
            if due:
                try:
                    client.expire()
                except Exception:
                    logger.exception("closing %s on token expiry failed",
                                     getattr(client, "peer", "a client"))


def _seconds(value: object) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _bad_claim(name: str, problem: str) -> Refusal:
    return Refusal("invalid_token", f"the token's {name} claim {problem}")


def bearer_header(request: HTTPServerRequest) -> str | None:
    """The token of an ``Authorization: Bearer`` header (RFC 6750 §2.1), if there is one."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _bearer(request: HTTPServerRequest) -> str | None:
    header = bearer_header(request)
    if header:
        return header
    values = request.query_arguments.get("access_token")
    if values:
        return values[-1].decode("utf-8", "replace")
    return None
