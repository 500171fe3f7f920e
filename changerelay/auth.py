"""Token authentication and row-level access: the browser holds a JWT, the relay holds MongoDB.

A token is read from ``Authorization: Bearer`` or, because browsers cannot set headers on
WebSocket and EventSource requests, from the ``access_token`` query parameter. Its claims narrow
what the bearer may see:

* ``ns`` — the namespaces the bearer may subscribe to (a list, or a comma-separated string);
* ``filter`` — a mandatory filter in the safe filter language, ANDed with the client's own.

An access rule that reads ``fullDocument`` cannot be decided for an event without a document (a
delete, or an update whose document was deleted before the lookup): such events are withheld
rather than guessed at. Events about a whole collection or database (drop, rename, dropDatabase,
invalidate) carry no document and no key; they are delivered, subject to ``ns``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jwt

from . import filters, namespaces
from .subscription import Subscription, SubscriptionError

HMAC_ALGORITHMS = ["HS256"]
PUBLIC_KEY_ALGORITHMS = ["RS256", "ES256"]
POLICY_VIOLATION = 1008
LEEWAY = 5
DOCUMENT_FIELDS = ("fullDocument", "fullDocumentBeforeChange", "updateDescription")


class AccessRule:
    """A JWT ``filter`` claim, compiled, with the rule for events that lack what it reads."""

    __slots__ = ("filter", "key", "reads_document")

    def __init__(self, spec: dict):
        self.filter = filters.compile_filter(spec)
        self.key = "rule:" + self.filter.key
        paths = _paths(spec)
        self.reads_document = any(p.split(".")[0] in DOCUMENT_FIELDS for p in paths)

    def __call__(self, change: dict) -> bool:
        if self.reads_document and change.get("documentKey") is not None and not change.get(
            "fullDocument"
        ):
            return False  # undecidable without the document: withhold
        return self.filter.predicate(change)


def _paths(spec) -> set[str]:
    found = set()
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key in ("$and", "$or", "$nor") and isinstance(value, list):
                for item in value:
                    found |= _paths(item)
            elif not key.startswith("$"):
                found.add(key)
    return found


class Authenticator:
    def __init__(self, key, algorithms: list[str]):
        self.key = key
        self.algorithms = algorithms

    @classmethod
    def from_config(cls, config) -> Authenticator:
        if config.auth_jwt_secret:
            return cls(config.auth_jwt_secret, HMAC_ALGORITHMS)
        return cls(Path(config.auth_jwt_public_key).read_text(), PUBLIC_KEY_ALGORITHMS)

    def authenticate(self, request) -> dict:
        token = _bearer(request)
        if not token:
            raise SubscriptionError(
                "missing_token", "this relay requires a token: send Authorization: Bearer "
                "<jwt> or ?access_token=<jwt>", status=401)
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms, leeway=LEEWAY,
                                options={"require": ["exp"]})
        except jwt.ExpiredSignatureError:
            raise SubscriptionError("token_expired", "the token has expired; get a fresh one",
                                    status=401) from None
        except jwt.MissingRequiredClaimError:
            raise SubscriptionError("invalid_token", "the token has no exp claim; tokens must "
                                    "expire (keep them short-lived)", status=401) from None
        except jwt.InvalidTokenError as exc:
            raise SubscriptionError("invalid_token", f"the token is not valid ({exc})",
                                    status=401) from None
        claims["_rule"] = self._rule(claims)
        claims["_ns"] = self._namespaces(claims)
        return claims

    def _rule(self, claims) -> AccessRule | None:
        spec = claims.get("filter")
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise SubscriptionError("invalid_token", "the token's filter claim must be an "
                                    "object in the filter language", status=401)
        try:
            return AccessRule(spec)
        except filters.FilterError as exc:
            raise SubscriptionError("invalid_token", f"the token's filter claim is invalid: "
                                    f"{exc.message}", status=401) from None

    def _namespaces(self, claims):
        raw = claims.get("ns")
        if raw is None:
            return None
        try:
            if isinstance(raw, str):
                return namespaces.parse_list(raw)
            if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
                if not raw:
                    raise SubscriptionError("ns_forbidden", "the token's ns claim is an empty "
                                            "list, which grants no namespace", status=403)
                return frozenset(namespaces.parse(item) for item in raw)
        except namespaces.NamespaceError as exc:
            raise SubscriptionError("invalid_token", f"the token's ns claim is malformed: {exc}",
                                    status=401) from None
        raise SubscriptionError("invalid_token", "the token's ns claim must be a list of "
                                "db or db.collection names", status=401)

    def restrict(self, subscription: Subscription, claims: dict) -> Subscription:
        allowed = claims["_ns"]
        wanted = subscription.namespaces
        if allowed is not None:
            if wanted is None:
                wanted = allowed
            elif not namespaces.within(wanted, allowed):
                raise SubscriptionError(
                    "ns_forbidden", "the token does not allow these namespaces; subscribe "
                    "within " + ", ".join(sorted(map(str, allowed))), status=403)
        return Subscription(wanted, subscription.ops, subscription.filter, claims["_rule"])

    def expire(self, clients) -> None:
        """Close connections whose token's ``exp`` has passed (checked once a second)."""
        now = time.time()
        for client in tuple(clients):
            claims = getattr(client, "claims", None)
            if claims and claims.get("exp", now + 1) + LEEWAY <= now:
                client.expire()


def _bearer(request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    values = request.query_arguments.get("access_token")
    if values:
        return values[-1].decode("utf-8", "replace")
    return None
