"""Live queries: a collection's matching documents at one point in time, then every change after.

MongoDB can do this exactly (issue 15): a snapshot read (``readConcern: {level: "snapshot"}``,
MongoDB 5.0+) at one cluster time, and a change stream that starts right after that time. Each
live query, in order:

1. at the handshake: a slot in a fair pool of reads (``SNAPSHOT_READS`` at once, at most
   ``SNAPSHOT_READS_PER_PEER`` for one client address or token subject, round-robin across peers
   as catch-ups are: a reconnect storm of snapshot clients opens a handful of reads, not one per
   client), a PyMongo snapshot session and a count of what the find will read, under the
   session's snapshot. More than ``SNAPSHOT_LIMIT`` when the find filter is the whole
   subscription: refused, 400 ``snapshot_too_large``;
2. once connected: the find, in batches, in the same session (so at the same cluster time), each
   document judged by the whole subscription (``snapshot.Plan.admits``) and sent as
   ``{"type": "doc", "ns", "doc"}`` in relaxed Extended JSON, written as the client reads them
   (a backlog, like a replay: the next batch is read once the last one is on the socket). Past the
   limit after all (a filter the find could not express): an ``error`` ``snapshot_too_large``
   and the end of the connection;
3. ``{"type": "ready", "resume_after": <id>, "snapshot": N}``, the id being the position just
   past the read's cluster time (``snapshot.after``); then the client joins exactly as a client
   resuming from that id does: from the replay buffer, or a shared catch-up from MongoDB's
   history, then live. So every change after the read arrives once, in order, and none the
   snapshot already holds.

The session's cluster time is read from PyMongo's private ``_snapshot_time`` (set from the first
reply's ``atClusterTime``; ``tests/test_livequery.py`` pins it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bson import Timestamp
from logzero import logger
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import PyMongoError

from . import events as ev
from .admission import Refusal
from .fairpool import FairPool
from .frames import ws_frame
from .relaxed import relaxed_json
from .snapshot import Plan, after

if TYPE_CHECKING:
    from .clients import Client

READ_BATCH = 500  # documents per getMore: what one client's backlog holds at a time, at most
TOO_LARGE = ("the live query matches more than SNAPSHOT_LIMIT ({limit}) documents; narrow its "
             "filter")


class Doc:
    """``{"type": "doc", "ns": "<db>.<coll>", "doc": {…}}``: one document of a snapshot, sent
    where an event would be (it has the shape the clients' backlogs write), but with no id: a
    snapshot is not a place to resume from."""

    __slots__ = ("data", "frame", "sse")

    def __init__(self, ns: str, doc: dict[str, Any]):
        self.data = relaxed_json({"type": "doc", "ns": ns, "doc": doc})
        self.frame = ws_frame(self.data)
        self.sse = b"event: doc\ndata: " + self.data + b"\n\n"

    @property
    def deflated(self) -> bytes:
        return self.frame  # like control messages: uncompressed (RFC 7692 lets each choose)


@dataclass
class Opened:
    """A live query between its handshake and its read: the plan, the session holding the
    snapshot, and the pool slot it holds until ``close``."""

    plan: Plan
    session: AsyncClientSession
    release: Callable[[], None]

    async def close(self) -> None:
        with contextlib.suppress(PyMongoError):
            await self.session.end_session()
        self.release()


class LiveQueries:
    """The snapshot reads of live queries; ``attach`` joins a client after an id (``Relay``)."""

    def __init__(self, mongo: Callable[[], AsyncMongoClient[Any]], reads: int, per_peer: int,
                 limit: int, mark: Callable[[], str | None],
                 attach: Callable[[Client, str], None]):
        self._mongo = mongo
        self.pool = FairPool(reads, per_peer)
        self.limit = limit
        self._mark = mark
        self._attach = attach
        self.reads = 0  # snapshot sessions started, for /status and tests

    async def open(self, plan: Plan, accounts: Sequence[Hashable]) -> Opened:
        """Take a slot, start the snapshot session and make sure the snapshot is within the
        limit: a Refusal if it is not, or the relay cannot place a snapshot yet."""
        if self._mark() is None:
            raise Refusal("snapshot_unavailable", "the relay has not opened its change stream "
                          "yet, so it cannot place a snapshot; retry in a moment")
        await self.pool.acquire(accounts)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pool.release(accounts)

        try:
            session = self._mongo().start_session(snapshot=True)
        except BaseException:
            release()
            raise
        opened = Opened(plan, session, release)
        try:
            self.reads += 1
            if await self._over_limit(opened):
                raise Refusal("snapshot_too_large", TOO_LARGE.format(limit=self.limit))
        except BaseException:
            await opened.close()
            raise
        return opened

    async def _over_limit(self, opened: Opened) -> bool:
        """Count what the find reads (the session's first read: it fixes the snapshot); only
        when that is over the limit and the find filter is not the whole subscription, count
        what the subscription admits of it, up to the limit."""
        plan, session = opened.plan, opened.session
        collection = self._mongo()[plan.db][plan.coll]
        pipeline: list[dict[str, Any]] = [{"$match": plan.query}] if plan.query else []
        pipeline += [{"$limit": self.limit + 1}, {"$count": "n"}]
        rows = await (await collection.aggregate(pipeline, session=session)).to_list()
        if not rows or rows[0]["n"] <= self.limit:
            return False
        if plan.exact:
            return True
        admitted = 0
        async with collection.find(plan.query, plan.projection, session=session,
                                   batch_size=READ_BATCH) as cursor:
            async for doc in cursor:
                admitted += plan.admits(doc)
                if admitted > self.limit:
                    return True
        return False

    async def serve(self, opened: Opened, client: Client) -> None:
        """Send the snapshot, then ``ready``, then join the client after the read's time."""
        plan = opened.plan
        try:
            at, sent = await self._send_documents(opened, client)
        except PyMongoError as exc:
            logger.warning("live query on %s for %s failed: %s", plan.ns, client.peer, exc)
            client.fail()  # the client reconnects, and snapshots afresh
            return
        finally:
            await opened.close()
        if client.closed:
            return
        mark = self._mark()
        assert mark is not None  # checked at open(); a hub never forgets its mark
        seam = after(at, mark)
        client.send_control(ev.control("ready", resume_after=seam, snapshot=sent))
        self._attach(client, seam)

    async def _send_documents(self, opened: Opened, client: Client) -> tuple[Timestamp, int]:
        """Every document the subscription admits, written as fast as the client reads."""
        plan, session = opened.plan, opened.session
        collection = self._mongo()[plan.db][plan.coll]
        sent = 0
        batch: list[Doc] = []
        async with collection.find(plan.query, plan.projection, session=session,
                                   batch_size=READ_BATCH) as cursor:
            async for doc in cursor:
                if client.closed:
                    break
                if not plan.admits(doc):
                    continue
                sent += 1
                batch.append(Doc(plan.ns, doc))
                if len(batch) >= READ_BATCH:
                    client.replay(batch)  # type: ignore[arg-type]
                    batch = []
                    await client.drained()
        if batch:
            client.replay(batch)  # type: ignore[arg-type]
        at = session._snapshot_time
        assert isinstance(at, Timestamp), "PyMongo keeps a snapshot session's time here"
        return at, sent
