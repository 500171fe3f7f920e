"""Every committed version of a collection's documents, so that a read can see one point in time.

A snapshot read (``readConcern: {level: "snapshot"}``) sees the data as of its ``atClusterTime``,
and every ``getMore`` of its cursor the same point in time (MongoDB: SERVER-47575 "Support
snapshot reads across getMores"), within the history the storage engine keeps
(``minSnapshotHistoryWindowInSeconds``, https://www.mongodb.com/docs/manual/reference/parameters/
#mongodb-parameter-param.minSnapshotHistoryWindowInSeconds). WiredTiger keeps old versions of
each record; this keeps, for each ``_id``, its versions in cluster-time order.
"""

from __future__ import annotations

import bisect

from bson import Timestamp


def _order(ts: Timestamp) -> tuple[int, int]:
    return (ts.time, ts.inc)


class Versions:
    """The committed versions of one collection's documents: (cluster time, document or None for
    deleted), per ``_id`` key, keys in the order they were first written."""

    def __init__(self) -> None:
        self._times: dict[bytes, list[tuple[int, int]]] = {}
        self._docs: dict[bytes, list[dict | None]] = {}

    def record(self, ts: Timestamp, key: bytes, doc: dict | None) -> None:
        """A write committed at ``ts`` (never earlier than one recorded before for this key)."""
        self._times.setdefault(key, []).append(_order(ts))
        self._docs.setdefault(key, []).append(doc)

    def as_of(self, ts: Timestamp) -> list[dict]:
        """The documents as they were once every write at or before ``ts`` had committed."""
        at = _order(ts)
        found = []
        for key, times in self._times.items():
            index = bisect.bisect_right(times, at)
            if index:
                doc = self._docs[key][index - 1]
                if doc is not None:
                    found.append(doc)
        return found

    def prune(self, floor: Timestamp) -> None:
        """Forget what no read at or after ``floor`` can see: the versions a later one at or
        before ``floor`` replaced, and documents deleted by then."""
        at = _order(floor)
        for key in list(self._times):
            times = self._times[key]
            index = bisect.bisect_right(times, at)
            if index == len(times) and self._docs[key][-1] is None:
                del self._times[key], self._docs[key]
            elif index > 1:
                del times[:index - 1], self._docs[key][:index - 1]
