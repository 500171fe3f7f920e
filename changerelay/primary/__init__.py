"""A MongoDB replica-set primary for tests, speaking the real wire protocol.

No ``mongod`` can run where these tests run, so the end-to-end tests point the real PyMongo driver,
over TCP, at this: a `mockupdb`_ server whose every request is answered the way a MongoDB 7.0
replica-set primary documents it. Writes append change events to an oplog-like log; change streams
are cursors over that log; ``getMore`` blocks up to ``maxTimeMS`` like an ``awaitData`` cursor.

Faithful where the relay can observe it: event shapes, resume tokens (KeyString and type bits, so
their ``_data`` order is event order), high-water marks that move only with the oplog and the
periodic no-op that moves an idle one, first batches holding writes that raced the open,
transactions and batched deletes (several events in one oplog entry), events over 16 MB and
``$changeStreamSplitLargeEvent``, invalidate rules, ``resumeAfter``/``startAfter``/
``startAtOperationTime``, ``find`` and plain ``aggregate`` cursors in batches with ``getMore``,
snapshot reads (``readConcern: {level: "snapshot"}``, ``atClusterTime`` in the reply, every batch
at that one point in time, ``SnapshotTooOld`` beyond the history kept), the error codes and
messages MongoDB returns. Deliberately simple
elsewhere: one node, no real indexes, a small query language. Anything unimplemented answers with an
error that says so rather than pretending.

mockupdb handles each connection on its own thread, but runs every handler under one global lock.
A ``getMore`` that blocked there would stall the very insert that should wake it, so each request
is handled with that lock released and :class:`TestPrimary` guards its own state instead.

Not implemented (each answers with an error saying so, never silently): what no relay test uses
(findAndModify, distinct, count, aggregation stages beyond per-document ones, ``$sort``,
``$skip``, ``$limit`` and ``$count``),
``showExpandedEvents``, pipeline-style updates, arrayFilters and positional updates, update
operators other than $set/$setOnInsert/$unset/$push ($each only), $project sub-objects,
stages other than $match/$project/$unset/$set/$addFields/$replaceRoot/$replaceWith in a change
stream, most query operators beyond equality/comparison/$in/$exists/$and/$or/$nor/$expr, and
expression operators other than the ones in ``OPERATORS``.
Not modelled: secondaries and elections, the streaming (awaitable) hello — heartbeats poll, so a
runtime switch of ``replica_set`` reaches a ``replicaSet=`` client only at its next heartbeat —,
index enforcement beyond ``_id``, the drop of a ``dropTarget`` rename's target, a transaction's
isolation from other sessions (its writes apply at once; its events wait for the commit).
Authentication needs the user in ``users`` (SCRAM verifies the password both ways).

Use::

    with TestPrimary() as primary, MongoClient(primary.uri) as client:
        client.db.c.insert_one({"_id": 1})
        assert primary.events[-1]["operationType"] == "insert"

.. _mockupdb: https://mockupdb.readthedocs.io/
"""

from changerelay.primary.errors import CommandError
from changerelay.primary.server import TestPrimary
from changerelay.primary.stages import compile_stage

__all__ = ["CommandError", "TestPrimary", "compile_stage"]
