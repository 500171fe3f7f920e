"""What a live query reads first: a subscription turned into one collection's ``find``.

``/socket?snapshot=1&ns=db.coll[&filter=…]`` asks for the documents that match now, then every
change after them. The read is a ``find`` the relay builds itself — nothing a client wrote is
passed to MongoDB as is (the threat model: filters are evaluated by the relay, ``filters.py``):

* only the *indexable* conditions of the subscription on the document itself go into the find
  filter — equality, ``$in``, ranges and ``$exists`` on ``fullDocument.<path>`` (and
  ``documentKey._id``), on plain values, under the top level or ``$and``; everything else
  (``$or``, ``$nor``, ``$ne``, ``$nin``, ``$not``, regexes, documents and arrays as values) is
  left out, which only widens the read;
* every document read is then judged by the whole subscription — the client's filter and the
  token's row rule, with the same compiled matchers as live events — as the insert of it would
  be (:meth:`Plan.admits`); so what a snapshot holds is exactly what live matching would send.

Conditions that say nothing about a document (``operationType``, ``updateDescription``, the
pre-image, a rename's ``to``), an ``ops`` list, more or fewer than one collection, or an
operator ``PIPELINE`` (whose stages are not applied to documents read) cannot be answered by a
snapshot: the handshake is refused (400 ``snapshot_unsupported``), naming what to drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from bson import Timestamp
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId

from .admission import Refusal
from .filters import LOGICAL_OPERATORS
from .rows import DELIVER
from .subscription import Subscription
from .tokens import TIMESTAMP_TYPE, high_water_mark

DEFAULT_LIMIT = 10_000  # SNAPSHOT_LIMIT: documents one snapshot may hold
DOCUMENT = "fullDocument"
KEY = "documentKey"
# Event fields a document read has an equivalent of: the document, its key, its namespace.
ABOUT_DOCUMENTS = frozenset({DOCUMENT, KEY, "ns"})
# Operators that select a subset MongoDB and the relay's matcher agree on for plain values.
INDEXABLE = frozenset({"$eq", "$in", "$gt", "$gte", "$lt", "$lte", "$exists"})
PLAIN = (str, int, float, bool, Int64, Decimal, Decimal128, ObjectId, datetime, type(None))


def _unsupported(what: str) -> Refusal:
    return Refusal("snapshot_unsupported", f"snapshot=1 cannot answer {what}; a snapshot holds "
                   "the current documents of one collection: subscribe with ns=<db>.<collection> "
                   "and a filter on fullDocument fields only, or drop snapshot=1")


@dataclass(frozen=True)
class Plan:
    """One live query's read: the collection, the find filter and projection the relay built,
    and the subscription that judges every document read."""

    db: str
    coll: str
    query: dict[str, Any]
    projection: dict[str, int] | None
    subscription: Subscription
    exact: bool  # the query is the whole subscription: MongoDB's count is the snapshot's size

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}"

    def as_insert(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The change event an insert of ``doc`` would be: what the matchers judge."""
        return {"operationType": "insert", "fullDocument": doc,
                "ns": {"db": self.db, "coll": self.coll}, "documentKey": {"_id": doc.get("_id")}}

    def admits(self, doc: dict[str, Any]) -> bool:
        """Whether ``doc`` belongs in the snapshot: the client's filter and the row rule would
        deliver its insert."""
        change = self.as_insert(doc)
        access = self.subscription.access
        if access is not None and access.decide(change) != DELIVER:
            return False
        client = self.subscription.filter
        return client is None or client.predicate(change)


def plan(subscription: Subscription, *, pipeline: bool = False, redact: Iterable[str] = (),
         full_document: str = "updateLookup") -> Plan:
    """The read for ``subscription`` with ``snapshot=1``, or a Refusal naming what a snapshot
    cannot answer. ``pipeline``: an operator PIPELINE is configured; ``redact``: REDACT's
    ``fullDocument.<path>`` list, left out of the read as it is removed from events;
    ``full_document``: FULL_DOCUMENT, without which an update carries no document for a filter
    on it to decide whether the document stays in the query."""
    if pipeline:
        raise _unsupported("a relay with a PIPELINE (its stages filter or reshape events, and are "
                           "not applied to documents read)")
    namespaces = subscription.namespaces
    if namespaces is None or len(namespaces) != 1:
        raise _unsupported("a subscription without exactly one namespace")
    (db, coll), = namespaces
    if coll is None:
        raise _unsupported(f"the whole database {db!r}")
    if subscription.ops is not None:
        raise _unsupported("ops (operation types are about changes, not documents)")
    if subscription.grant is not None and not _granted(subscription.grant, db, coll):
        raise _unsupported(f"{db}.{coll}, outside the token's namespaces")
    specs = []
    if subscription.filter is not None:
        _check_about_documents(subscription.filter.spec)
        if full_document == "default" and _reads(subscription.filter.spec, DOCUMENT):
            raise _unsupported("a filter on fullDocument with FULL_DOCUMENT=default (updates "
                               "carry no document to decide on; the relay needs updateLookup, "
                               "whenAvailable or required)")
        specs.append(subscription.filter.spec)
    if subscription.access is not None:
        specs.append(subscription.access.spec)
    conditions: list[dict[str, Any]] = []
    exact = True
    for spec in specs:
        found, complete = _indexable(spec)
        conditions += found
        exact = exact and complete
    query: dict[str, Any] = {}
    if len(conditions) == 1:
        query = conditions[0]
    elif conditions:
        query = {"$and": conditions}
    fields = [path.split(".", 1)[1] for path in redact if path.startswith(DOCUMENT + ".")]
    projection = {field: 0 for field in fields} or None
    return Plan(db, coll, query, projection, subscription, exact)


def _granted(grant: frozenset[Any], db: str, coll: str) -> bool:
    return any(g_db == db and g_coll in (None, coll) for g_db, g_coll in grant)


def _reads(spec: dict[str, Any], part: str) -> bool:
    """Whether a normalised filter reads ``part`` of an event."""
    return any(any(_reads(branch, part) for branch in value) if key in LOGICAL_OPERATORS
               else key.split(".", 1)[0] == part for key, value in spec.items())


def _check_about_documents(spec: dict[str, Any]) -> None:
    """Refuse a client filter that reads an event field a document has no equivalent of."""
    for key, value in spec.items():
        if key in LOGICAL_OPERATORS:
            for branch in value:
                _check_about_documents(branch)
        elif key.split(".", 1)[0] not in ABOUT_DOCUMENTS:
            raise _unsupported(f"a filter on {key!r}")


def _indexable(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The conditions of a normalised filter that MongoDB can select by, as find conditions on
    the document's own paths (each one holds for every document the whole filter matches), and
    whether they are all of it."""
    found: list[dict[str, Any]] = []
    complete = True
    for key, value in spec.items():
        if key == "$and":
            for branch in value:
                more, whole = _indexable(branch)
                found += more
                complete = complete and whole
            continue
        path = None if key in LOGICAL_OPERATORS else _document_path(key)
        if path is None:
            complete = False  # $or, $nor, the namespace: left to the relay's matcher
            continue
        kept = {op: operand for op, operand in value.items()
                if op in INDEXABLE and _plain(op, operand)}
        complete = complete and len(kept) == len(value)
        if kept:
            found.append({path: kept})
    return found, complete


def _document_path(key: str) -> str | None:
    """``fullDocument.a.b`` → ``a.b``; ``documentKey._id[.x]`` → ``_id[.x]``; else None."""
    head, _, rest = key.partition(".")
    if head == DOCUMENT and rest:
        return rest
    if head == KEY and (rest == "_id" or rest.startswith("_id.")):
        return rest
    return None


def _plain(op: str, operand: Any) -> bool:
    """A scalar operand (a list of them for ``$in``): never a document or an array, whose
    matching differs in ways not worth the risk (and a document could look like an operator)."""
    if op == "$in":
        return isinstance(operand, list) and all(isinstance(item, PLAIN) for item in operand)
    return isinstance(operand, PLAIN)


def after(at: Timestamp, mark: str) -> str:
    """The id of the position just past every write at cluster time ``at``: the high-water mark
    one tick later (LogicalTime::addTicks), spelled like ``mark``, a high-water mark of the same
    deployment (``tokens.high_water_mark``; the hub learns one from the stream).

    A snapshot read at ``at`` holds every write committed at or before it; a change stream
    resumed from this id returns exactly the writes after, since a high-water mark sorts before
    every event of its own cluster time and after every event of an earlier one.
    """
    time, inc = at.time, at.inc + 1
    if inc > 0xFFFFFFFF:
        time, inc = time + 1, 0
    return high_water_mark(f"{TIMESTAMP_TYPE}{time:08X}{inc:08X}", like=mark)
