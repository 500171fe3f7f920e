"""The replay buffer's events by the values they hold, so that a resuming client is replayed
from the events its subscription may concern rather than asking it about every buffered event.

A per-user client resuming over a full buffer (10,000 events) asks its filter 10,000 times,
10-13 ms of CPU, and a reconnect storm of 10,000 such clients costs minutes. The hub's index
(``index.py``) files groups under paths; here the log keeps, for each of those paths, its events
by the equality keys (``filters.equality_key``) of the values they reach there. A replay takes a
cover of the client's subscription (``index.covers``) whose every probe is an equality or
``$in`` on a posted path, and hands ``select`` the events that hit it; ``select`` still decides.

A path is posted from the first event published after it came into the index, so a replay from
before then scans the log as before; so does a cover on namespaces or operation types, or with a
document or an array among its values (their events are not filed: nor does the index file them
unless a member asks).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from typing import TYPE_CHECKING

from .filters import composite, equality_key
from .index import Keys, OnPath, covers

if TYPE_CHECKING:
    from .events import Event
    from .subscription import Subscription


def _key(event: Event) -> str:
    return event.key


class _Posted:
    """One path's events, each list in the log's order."""

    __slots__ = ("after", "by_value", "unwalked")

    def __init__(self, after: str | None):
        self.after = after  # every event published after this key is posted (None: every one)
        self.by_value: dict[Hashable, list[Event]] = {}
        self.unwalked: list[Event] = []  # too costly to walk: every replay on the path gets them

    def post(self, event: Event, keys: list[Hashable] | None) -> None:
        """File ``event`` under ``keys``, those of the values it reaches here (``index.Keys``)."""
        if keys is None:
            self.unwalked.append(event)
            return
        by_value = self.by_value
        for key in keys if len(keys) < 2 else dict.fromkeys(keys):
            events = by_value.get(key)
            if events is None:
                by_value[key] = [event]
            else:
                events.append(event)

    def forget_before(self, first: str) -> None:
        for value, events in tuple(self.by_value.items()):
            kept = events[bisect.bisect_left(events, first, key=_key):]
            if kept:
                self.by_value[value] = kept
            else:
                del self.by_value[value]
        self.unwalked = self.unwalked[bisect.bisect_left(self.unwalked, first, key=_key):]


class Postings:
    """The log's events by the values they hold on the index's paths."""

    def __init__(self) -> None:
        self._paths: dict[str, _Posted] = {}
        self._version: int | None = None  # the index's, when its paths were last taken

    def post(self, event: Event, keys: Keys, previous: str | None) -> None:
        """File ``event`` (the log's newest; ``previous`` the key of the one before it) under
        ``keys``, the values it holds on the index's paths now."""
        if keys.version != self._version:  # paths came or went: post what the index walks
            self._version = keys.version
            walked = {reach.path for reach in keys.paths}
            posted = self._paths
            for path in tuple(posted):
                if path not in walked:
                    del posted[path]
            for path in walked:
                if path not in posted:
                    posted[path] = _Posted(previous)
        tables = self._paths
        for reach in keys.paths:
            tables[reach.path].post(event, reach.keys)

    def forget_before(self, first: str) -> None:
        """The log now starts at the event keyed ``first``."""
        for table in self._paths.values():
            table.forget_before(first)

    def candidates(self, subscription: Subscription, after: str) -> list[Event] | None:
        """The events after the key ``after`` that ``subscription`` may be sent anything for,
        in order; None when no cover of it can be looked up here."""
        best: list[list[Event]] | None = None
        for cover in covers(subscription):
            lists = self._lists(cover, after)
            if lists is not None and (best is None or _size(lists) < _size(best)):
                best = lists
        if best is None:
            return None
        found: dict[int, Event] = {}
        for events in best:
            for event in events[bisect.bisect_right(events, after, key=_key):]:
                found[id(event)] = event
        return sorted(found.values(), key=_key)

    def _lists(self, cover: tuple[object, ...], after: str) -> list[list[Event]] | None:
        lists: list[list[Event]] = []
        for probe in cover:
            if not isinstance(probe, OnPath) or any(map(composite, probe.values)):
                return None
            table = self._paths.get(probe.path)
            if table is None or (table.after is not None and after < table.after):
                return None
            lists += [table.by_value.get(equality_key(value), []) for value in probe.values]
            lists.append(table.unwalked)
        return lists


def _size(lists: list[list[Event]]) -> int:
    return sum(map(len, lists))
