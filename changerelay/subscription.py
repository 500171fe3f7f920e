"""What one client asked for: the ``ns``, ``ops``, ``filter`` and ``resume_after`` parameters of
``/socket`` and ``/events``, validated.

Everything is checked at admission, before the WebSocket upgrade or the SSE response starts, so a
bad request gets HTTP 400 with ``{"error": code, "message": fix}`` and never costs the relay a
connection.
Two clients with equal subscriptions (the same namespaces, operation types, filter and access
rule) share one match per event in the hub.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import filters, tokens
from .admission import Refusal
from .events import Delivery, Event
from .namespaces import Namespace, NamespaceError, normalise, parse_list
from .rows import DELIVER, ENTERED, LEAVE, AccessRule

# What a subscription's clients are sent for a batch of events, in order.
Select = Callable[[list[Event]], Sequence[Delivery]]

OPERATION_TYPES = frozenset({
    "insert", "update", "replace", "delete", "drop", "rename", "dropDatabase", "invalidate",
    # showExpandedEvents (MongoDB 6.0+) types pass through a PIPELINE/option that enables them.
    "create", "createIndexes", "dropIndexes", "modify", "shardCollection", "reshardCollection",
    "refineCollectionShardKey",
})
MAX_NAMESPACES = 100


class Subscription:
    """Namespaces, operation types, a filter and an access rule, compiled into one
    ``select(events)``: what a client of this subscription is sent for those events, in order
    — each event, the event without its pre-image, or a ``leave`` in its place (see
    ``rows.py``).

    Subscriptions are equal when their normalised parts are: the hub groups clients by
    subscription and hands every client of a group the group's compiled copy, so two
    subscriptions that could decide one event differently must never be equal. ``None`` (no
    restriction) and an empty set (nothing) stay apart.
    """

    __slots__ = ("_hash", "access", "filter", "grant", "key", "live", "namespaces", "ops",
                 "select")

    def __init__(self, namespaces: Iterable[tuple[str, str | None]] | None = None,
                 ops: Iterable[str] | None = None, filter: filters.Filter | None = None,
                 access: AccessRule | None = None,
                 grant: Iterable[tuple[str, str | None]] | None = None, live: bool = False):
        self.namespaces = None if namespaces is None else normalise(namespaces)
        self.ops = None if ops is None else frozenset(ops)
        self.filter = filter
        self.access = access  # a JWT claim's row rule
        self.grant = None if grant is None else normalise(grant)  # a JWT claim's namespaces
        self.live = live  # a live query's: what stops matching is sent as a leave
        self.key = (self.namespaces, self.ops, None if filter is None else filter.key,
                    None if access is None else access.key, self.grant, live)
        self._hash = hash(self.key)
        self.select: Select = self._compile()

    def as_live(self) -> Subscription:
        """The same subscription as a live query's (``snapshot=1``)."""
        return Subscription(self.namespaces, self.ops, self.filter, self.access, self.grant,
                            live=True)

    @property
    def restricted(self) -> bool:
        """A token limits what it may see (an ``ns`` claim, a row rule): its clients may be told
        nothing of an event they were not sent, not even its resume token (see ``hub.py``)."""
        return self.grant is not None or self.access is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subscription) and other.key == self.key

    def __hash__(self) -> int:
        return self._hash

    def _compile(self) -> Select:
        # What anyone may know of an event (its namespace and type) is checked first; the
        # client's filter runs last, on exactly what the client would be sent, so that it
        # cannot probe what the access rule withheld.
        checks: list[Callable[[Any], bool]] = []
        if self.ops is not None:
            ops = self.ops
            checks.append(lambda event: event.op in ops)
        if self.namespaces is not None:
            checks.append(_in_namespaces(self.namespaces))
        if self.grant is not None:
            checks.append(_renamed_within(self.grant))
        predicate = None if self.filter is None else self.filter.predicate
        if self.live:
            return _live_select(checks, self.access, predicate)
        if self.access is None:
            if predicate is not None:
                checks.append(lambda event: predicate(event.change))
            if not checks:
                return lambda events: events
            matches: Callable[[Any], bool] = filters.all_of(checks)
            return lambda events: [event for event in events if matches(event)]
        visible: Callable[[Any], bool] | None = filters.all_of(checks) if checks else None
        decide, deliver, entered, leave = self.access.decide, DELIVER, ENTERED, LEAVE

        def select(events: list[Event]) -> list[Delivery]:
            picked: list[Delivery] = []
            for event in events:
                if visible is not None and not visible(event):
                    continue
                verdict = decide(event.change)
                item: Event
                if verdict is deliver:
                    item = event
                elif verdict is entered:
                    item = event.entered
                elif verdict is leave:
                    picked.append(event.leave)  # about access alone: the filter has no say
                    continue
                else:
                    continue
                if predicate is None or predicate(item.change):
                    picked.append(item)
            return picked

        return select

    def __repr__(self) -> str:
        return f"<Subscription {self.key!r}>"


CRUD = frozenset({"insert", "update", "replace", "delete"})


def _live_select(checks: list[Callable[[Any], bool]], access: AccessRule | None,
                 predicate: filters.Predicate | None) -> Select:
    """A live query's selection: of each change to a document it may see, the event when the
    document matches its filter after the change, else a ``leave`` (the key only): a client
    holds exactly the documents that match, whatever it held before. Decided on the event
    alone, so a client is also told of documents it never held leaving (it ignores those).

    A filter on the document needs FULL_DOCUMENT (``snapshot.plan`` refuses it without); an
    update whose document is still missing — looked up after a delete (whose event follows), or
    a post-image MongoDB no longer had — does not match, and leaves. Events that are not about
    one document (drop, rename, invalidate) are sent as they are.
    """
    visible: Callable[[Any], bool] | None = filters.all_of(checks) if checks else None
    decide = None if access is None else access.decide
    deliver, entered, leave = DELIVER, ENTERED, LEAVE

    def select(events: list[Event]) -> list[Delivery]:
        picked: list[Delivery] = []
        for event in events:
            if visible is not None and not visible(event):
                continue
            item: Event = event
            if decide is not None:
                verdict = decide(event.change)
                if verdict is leave:
                    picked.append(event.leave)
                    continue
                if verdict is entered:
                    item = event.entered
                elif verdict is not deliver:
                    continue
            if predicate is None or event.op not in CRUD or predicate(item.change):
                picked.append(item)
            else:
                picked.append(event.leave)
        return picked

    return select


def _in_namespaces(namespaces: frozenset[Namespace]) -> Callable[[Event], bool]:
    inside = _namespace_test(namespaces)
    return lambda event: inside(event.ns)


def _namespace_test(
        namespaces: frozenset[Namespace]) -> Callable[[tuple[str | None, str | None]], bool]:
    databases = {db for db, coll in namespaces if coll is None}
    collections = {(db, coll) for db, coll in namespaces if coll is not None}
    named = {db for db, _ in collections}

    def inside(ns: tuple[str | None, str | None]) -> bool:  # an event's (db, coll)
        db, coll = ns
        if db is None:          # invalidate: concerns every client of the stream
            return True
        if db in databases:
            return True
        if coll is None:        # dropDatabase: concerns every collection in it
            return db in named
        return ns in collections

    return inside


def _renamed_within(grant: frozenset[Namespace]) -> Callable[[Event], bool]:
    """A rename names the namespace it moves to (``to``): one outside the token's grant is a
    name its bearer may not learn, so that rename is withheld."""
    inside = _namespace_test(grant)

    def renamed_within(event: Event) -> bool:
        if event.op != "rename":
            return True
        to = event.change.get("to") or {}
        return inside((to.get("db") or "", to.get("coll")))

    return renamed_within


def parse(values: Mapping[str, str],
          scope: tuple[str | None, str | None]) -> tuple[Subscription, str | None]:
    """Turn the query's values (``admission.query_values``) into ``(Subscription,
    resume_after_id_or_None)``.

    ``scope`` is the watched ``(db, collection)``; namespaces outside it are refused.
    """
    namespaces = _namespaces(values["ns"], scope) if "ns" in values else None
    ops = _ops(values["ops"]) if "ops" in values else None
    predicate = _filter(values["filter"]) if "filter" in values else None
    resume_after = parse_resume(values["resume_after"]) if "resume_after" in values else None
    return Subscription(namespaces, ops, predicate), resume_after


def parse_resume(text: str) -> str:
    """A ``resume_after`` (or ``Last-Event-ID``) a client sent, as an id; or a Refusal."""
    try:
        return tokens.parse_id(text)
    except ValueError as exc:
        raise Refusal("invalid_resume_after", str(exc)) from None


def _namespaces(raw: str, scope: tuple[str | None, str | None]) -> frozenset[Namespace]:
    try:
        result = parse_list(raw, limit=MAX_NAMESPACES)
    except NamespaceError as exc:
        raise Refusal("invalid_ns", f"{exc}; give db or db.collection, "
                      "comma-separated") from None
    watch_db, watch_coll = scope
    for item in result:
        if (watch_db is not None and item.db != watch_db) or (
                watch_coll is not None and item.coll != watch_coll):
            where = ".".join(p for p in scope if p) or "the deployment"
            raise Refusal(
                "ns_outside_scope", f"{str(item)!r} is outside what this relay watches ({where}); "
                "subscribe to namespaces inside it")
    return result


def _ops(raw: str) -> frozenset[str]:
    items = {item.strip() for item in raw.split(",") if item.strip()}
    if not items:
        raise Refusal("invalid_ops", "ops is empty; give operation types, "
                      "comma-separated, e.g. insert,update")
    unknown = sorted(items - OPERATION_TYPES)
    if unknown:
        raise Refusal(
            "unknown_operation_type", f"unknown operation type {unknown[0]!r}; use any of "
            + ", ".join(sorted(OPERATION_TYPES)))
    return frozenset(items)


def _filter(raw: str) -> filters.Filter:
    try:
        return filters.parse_filter(raw)
    except filters.FilterError as exc:
        raise Refusal(exc.code, exc.message) from None
