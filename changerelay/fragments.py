"""Events MongoDB split into fragments, put back together.

With ``$changeStreamSplitLargeEvent`` (MongoDB 7.0, 6.0.9) a change event over 16 MB comes as
fragments, one after another: each holds some of the event's top-level fields, ``splitEvent:
{fragment: n, of: total}`` and a resume token of its own
(pipeline/change_stream_split_event_helpers.cpp). Clients are sent whole events, which filters and
row rules need too: every fragment's fields, and the last fragment's ``_id`` — a stream resumed
from it continues with the next event (the stage's manual page), and it sorts after the event's
own token and before the next event's. MongoDB's order of the fields is not kept: the fragments
hold them by size.
"""

from __future__ import annotations

from typing import Any

SPLIT_EVENT = "splitEvent"


class OutOfOrder(ValueError):
    """Fragments came out of order: whoever reads the stream reopens from its last whole event.
    A class of its own, so that a ValueError from a bug is not taken for it and retried."""


class Reassembly:
    """The fragments of one event read so far, on one change stream."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[dict[str, Any]] = []

    @property
    def pending(self) -> bool:
        """Fragments are waiting for the rest: a resume token now would be a fragment's."""
        return bool(self._parts)

    def add(self, change: dict[str, Any]) -> dict[str, Any] | None:
        """The event ``change`` completes (``change`` itself when it is whole), or None while
        fragments are missing. ``OutOfOrder`` when they come out of order, which one stream never
        does: whoever reads it should reopen from its last whole event."""
        split = change.get(SPLIT_EVENT)
        if split is None:
            if self._parts:
                self._parts = []
                raise OutOfOrder("an event arrived between the fragments of another")
            return change
        number, total = split.get("fragment"), split.get("of")
        if number != len(self._parts) + 1:
            self._parts = []
            raise OutOfOrder(f"fragment {number} of {total} arrived out of order")
        self._parts.append(change)
        if number < total:
            return None
        whole: dict[str, Any] = {"_id": change["_id"]}
        for part in self._parts:
            whole.update((name, value) for name, value in part.items()
                         if name not in ("_id", SPLIT_EVENT))
        self._parts = []
        return whole
