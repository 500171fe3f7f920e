"""Which subscriptions an event may concern, found by looking its values up instead of asking
every subscription.

A per-user feed gives every client a subscription of its own (``{"fullDocument.owner": "<me>"}``
in its filter or its token's row rule); asking each of them about each event makes the relay's
work per event grow with its users. Here each subscription is filed under one *cover*: a few
probes, at least one of which every event it could be sent anything for must hit —

* ``OnPath(path, values)``: an equality or ``$in`` conjunct; an event hits it when a value the
  path reaches in the event equals one of ``values`` by MongoDB's ``$eq`` (``filters.
  equality_key``: numbers of every type by value, null with missing, arrays by element and as a
  whole, documents field by field in order);
* ``InNamespaces`` and ``OfType``: the subscription's ``ns`` and ``ops``.

An event then costs one walk per distinct indexed path, one hash look-up per value reached, and
its candidates, whose own ``select`` still decides (the index only narrows, it never decides).
Subscriptions without a cover are *residual* and are asked about every event, as before.

Row rules send a ``leave`` when the document matched before the change, whatever the client's
filter says (``rows.py``), so a rule's conditions on ``fullDocument`` are also probed on
``fullDocumentBeforeChange``. A live query (issue 15) is one more member with a cover of its own:
``OnPath("documentKey._id", <the ids it holds>)`` beside its filter's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from bson.regex import Regex

from .filters import LOGICAL_OPERATORS, composite, equality_key, reached
from .namespaces import Namespace
from .rows import DOCUMENT, PRE_IMAGE

if TYPE_CHECKING:
    from .events import Event
    from .subscription import Subscription

M = TypeVar("M", bound=Hashable)


class OnPath(NamedTuple):
    path: str
    values: tuple[Any, ...]  # operands, compared by filters.equality_key


class InNamespaces(NamedTuple):
    namespaces: frozenset[Namespace]


class OfType(NamedTuple):
    ops: frozenset[str]


Probe = OnPath | InNamespaces | OfType
Cover = tuple[Probe, ...]  # an event a member could be sent anything for hits one of these


def covers(subscription: Subscription) -> list[Cover]:
    """Every cover ``subscription`` could be filed under; ``Index.add`` takes the cheapest."""
    found: list[Cover] = []
    # A live query is sent a leave for a change that takes a document out of its filter: it is
    # filed by its namespace and row rule, never by its filter's conditions.
    own = [] if subscription.filter is None or subscription.live else _spec_covers(
        subscription.filter.spec)
    rule = subscription.access
    if rule is None:
        found += own
    else:
        for cover in _spec_covers(rule.spec):
            # The rule held before the change (a leave, which no filter withholds), or holds
            # after it and then the filter decides, on the event as sent (an entered event has
            # no pre-image): the filter's own conditions first, the narrower on ties.
            before = tuple(_as_before(probe) for probe in cover)
            found += [filtered + before for filtered in own
                      if not any(_reads_pre_image(probe) for probe in filtered)]
            found.append(cover + before)
    if subscription.namespaces is not None:
        found.append((InNamespaces(subscription.namespaces),))
    if subscription.ops is not None:
        found.append((OfType(subscription.ops),))
    return found


def _spec_covers(spec: dict[str, Any]) -> list[Cover]:
    """Covers of a normalised filter (``Filter.spec``): one per equality or ``$in`` conjunct,
    those of its ``$and`` branches, and of an ``$or`` whose every branch has one."""
    found: list[Cover] = []
    for key, condition in spec.items():
        if key == "$and":
            for branch in condition:
                found += _spec_covers(branch)
        elif key == "$or":
            branches = [_spec_covers(branch) for branch in condition]
            if all(branches):
                found.append(tuple(probe for options in branches
                                   for probe in min(options, key=_width)))
        elif key not in LOGICAL_OPERATORS:
            probe = _conjunct(key, condition)
            if probe is not None:
                found.append((probe,))
    return found


def _conjunct(path: str, condition: dict[str, Any]) -> OnPath | None:
    if "$eq" in condition:
        return OnPath(path, (condition["$eq"],))
    if "$in" in condition:
        values = condition["$in"]
        # A regex in $in is a pattern to search with, not a value to be equal to.
        if not any(isinstance(value, Regex) for value in values):
            return OnPath(path, tuple(values))
    return None


def _width(cover: Cover) -> int:
    return sum(len(probe.values) if isinstance(probe, OnPath) else 1 for probe in cover)


def _as_before(probe: Probe) -> Probe:
    """The probe as a row rule reads the document before the change (``rows._verdict``: the
    pre-image in place of ``fullDocument``, every other part as it is)."""
    if isinstance(probe, OnPath) and probe.path.split(".", 1)[0] == DOCUMENT:
        return OnPath(PRE_IMAGE + probe.path[len(DOCUMENT):], probe.values)
    return probe


def _reads_pre_image(probe: Probe) -> bool:
    return isinstance(probe, OnPath) and probe.path.split(".", 1)[0] == PRE_IMAGE


class Reached(NamedTuple):
    """The equality keys of what an event holds on one indexed path."""

    path: str
    keys: list[Hashable] | None  # of its scalar values (None: too costly to walk)
    nested: list[Hashable]  # of its documents and arrays, only while a member is filed by one


class Keys(NamedTuple):
    """An event's values on an index's paths, walked once (``Index.keys``) and shared: the
    hub's log files the event by them at publish (``postings.py``) and its flush routes by
    them. ``version`` is the index's when they were taken: another means paths came or went."""

    version: int
    paths: tuple[Reached, ...]


class _PathTable(Generic[M]):
    """Members by the keys of the values they are filed under, for one path."""

    __slots__ = ("composite", "members", "parts")

    def __init__(self, path: str):
        self.parts = tuple(path.split("."))
        self.members: dict[Hashable, set[M]] = {}
        self.composite = 0  # keys of documents and arrays: only then are such values keyed


class Index(Generic[M]):
    """Members (the hub's groups, or subscriptions) filed under their cheapest cover."""

    def __init__(self) -> None:
        self._paths: dict[str, _PathTable[M]] = {}
        self._namespaces: dict[Namespace, set[M]] = {}
        self._databases: dict[str, set[M]] = {}  # members with any namespace in the database
        self._ops: dict[str, set[M]] = {}
        self.residual: set[M] = set()
        self._filed: dict[M, Cover] = {}
        # Bumped whenever what ``keys`` walks changes: a path comes or goes, or its documents
        # and arrays start or stop being keyed. Keys taken at another version are taken again.
        self.version = 0

    def __len__(self) -> int:
        return len(self._filed) + len(self.residual)

    def add(self, member: M, options: Sequence[Cover]) -> None:
        """File ``member`` under the cover of ``options`` whose buckets hold the fewest members
        now (so that subscriptions sharing a condition spread over the ones they differ in);
        residual without options."""
        if not options:
            self.residual.add(member)
            return
        cover = min(options, key=self._cost)
        self._filed[member] = cover
        for probe in cover:
            if isinstance(probe, OnPath):
                self._open(probe)
            for bucket, key in self._buckets(probe):
                bucket.setdefault(key, set()).add(member)

    def discard(self, member: M) -> None:
        self.residual.discard(member)
        cover = self._filed.pop(member, None)
        for probe in cover or ():
            for bucket, key in self._buckets(probe):
                members = bucket.get(key)
                if members is not None:
                    members.discard(member)
                    if not members:
                        del bucket[key]
            if isinstance(probe, OnPath):
                self._forget(probe)

    def keys(self, event: Event) -> Keys:
        """What ``event`` holds on the paths members are filed under (one walk of each)."""
        change = event.change
        found = []
        for path, table in self._paths.items():
            values = reached(change, table.parts)
            if values is None:
                found.append(Reached(path, None, []))
                continue
            keys = []
            nested = []
            for value in values:
                if type(value) in (dict, list):
                    if table.composite:
                        nested.append(equality_key(value))
                else:
                    keys.append(equality_key(value))
            found.append(Reached(path, keys, nested))
        return Keys(self.version, tuple(found))

    def route(self, batch: list[Event], keyed: Sequence[Keys] | None = None
              ) -> dict[M, list[Event]]:
        """The members ``batch`` may concern, each with those of its events, in order: the
        residual ones with all of them. ``keyed``: each event's ``keys``, if taken already."""
        found: dict[M, list[Event]] = {}
        if self._filed:  # residual members alone: nothing to look up
            version = self.version
            for position, event in enumerate(batch):
                keys = None if keyed is None else keyed[position]
                if keys is None or keys.version != version:
                    keys = self.keys(event)
                for members in self._hits(event, keys):
                    for member in members:
                        events = found.get(member)
                        if events is None:
                            found[member] = [event]
                        elif events[-1] is not event:  # hit twice: two values, or two probes
                            events.append(event)
        for member in self.residual:
            found[member] = batch
        return found

    def _hits(self, event: Event, keys: Keys) -> Iterable[set[M]]:
        tables = self._paths
        for path, scalars, nested in keys.paths:
            members = tables[path].members
            if scalars is None:  # too costly to walk: its members decide for themselves
                yield from members.values()
                continue
            for key in scalars:
                found = members.get(key)
                if found:
                    yield found
            for key in nested:
                found = members.get(key)
                if found:
                    yield found
        if self._namespaces:
            yield from self._namespace_hits(*event.ns)
        if self._ops:
            found = self._ops.get(event.op)
            if found:
                yield found

    def _namespace_hits(self, db: str | None, coll: str | None) -> Iterable[set[M]]:
        # As subscription._namespace_test decides: an invalidate concerns every namespace, a
        # dropDatabase every collection in its database.
        if db is None:
            yield from self._databases.values()
            return
        if coll is None:
            found = self._databases.get(db)
            if found:
                yield found
            return
        for namespace in (Namespace(db, coll), Namespace(db, None)):
            found = self._namespaces.get(namespace)
            if found:
                yield found

    def _cost(self, cover: Cover) -> tuple[int, int, int]:
        # Any condition on a document narrows more than a namespace, which narrows more than
        # an operation type; then the fewest members already in the buckets, the fewest keys.
        tier = max(0 if isinstance(probe, OnPath) else 1 if isinstance(probe, InNamespaces)
                   else 2 for probe in cover)
        crowd = sum(len(bucket.get(key, ())) for probe in cover
                    for bucket, key in self._buckets(probe))
        return tier, crowd, _width(cover)

    def _buckets(self, probe: Probe) -> list[tuple[dict[Any, set[M]], Hashable]]:
        """Where ``probe``'s members are filed (a look-up: a path not indexed has none)."""
        if isinstance(probe, OnPath):
            table = self._paths.get(probe.path)
            if table is None:
                return []
            return [(table.members, equality_key(value)) for value in probe.values]
        if isinstance(probe, InNamespaces):
            return [(bucket, key) for namespace in probe.namespaces
                    for bucket, key in ((self._namespaces, namespace),
                                        (self._databases, namespace.db))]
        return [(self._ops, op) for op in probe.ops]

    def _open(self, probe: OnPath) -> None:
        """Index ``probe``'s path, and its documents and arrays when it has such values."""
        table = self._paths.get(probe.path)
        if table is None:
            table = self._paths[probe.path] = _PathTable(probe.path)
            self.version += 1
        nested = sum(map(composite, probe.values))
        if nested:
            if not table.composite:
                self.version += 1
            table.composite += nested

    def _forget(self, probe: OnPath) -> None:
        table = self._paths.get(probe.path)
        if table is None:
            return
        table.composite -= sum(map(composite, probe.values))
        if not table.members:
            del self._paths[probe.path]
            self.version += 1
        elif not table.composite and any(map(composite, probe.values)):
            self.version += 1


class Shared:
    """Subscriptions that several clients may hold (clients from a relay ahead, a catch-up's
    riders), each filed once and forgotten when its last holder lets go."""

    def __init__(self) -> None:
        self.index: Index[Subscription] = Index()
        self._holders: Counter[Subscription] = Counter()

    def hold(self, subscription: Subscription) -> None:
        if not self._holders[subscription]:
            self.index.add(subscription, covers(subscription))
        self._holders[subscription] += 1

    def release(self, subscription: Subscription) -> None:
        self._holders[subscription] -= 1
        if not self._holders[subscription]:
            del self._holders[subscription]
            self.index.discard(subscription)
