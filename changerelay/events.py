"""A change event, encoded once.

Everything a client receives for one change is derived here exactly once per event, however many
clients receive it: the relaxed Extended JSON text (``relaxed.py``), the WebSocket frame that
carries it and the Server-Sent Events record (and, for permessage-deflate clients, one compressed
frame). The fan-out then only moves bytes.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .frames import deflate as _deflate
from .frames import ws_frame
from .relaxed import relaxed_json
from .tokens import token_id

_EPOCH = datetime(1970, 1, 1)
Change = dict[str, Any]  # a change event document, as MongoDB delivered it


class Event:
    """One change event as it leaves the relay.

    ``token`` is its id, the whole resume token as a client holds it (``tokens.py``); ``key`` is
    the token's ``_data``, whose string order is the order of a deployment's events, which is what
    lets the hub find a resume point with a binary search.
    """

    __slots__ = ("_committed", "_deflated", "_entered", "_header", "_leave", "_sse", "change",
                 "frame", "key", "ns", "op", "token")


    def __init__(self, change: Change, data: bytes, token: str, deflate: bool = False):
        self.change = change
        self.token = token
        self.key: str = change["_id"]["_data"]
        self.op = change.get("operationType", "")
        ns = change.get("ns") or {}
        self.ns: tuple[str | None, str | None] = (ns.get("db"), ns.get("coll"))
        self.frame = ws_frame(data)
        self._header = len(self.frame) - len(data)
        self._sse: bytes | None = None
        self._deflated = _deflated_frame(data) if deflate else None
        self._entered: Event | None = None
        self._leave: Leave | None = None
        self._committed: float | bool | None = False  # False: not read yet

    @property
    def data(self) -> bytes:
        """The JSON text; kept only inside the frame so that each event is held once."""
        return self.frame[self._header:]

    @property
    def sse(self) -> bytes:
        """The SSE record; built on first use, since most deployments have no SSE clients."""
        if self._sse is None:
            self._sse = b"id: " + self.token.encode() + b"\ndata: " + self.data + b"\n\n"
        return self._sse

    @property
    def deflated(self) -> bytes:
        """The frame compressed for permessage-deflate clients; one per event, on first use."""
        if self._deflated is None:
            self._deflated = _deflated_frame(self.data)
        return self._deflated

    @property
    def committed(self) -> float | None:
        """When MongoDB committed the change (its ``wallTime``, seconds since the epoch), for
        the delivery latency: read on first use, once."""
        if self._committed is False:
            self._committed = commit_time(self.change)
        return self._committed

    @property
    def entered(self) -> Event:
        """This event without its pre-image, for readers whose row rule did not cover the
        document before the change (see ``rows.py``); built on first use, once."""
        if self._entered is None:
            self._entered = encode_change(
                {k: v for k, v in self.change.items() if k != "fullDocumentBeforeChange"})
        return self._entered

    @property
    def leave(self) -> Leave:
        """The ``leave`` message sent in this event's place; built on first use, once."""
        if self._leave is None:
            self._leave = Leave(self)
        return self._leave

    @property
    def size(self) -> int:
        """Bytes held for this event: the frame, about as much for the decoded document, and
        the compressed frame if there is one. Fixed once the event is in the log (the replay
        buffer adds it and later subtracts it), so what is built on first use — the SSE
        record, the variants for row rules — is not counted."""
        return 2 * len(self.frame) + (len(self._deflated) if self._deflated else 0)

    def __repr__(self) -> str:
        return f"<Event {self.op} {self.ns} {self.token[:24]}…>"


class Leave:
    """``{"type": "leave", "ns": "<db>.<coll>", "documentKey": {...}}``: the document left the
    reader's rows with this event. It travels where the event would, in order, as the same
    bytes for every reader; its SSE record carries the event's id, so that EventSource resumes
    past it. Nothing of the document's new content is in it."""

    __slots__ = ("committed", "data", "frame", "sse", "token")

    def __init__(self, event: Event):
        # .get: an operator's PIPELINE may have removed either, and a flush must not raise.
        namespace = ".".join(part for part in event.ns if part)
        message = {"type": "leave", "ns": namespace,
                   "documentKey": event.change.get("documentKey")}
        self.data = relaxed_json(message)
        self.token = event.token
        self.committed = event.committed
        self.frame = ws_frame(self.data)
        self.sse = b"id: " + self.token.encode() + b"\nevent: leave\ndata: " + self.data + b"\n\n"

    @property
    def deflated(self) -> bytes:
        """Control messages go uncompressed to permessage-deflate clients too (RFC 7692 lets
        each message choose)."""
        return self.frame


# What a client is sent in an event's place: the event itself, or a ``leave`` (see ``rows.py``).
Delivery = Event | Leave


def encode_change(change: Change, deflate: bool = False) -> Event:
    """Encode a change event document as MongoDB delivered it (after the pipeline).

    With ``deflate`` (WS_COMPRESSION) the compressed frame is built now, so that the event's
    ``size`` — what the replay buffer counts — does not change once it is in the log.
    """
    return Event(change, relaxed_json(change), token_id(change["_id"]), deflate)


def commit_time(change: Change) -> float | None:
    """A change's ``wallTime`` in seconds since the epoch; None without one (MongoDB before
    6.0, or a PIPELINE that removed it)."""
    wall_time = change.get("wallTime")
    if not isinstance(wall_time, datetime):
        return None
    if wall_time.tzinfo is not None:  # a client with tz_aware=True
        return wall_time.timestamp()
    return (wall_time - _EPOCH).total_seconds()  # PyMongo decodes it as naive UTC


def _deflated_frame(data: bytes) -> bytes:
    return ws_frame(_deflate(data), compressed=True)


def control(type_: str, **fields: object) -> bytes:
    """A control message: a JSON object with ``type`` and no ``operationType``."""
    return json.dumps({"type": type_, **fields}, separators=(",", ":")).encode()
