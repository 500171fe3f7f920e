"""The test primary: a replica-set primary on the wire, with an oplog of change events."""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import hmac
import itertools
import os
import socket
import threading
import time
import traceback
import uuid as uuidlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import ObjectId, Timestamp
from bson.binary import Binary
from bson.int64 import Int64
from mockupdb import MockupDB

from changerelay.primary.errors import (
    HISTORY_LOST_MSG,
    NON_RESUMABLE,
    CommandError,
    not_implemented,
)
from changerelay.primary.history import Versions
from changerelay.primary.queries import matches
from changerelay.primary.reads import (
    DEFAULT_FIRST_BATCH,
    MAX_BATCH_BYTES,
    ReadCursor,
    batch_size,
    run_find,
    run_pipeline,
    take_batch,
)
from changerelay.primary.stages import CHANGE_STREAM_STAGES, Stage, check_stage, compile_stage
from changerelay.primary.tokens import (
    EVENT_TOKEN,
    TokenData,
    high_water_mark,
    parse_token,
)
from changerelay.primary.updates import Diff, UpdateResult, apply_update, set_value
from changerelay.primary.values import MISSING, doc_key, shown

MAX_WIRE_VERSION = 21  # MongoDB 7.0
SERVER_VERSION = "7.0.0"
# bson/bsonobj.h: BSONObjMaxInternalSize, the largest document mongod builds (16 MB + 16 KB); a
# change event beyond it fails with BSONObjectTooLarge (10334) when the stream serialises it.
MAX_INTERNAL_BSON = 16 * 1024 * 1024 + 16 * 1024
# pipeline/document_source_change_stream_split_large_event.h kBSONObjMaxChangeEventSize
MAX_CHANGE_EVENT_BYTES = MAX_INTERNAL_BSON - 8 * 1024
SPLIT_STAGE = "$changeStreamSplitLargeEvent"
# exec/batched_delete_stage.idl batchedDeletesTargetBatchDocs (the jstests' docsPerBatchDefault)
BATCHED_DELETE_DOCS = 100
# https://www.mongodb.com/docs/manual/reference/parameters/#mongodb-parameter-param.periodicNoopIntervalSecs
NOOP_INTERVAL_SECONDS = 10.0
# https://www.mongodb.com/docs/manual/reference/parameters/
# #mongodb-parameter-param.minSnapshotHistoryWindowInSeconds (default 300)
SNAPSHOT_WINDOW_SECONDS = 300
READ_CONCERN_LEVELS = ("local", "majority", "linearizable", "available", "snapshot")
DEFAULT_AWAIT_MS = 1000  # what mongod waits on an awaitData getMore that sends no maxTimeMS
INTERNAL_DBS = ("admin", "config", "local")
OP_MSG_MORE_TO_COME = 2



# Stored documents and logged events are never changed in place: every write builds new dicts
# (apply_update works on a deep copy), so documents, events and images may share structure,
# and replies may include them without copying.

@dataclass
class Collection:
    uuid: Binary
    docs: dict[bytes, dict] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    indexes: list = field(default_factory=lambda: [{"v": 2, "key": {"_id": 1}, "name": "_id_"}])
    versions: Versions = field(default_factory=Versions)  # what snapshot reads see

    @property
    def images(self) -> bool:
        return bool(self.options.get("changeStreamPreAndPostImages", {}).get("enabled"))


@dataclass
class Entry:
    """One oplog-ish entry: a change event plus what the server knows beside it."""

    token: str  # the event's _data: entries are kept in this order
    data: TokenData
    event: dict
    db: str
    coll: str | None
    invalidates: tuple | None = None  # ("coll", db, coll) or ("db", db) for invalidate entries
    pre: dict | None = None
    post: dict | None = None


@dataclass
class ChangeStreamCursor:
    id: int
    ns: str  # what the reply's cursor.ns says, and what getMore must name
    db: str
    coll: str | None  # None for database- and cluster-wide streams
    cluster: bool
    stages: list[Stage]
    full_document: str
    before_change: str
    position: str  # resume-token order: entries strictly after this are still to come
    pbrt: dict  # the postBatchResumeToken to report
    pbrt_time: Timestamp  # its cluster time
    resume: TokenData | None = None  # the event token to find first (resumeAfter/startAfter)
    split: bool = False  # the pipeline ends with $changeStreamSplitLargeEvent
    fragments: deque = field(default_factory=deque)  # (event, size, time) not yet returned
    killed: bool = False

    def in_scope(self, entry: Entry) -> bool:
        if entry.invalidates is not None:
            kind = entry.invalidates
            if self.cluster:
                return False
            if self.coll is None:
                return kind == ("db", self.db)
            return kind in (("db", self.db), ("coll", self.db, self.coll))
        if self.cluster:
            return entry.db not in INTERNAL_DBS
        if entry.db != self.db:
            return False
        if self.coll is None or entry.coll is None:
            return True
        return entry.coll == self.coll


@dataclass
class Change:
    """A write's change, waiting for the oplog entry it will share with others, if any."""

    op: str
    db: str
    coll: str | None
    extra: dict
    coll_uuid: Binary | None
    event_id: dict
    invalidates: tuple | None
    pre: dict | None
    post: dict | None
    version: tuple[Versions, bytes, dict | None] | None = None  # the document as written


@dataclass
class Transaction:
    number: int
    lsid: dict
    snapshot: tuple  # (collections, databases) as they were: what an abort restores
    changes: list[Change] = field(default_factory=list)


@dataclass
class OpenGate:
    """See :meth:`TestPrimary.hold_next_open`."""

    primary: TestPrimary
    reached: bool = False  # the open picked its start time and waits
    released: bool = False

    def wait_reached(self, timeout: float = 10) -> None:
        self.primary.wait_for(lambda: self.reached, timeout)

    def release(self) -> None:
        with self.primary._cond:
            self.released = True
            self.primary._cond.notify_all()


def _utcnow() -> datetime.datetime:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def _ts_max(a: Timestamp, b: Timestamp) -> Timestamp:
    return a if (a.time, a.inc) >= (b.time, b.inc) else b


def _ts_lt(a: Timestamp, b: Timestamp) -> bool:
    return (a.time, a.inc) < (b.time, b.inc)


def _ts_str(ts: Timestamp) -> str:
    """bson/timestamp.cpp Timestamp::toString."""
    return f"Timestamp({ts.time}, {ts.inc})"


class _Clock:
    """Cluster times for every primary in this process: wall-clock seconds, then a counter.

    Shared so that a primary started where another one stopped (MongoDB "coming back without its
    old oplog") begins after every time the old one handed out, and its oplog visibly no longer
    holds the old resume points.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last = Timestamp(0, 0)

    def peek(self) -> Timestamp:
        with self._lock:
            return self._following()

    def tick(self, floor: Timestamp | None = None) -> Timestamp:
        """A new time, after every one handed out so far and not before ``floor``."""
        with self._lock:
            self._last = _ts_max(self._following(), floor or self._last)
            return self._last

    def _following(self) -> Timestamp:
        now = Timestamp(int(time.time()), 1)
        return _ts_max(now, Timestamp(self._last.time, self._last.inc + 1))


_CLOCK = _Clock()



class TestPrimary:
    """A single-node replica-set primary (or standalone) on 127.0.0.1, for tests.

    Thread-safe: mockupdb serves each connection on its own thread, and tests call the fault
    injection methods from theirs. ``events`` is the ordered log of every change event, each as
    MongoDB would send it before any ``fullDocument`` lookup, invalidate events included.
    """

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, port: int | None = None, *, set_name: str = "rs0",
                 replica_set: bool = True, history_limit: int | None = None,
                 users: dict[str, str] | None = None,
                 noop_interval: float | None = NOOP_INTERVAL_SECONDS,
                 snapshot_window: float = SNAPSHOT_WINDOW_SECONDS):
        self.port = port or 0
        self.set_name = set_name
        self.replica_set = replica_set
        self.history_limit = history_limit
        self.users = dict(users or {})
        self.noop_interval = noop_interval  # seconds an idle oplog waits for a no-op; None: never
        self.snapshot_window = snapshot_window  # minSnapshotHistoryWindowInSeconds
        self.auth_fails = False
        self.change_streams_opened = 0
        self.getmores_waiting = 0  # getMore commands parked right now, awaiting events
        self.commands: deque[dict] = deque(maxlen=10_000)  # the latest commands, as sent
        self.events: list[dict] = []
        self.handler_errors: list[str] = []

        self._cond = threading.Condition(threading.RLock())
        self._server: MockupDB | None = None
        self._stopped = True
        self._entries: list[Entry] = []
        self._tokens: list[str] = []
        self._colls: dict[tuple[str, str], Collection] = {}
        self._dbs: set[str] = set()  # a database stays open, even emptied, until dropDatabase
        self._cursors: dict[int, ChangeStreamCursor | ReadCursor] = {}
        self._cursor_ids = itertools.count(1_000_001)
        self._connections: dict[int, int] = {}
        self._connection_ids = itertools.count(1)
        self._faults: list[list] = []
        self._retry_replies: OrderedDict[tuple[bytes, int], dict] = OrderedDict()
        self._sasl: dict[int, dict] = {}
        self._transactions: dict[bytes, Transaction] = {}  # by session
        self._committed: OrderedDict[tuple[bytes, int], bool] = OrderedDict()
        self._group: list[Change] | None = None  # changes that will share one oplog entry
        self._open_gates: list[OpenGate] = []
        self._noop_writer: threading.Thread | None = None
        self._noops_stop = threading.Event()
        start = _CLOCK.tick()
        self._last_ts = start  # the newest oplog entry (at first, the startup no-op)
        self._last_write = time.monotonic()
        self._oldest_ts = start  # the oldest time still in the oplog
        self._lost_upto = ""  # the newest forgotten entry's token
        self._snapshot_floor = Timestamp(0, 0)  # snapshot reads before this are SnapshotTooOld

    # -- lifecycle --

    def start(self) -> TestPrimary:
        """Listen on 127.0.0.1 (a free port the first time if none was given); returns self.

        A stopped primary can be started again: it comes back on the same port with its data and
        history, but every cursor is gone, as after a real restart.
        """
        with self._cond:
            if not self._stopped:
                return self
            server = MockupDB(port=self.port, request_timeout=int(1e6))
            server._address = ("127.0.0.1", self.port)  # mockupdb binds "localhost" otherwise
            server.autoresponds(self._on_request)
            self.port = server.run()
            self._server = server
            self._stopped = False
            if self.noop_interval is not None:
                self._noops_stop.clear()
                self._noop_writer = threading.Thread(target=self._write_noops, daemon=True,
                                                     name=f"noop-writer-{self.port}")
                self._noop_writer.start()
        return self

    def _write_noops(self) -> None:
        """repl/noop_writer.cpp: while no other write moves the oplog, a primary writes a no-op
        every periodicNoopIntervalSecs, so that idle streams' high-water marks advance."""
        # It waits on an event of its own: on the condition, every write would wake it.
        delay = self.noop_interval
        while not self._noops_stop.wait(delay):
            with self._cond:
                idle = time.monotonic() - self._last_write
                if idle >= self.noop_interval:
                    self._last_ts = _CLOCK.tick()
                    self._last_write = time.monotonic()
                    self._cond.notify_all()
                    idle = 0
                delay = self.noop_interval - idle

    def stop(self) -> None:
        """Close the listener and every connection, as if mongod went away."""
        with self._cond:
            server, self._server = self._server, None
            self._stopped = True
            self._cursors.clear()
            self._cond.notify_all()
            writer, self._noop_writer = self._noop_writer, None
        if writer is not None:
            self._noops_stop.set()
            writer.join()
        if server is not None:
            # mockupdb's accept loop polls select() once a second; a connection wakes it now.
            server._stopped = True
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                pass
            server.stop()

    def __enter__(self) -> TestPrimary:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    def check(self) -> None:
        """Fail loudly if a request failed inside the stand-in itself.

        Such a request was answered with InternalError, which a driver or the relay may well
        retry past; a bug here must fail the test instead of being absorbed.
        """
        if self.handler_errors:
            raise AssertionError(f"the test primary failed {len(self.handler_errors)} request(s); "
                                 f"the first:\n{self.handler_errors[0]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        """The connection string; names the replica set only while this is one."""
        if self.replica_set:
            return f"mongodb://{self.address}/?replicaSet={self.set_name}"
        return f"mongodb://{self.address}/"

    # -- what tests inspect --

    def tokens(self) -> list[str]:
        """The ``_data`` of every event in ``events``, in order."""
        with self._cond:
            return [event["_id"]["_data"] for event in self.events]

    def documents(self, db: str, coll: str) -> list[dict]:
        """A copy of a collection's documents, in insertion order."""
        with self._cond:
            found = self._colls.get((db, coll))
            return copy.deepcopy(list(found.docs.values())) if found else []

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10) -> None:
        """Wait until ``predicate()`` (called under the lock) is true, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{predicate!r} still false after {timeout}s")
                self._cond.wait(min(remaining, 0.05))

    # -- fault injection --

    def hangup_next(self, command: str, count: int = 1) -> None:
        """Close the connection instead of answering the next ``count`` such commands."""
        with self._cond:
            self._faults.append([_fault_key(command), count, None])

    def fail_next(self, command: str, code: int, errmsg: str = "", *,
                  labels: tuple[str, ...] = (), count: int = 1) -> None:
        """Answer the next ``count`` such commands with ``{ok: 0, code, errorLabels}``."""
        errmsg = errmsg or f"Failing command {command} via TestPrimary.fail_next"
        with self._cond:
            self._faults.append([_fault_key(command), count, CommandError(code, errmsg, labels)])

    def forget_history(self, keep_last: int = 0) -> None:
        """Drop all but the newest ``keep_last`` events, as a small oplog rolling over would.

        Resuming from a point before what is kept then fails with 286 ChangeStreamHistoryLost, and
        so does the next ``getMore`` of any open stream that had not read past the dropped part.
        The snapshot history goes with it, as when ``minSnapshotHistoryWindowInSeconds`` passes:
        a snapshot read before the newest dropped entry's time fails with 239 SnapshotTooOld.
        """
        with self._cond:
            drop = max(0, len(self._entries) - keep_last)
            # An event and the invalidate it causes share one oplog entry: keep or drop both.
            while 0 < drop < len(self._entries) and self._entries[drop].invalidates is not None:
                drop += 1
            if not drop:
                return
            self._lost_upto = self._entries[drop - 1].token
            self._snapshot_floor = _ts_max(self._snapshot_floor,
                                           self._entries[drop - 1].data.cluster_time)
            for coll in self._colls.values():
                coll.versions.prune(self._snapshot_floor)
            del self._entries[:drop], self._tokens[:drop], self.events[:drop]
            if self._entries:
                self._oldest_ts = self._entries[0].event["clusterTime"]
            else:
                self._oldest_ts = self._next_ts()
            self._cond.notify_all()

    # -- request plumbing --

    def _on_request(self, request) -> bool:
        server = request.server
        with server._unlock():  # let other connections proceed while this one waits
            try:
                self._serve(request)
            except OSError:  # the client went away mid-reply
                with contextlib.suppress(OSError):
                    request._client.shutdown(socket.SHUT_RDWR)
            finally:
                with self._cond:
                    self._cond.notify_all()
        return True

    def _serve(self, request) -> None:
        doc = request.doc
        name = request.command_name or ""
        is_op_query = request.opcode != 2013
        with self._cond:
            self.commands.append(doc)
            fault = self._take_fault(name)
        if fault == "hangup":
            request.hangup()
            return
        try:
            if fault is not None:
                raise fault
            if is_op_query and name not in ("hello", "isMaster", "ismaster"):
                raise CommandError(352, f"Unsupported OP_QUERY command: {name}. The client driver "
                                        "may require an upgrade. For more details see "
                                        "https://dochub.mongodb.org/core/legacy-opcode-removal")
            reply = self._dispatch(name, doc, request)
        except CommandError as exc:
            reply = exc.reply()
        except Exception:
            self.handler_errors.append(traceback.format_exc())
            reply = CommandError(1, f"TestPrimary failed handling {name}: "
                                    f"{traceback.format_exc(limit=1)}").reply()
        if self.replica_set and name not in ("hello", "isMaster", "ismaster"):
            reply.update(self._cluster_time_fields())
        if request.flags and request.flags & OP_MSG_MORE_TO_COME and not is_op_query:
            return  # unacknowledged write: the client reads no reply
        request.replies(reply)

    def _take_fault(self, name: str):
        for fault in self._faults:
            if fault[0] == _fault_key(name) and fault[1] > 0:
                fault[1] -= 1
                if fault[1] == 0:
                    self._faults.remove(fault)
                return "hangup" if fault[2] is None else fault[2]
        return None

    def _cluster_time_fields(self) -> dict:
        with self._cond:
            last = self._last_ts
        signature = {"hash": Binary(b"\x00" * 20, 0), "keyId": Int64(0)}
        return {"$clusterTime": {"clusterTime": last, "signature": signature},
                "operationTime": last}

    def _dispatch(self, name: str, cmd: dict, request) -> dict:
        db = cmd.get("$db") or request.namespace or "admin"
        if name in ("hello", "isMaster", "ismaster"):
            return self._hello(cmd, request)
        handler = self._handlers.get(name)
        if handler is None:
            raise CommandError(59, f"no such command: '{name}'")
        if name == "getMore":
            return handler(db, cmd)  # takes the lock itself, to wait without holding it
        with self._cond:
            if "autocommit" in cmd and name not in ("commitTransaction", "abortTransaction"):
                return self._in_transaction(cmd, lambda: handler(db, cmd))
            retry_key = self._retry_key(name, cmd)
            if retry_key in self._retry_replies:
                return copy.deepcopy(self._retry_replies[retry_key])
            reply = handler(db, cmd)
            if retry_key is not None:
                self._retry_replies[retry_key] = copy.deepcopy(reply)
                if len(self._retry_replies) > 10_000:
                    self._retry_replies.popitem(last=False)
            return reply

    def _retry_key(self, name: str, cmd: dict) -> tuple[bytes, int] | None:
        """Retryable writes: a retry of a (session, txnNumber) gets the first reply, not a redo."""
        if name not in ("insert", "update", "delete") or "txnNumber" not in cmd \
                or "autocommit" in cmd:
            return None
        if not self.replica_set:
            raise CommandError(20, "Transaction numbers are only allowed on a replica set member "
                                   "or mongos")
        return (doc_key(cmd.get("lsid")), int(cmd["txnNumber"]))

    @functools.cached_property
    def _handlers(self) -> dict[str, Callable]:
        return {
            "ping": lambda db, cmd: {"ok": 1.0},
            "buildInfo": self._build_info, "buildinfo": self._build_info,
            "endSessions": lambda db, cmd: {"ok": 1.0},
            "killSessions": lambda db, cmd: {"ok": 1.0},
            "abortTransaction": self._abort_transaction,
            "commitTransaction": self._commit_transaction,
            "saslStart": self._sasl_start, "saslContinue": self._sasl_continue,
            "authenticate": self._authenticate,
            "insert": self._insert, "update": self._update, "delete": self._delete,
            "find": self._find, "aggregate": self._aggregate,
            "getMore": self._get_more, "killCursors": self._kill_cursors,
            "create": self._create, "collMod": self._coll_mod, "drop": self._drop,
            "dropDatabase": self._drop_database, "renameCollection": self._rename,
            "listCollections": self._list_collections, "listDatabases": self._list_databases,
            "listIndexes": self._list_indexes, "createIndexes": self._create_indexes,
        }

    # -- handshake and housekeeping --

    def _hello(self, cmd: dict, request) -> dict:
        with self._cond:
            conn = self._connections.setdefault(id(request._client), next(self._connection_ids))
            last = self._last_ts
        legacy = "hello" not in cmd
        reply: dict[str, Any] = {}
        if legacy and cmd.get("helloOk"):
            reply["helloOk"] = True
        reply["ismaster" if legacy else "isWritablePrimary"] = True
        if self.replica_set:
            wall = _utcnow()
            optime = {"ts": last, "t": Int64(1)}
            reply.update({
                "hosts": [self.address], "setName": self.set_name, "setVersion": 1,
                "secondary": False, "primary": self.address, "me": self.address,
                "electionId": ObjectId("7fffffff0000000000000001"),
                "lastWrite": {"opTime": optime, "lastWriteDate": wall,
                              "majorityOpTime": optime, "majorityWriteDate": wall},
            })
        reply.update({
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000, "localTime": _utcnow(),
            "logicalSessionTimeoutMinutes": 30, "connectionId": conn,
            "minWireVersion": 0, "maxWireVersion": MAX_WIRE_VERSION, "readOnly": False,
        })
        user = cmd.get("saslSupportedMechs")
        if isinstance(user, str) and user.partition(".")[2] in self.users:
            reply["saslSupportedMechs"] = ["SCRAM-SHA-1", "SCRAM-SHA-256"]
        reply["ok"] = 1.0
        if self.replica_set:
            reply.update(self._cluster_time_fields())
        return reply

    def _build_info(self, db: str, cmd: dict) -> dict:
        return {"version": SERVER_VERSION, "gitVersion": "0" * 40,
                "versionArray": [int(p) for p in SERVER_VERSION.split(".")] + [0],
                "bits": 64, "maxBsonObjectSize": 16 * 1024 * 1024, "ok": 1.0}

    # -- transactions, as PyMongo runs them: the first statement has startTransaction, every one
    # autocommit: false with the session's lsid and txnNumber; then commitTransaction or
    # abortTransaction (https://www.mongodb.com/docs/manual/core/transactions/). Writes apply at
    # once and their changes wait for the commit, which logs them as one applyOps; an abort puts
    # the collections back. Not modelled: isolation from other sessions, write conflicts.

    def _check_transactions_allowed(self) -> None:
        if not self.replica_set:
            raise CommandError(20, "Transaction numbers are only allowed on a replica set member "
                                   "or mongos")

    def _in_transaction(self, cmd: dict, run: Callable[[], dict]) -> dict:
        self._check_transactions_allowed()
        session, number = doc_key(cmd.get("lsid")), int(cmd["txnNumber"])
        if cmd.get("startTransaction"):
            snapshot = ({key: dataclasses.replace(coll, docs=dict(coll.docs))
                         for key, coll in self._colls.items()}, set(self._dbs))
            self._transactions[session] = Transaction(number, cmd.get("lsid"), snapshot)
        transaction = self._transactions.get(session)
        if transaction is None or transaction.number != number:
            raise _no_such_transaction(number)
        self._group = transaction.changes
        try:
            return run()
        finally:
            self._group = None

    def _commit_transaction(self, db: str, cmd: dict) -> dict:
        self._check_transactions_allowed()
        session, number = doc_key(cmd.get("lsid")), int(cmd.get("txnNumber", -1))
        transaction = self._transactions.get(session)
        if transaction is None or transaction.number != number:
            if (session, number) in self._committed:
                return {"ok": 1.0}  # a retried commit
            raise _no_such_transaction(number)
        del self._transactions[session]
        if transaction.changes:
            self._log_changes(transaction.changes, transaction)
        self._committed[(session, number)] = True
        if len(self._committed) > 10_000:
            self._committed.popitem(last=False)
        return {"ok": 1.0}

    def _abort_transaction(self, db: str, cmd: dict) -> dict:
        self._check_transactions_allowed()
        session, number = doc_key(cmd.get("lsid")), int(cmd.get("txnNumber", -1))
        transaction = self._transactions.get(session)
        if transaction is None or transaction.number != number:
            raise _no_such_transaction(number)
        del self._transactions[session]
        self._colls, self._dbs = transaction.snapshot
        return {"ok": 1.0}

    # -- authentication (SCRAM-SHA-1 and SCRAM-SHA-256 against ``users``) --

    def _auth_failed(self) -> CommandError:
        return CommandError(18, "Authentication failed.")

    def _authenticate(self, db: str, cmd: dict) -> dict:
        raise self._auth_failed()

    def _sasl_start(self, db: str, cmd: dict) -> dict:
        mechanism = cmd.get("mechanism")
        if mechanism not in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            raise CommandError(2, f"Received authentication for mechanism {mechanism} which is "
                                  "not enabled")
        first = bytes(cmd.get("payload", b"")).decode()
        bare = first.split(",", 2)[2] if first.count(",") >= 2 else ""
        attrs = dict(part.split("=", 1) for part in bare.split(",") if "=" in part)
        user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        if self.auth_fails or user not in self.users or "r" not in attrs:
            raise self._auth_failed()
        salt = os.urandom(16)
        nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i=4096"
        conversation = len(self._sasl) + 1
        self._sasl[conversation] = {"mechanism": mechanism, "user": user, "salt": salt,
                                    "nonce": nonce, "auth": bare + "," + server_first}
        return {"conversationId": conversation, "done": False,
                "payload": Binary(server_first.encode()), "ok": 1.0}

    def _sasl_continue(self, db: str, cmd: dict) -> dict:
        state = self._sasl.pop(cmd.get("conversationId"), None)
        if state is None or self.auth_fails:
            raise self._auth_failed()
        final = bytes(cmd.get("payload", b"")).decode()
        without_proof, _, proof = final.rpartition(",p=")
        attrs = dict(part.split("=", 1) for part in without_proof.split(",") if "=" in part)
        if attrs.get("r") != state["nonce"]:
            raise self._auth_failed()
        sha1 = state["mechanism"] == "SCRAM-SHA-1"
        digest = "sha1" if sha1 else "sha256"
        password = self.users[state["user"]]
        if sha1:
            password = hashlib.md5(f"{state['user']}:mongo:{password}".encode()).hexdigest()
        salted = hashlib.pbkdf2_hmac(digest, password.encode(), state["salt"], 4096)
        client_key = hmac.digest(salted, b"Client Key", digest)
        auth_message = (state["auth"] + "," + without_proof).encode()
        signature = hmac.digest(hashlib.new(digest, client_key).digest(), auth_message, digest)
        expected = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        if not hmac.compare_digest(base64.b64encode(expected).decode(), proof):
            raise self._auth_failed()
        server_key = hmac.digest(salted, b"Server Key", digest)
        verifier = base64.b64encode(hmac.digest(server_key, auth_message, digest)).decode()
        return {"conversationId": cmd["conversationId"], "done": True,
                "payload": Binary(f"v={verifier}".encode()), "ok": 1.0}

    # -- the oplog --

    def _next_ts(self) -> Timestamp:
        """One tick past the newest oplog entry: where a stream opened now starts, and the time of
        the high-water mark it reports until the oplog moves. MongoDB:
        pipeline/document_source_change_stream.cpp getStartTimeForNewStream ("We always start
        one tick beyond the most recent operation"), made a high-water mark token by
        _buildPipeline's startAtOperationTime."""
        return Timestamp(self._last_ts.time, self._last_ts.inc + 1)

    def _append(self, op: str, db: str, coll: str | None, *, extra: dict | None = None,
                coll_uuid: Binary | None = None, event_id: dict | None = None,
                invalidates: tuple | None = None, pre: dict | None = None,
                post: dict | None = None,
                version: tuple[Versions, bytes, dict | None] | None = None) -> None:
        change = Change(op, db, coll, extra or {}, coll_uuid, event_id or {"operationType": op},
                        invalidates, pre, post, version)
        if self._group is not None:
            self._group.append(change)
        else:
            self._log_changes([change])

    def _log_changes(self, changes: list[Change], transaction: Transaction | None = None) -> None:
        """Write one oplog entry: a single change, or an applyOps (a transaction's commit, one
        batch of a multi-delete) whose changes share its cluster time and differ by txnOpIndex.

        Events of a transaction carry its txnNumber and lsid, before ``_id``; a batched delete's
        carry neither (pipeline/change_stream_event_transform.cpp, "The lsid and txnNumber may be
        missing if this is a batched write").
        """
        ts = _CLOCK.tick()
        self._last_ts, self._last_write = ts, time.monotonic()
        wall = _utcnow()
        for index, change in enumerate(changes):
            if change.version is not None:  # visible to snapshot reads from this time on
                versions, key, doc = change.version
                versions.record(ts, key, doc)
            data = TokenData(ts, txn_op_index=index, uuid=change.coll_uuid,
                             event_id=change.event_id)
            event: dict[str, Any] = {}
            if transaction is not None:
                event.update(txnNumber=Int64(transaction.number), lsid=transaction.lsid)
            token = data.encode()
            event.update({"_id": token, "operationType": change.op, "clusterTime": ts,
                          "wallTime": wall})
            extra = dict(change.extra)
            if "fullDocument" in extra:
                event["fullDocument"] = extra.pop("fullDocument")
            coll = change.coll
            event["ns"] = {"db": change.db, "coll": coll} if coll is not None else {"db": change.db}
            event.update(extra)
            self._log(Entry(token["_data"], data, event, change.db, coll, pre=change.pre,
                            post=change.post))
            if change.invalidates is not None:
                invalidate = dataclasses.replace(data, from_invalidate=True)
                inv_token = invalidate.encode()
                inv = {"_id": inv_token, "operationType": "invalidate", "clusterTime": ts,
                       "wallTime": wall}
                self._log(Entry(inv_token["_data"], invalidate, inv, change.db, coll,
                                invalidates=change.invalidates))

    def _log(self, entry: Entry) -> None:
        self._entries.append(entry)
        self._tokens.append(entry.token)
        self.events.append(entry.event)
        if self.history_limit is not None and len(self._entries) > self.history_limit:
            self.forget_history(self.history_limit)
        self._cond.notify_all()

    def _crud_event(self, op: str, db: str, name: str, coll: Collection, doc_id: Any,
                    extra: dict, pre: dict | None = None, post: dict | None = None) -> None:
        key = {"_id": doc_id}
        extra = {"documentKey": key, **extra}  # _append puts fullDocument first
        keep = coll.images
        self._append(op, db, name, extra=extra, coll_uuid=coll.uuid,
                     event_id={"operationType": op, "documentKey": key},
                     pre=pre if keep else None, post=post if keep else None,
                     version=(coll.versions, doc_key(doc_id), post))

    # -- collections --

    def _coll(self, db: str, name: str, create: bool = False) -> Collection | None:
        found = self._colls.get((db, name))
        if found is None and create:
            _check_ns(db, name)
            found = self._colls[(db, name)] = Collection(Binary.from_uuid(uuidlib.uuid4()))
            self._dbs.add(db)
        return found

    def _create(self, db: str, cmd: dict) -> dict:
        name = cmd["create"]
        options = {k: v for k, v in cmd.items()
                   if k in ("changeStreamPreAndPostImages", "capped", "size", "max")}
        existing = self._coll(db, name)
        if existing is not None:
            if existing.options != options:
                raise CommandError(48, f"Collection {db}.{name} already exists.")
            return {"ok": 1.0}
        self._coll(db, name, create=True).options = options
        return {"ok": 1.0}

    def _coll_mod(self, db: str, cmd: dict) -> dict:
        coll = self._coll(db, cmd["collMod"])
        if coll is None:
            raise CommandError(26, "ns does not exist")
        if "changeStreamPreAndPostImages" in cmd:
            coll.options["changeStreamPreAndPostImages"] = cmd["changeStreamPreAndPostImages"]
        return {"ok": 1.0}

    def _drop(self, db: str, cmd: dict) -> dict:
        name = cmd["drop"]
        coll = self._colls.pop((db, name), None)
        if coll is None:
            return {"ok": 1.0}  # MongoDB 7.0 no longer errors on a missing collection
        self._append("drop", db, name, coll_uuid=coll.uuid, invalidates=("coll", db, name))
        return {"ns": f"{db}.{name}", "nIndexesWas": len(coll.indexes), "ok": 1.0}

    def _drop_database(self, db: str, cmd: dict) -> dict:
        names = sorted(name for (d, name) in self._colls if d == db)
        for name in names:
            self._drop(db, {"drop": name})
        if db in self._dbs:
            self._dbs.discard(db)
            self._append("dropDatabase", db, None, invalidates=("db", db))
        return {"dropped": db, "ok": 1.0}

    def _rename(self, db: str, cmd: dict) -> dict:
        if db != "admin":
            raise CommandError(13, "renameCollection may only be run against the admin database.")
        source, target = cmd["renameCollection"], cmd.get("to")
        if not isinstance(target, str) or "." not in target or "." not in source:
            raise CommandError(73, f"Invalid target namespace: {target}")
        src_db, _, src = source.partition(".")
        dst_db, _, dst = target.partition(".")
        coll = self._coll(src_db, src)
        if coll is None:
            raise CommandError(26, f"Source collection {source} does not exist")
        if self._coll(dst_db, dst) is not None:
            if not cmd.get("dropTarget"):
                raise CommandError(48, "target namespace exists")
            del self._colls[(dst_db, dst)]
        _check_ns(dst_db, dst)
        del self._colls[(src_db, src)]
        self._colls[(dst_db, dst)] = coll
        self._dbs.add(dst_db)
        to = {"db": dst_db, "coll": dst}
        self._append("rename", src_db, src, extra={"to": to}, coll_uuid=coll.uuid,
                     event_id={"operationType": "rename", "operationDescription": {"to": to}},
                     invalidates=("coll", src_db, src))
        return {"ok": 1.0}

    def _list_collections(self, db: str, cmd: dict) -> dict:
        infos = []
        for (d, name), coll in sorted(self._colls.items()):
            if d != db:
                continue
            info = {"name": name, "type": "collection", "options": copy.deepcopy(coll.options),
                    "info": {"readOnly": False, "uuid": coll.uuid},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}
            if matches(info, cmd.get("filter") or {}):
                infos.append({"name": name, "type": "collection"} if cmd.get("nameOnly")
                             else info)
        return _cursor_reply(f"{db}.$cmd.listCollections", infos)

    def _list_databases(self, db: str, cmd: dict) -> dict:
        names = sorted({d for (d, _) in self._colls})
        dbs = [{"name": n, "sizeOnDisk": 8192, "empty": False} for n in names]
        dbs = [d for d in dbs if matches(d, cmd.get("filter") or {})]
        if cmd.get("nameOnly"):
            dbs = [{"name": d["name"]} for d in dbs]
        return {"databases": dbs, "totalSize": 8192 * len(dbs), "totalSizeMb": 0, "ok": 1.0}

    def _list_indexes(self, db: str, cmd: dict) -> dict:
        coll = self._coll(db, cmd["listIndexes"])
        if coll is None:
            raise CommandError(26, f"ns does not exist: {db}.{cmd['listIndexes']}")
        return _cursor_reply(f"{db}.{cmd['listIndexes']}", copy.deepcopy(coll.indexes))

    def _create_indexes(self, db: str, cmd: dict) -> dict:
        """Recorded for listIndexes but not enforced: unique indexes other than _id don't bite."""
        created = self._coll(db, cmd["createIndexes"]) is None
        coll = self._coll(db, cmd["createIndexes"], create=True)
        before = len(coll.indexes)
        for index in cmd.get("indexes", []):
            if all(index.get("name") != have["name"] for have in coll.indexes):
                coll.indexes.append({"v": 2, **index})
        return {"numIndexesBefore": before, "numIndexesAfter": len(coll.indexes),
                "createdCollectionAutomatically": created, "ok": 1.0}

    # -- CRUD --

    def _insert(self, db: str, cmd: dict) -> dict:
        name = cmd["insert"]
        ordered = cmd.get("ordered", True)
        n, errors = 0, []
        for index, raw in enumerate(cmd.get("documents", [])):
            doc = {"_id": raw["_id"] if "_id" in raw else ObjectId(),
                   **{k: v for k, v in raw.items() if k != "_id"}}
            coll = self._coll(db, name, create=True)
            key = doc_key(doc["_id"])
            if key in coll.docs:
                errors.append(_duplicate_key(index, db, name, doc["_id"]))
                if ordered:
                    break
                continue
            coll.docs[key] = doc
            self._crud_event("insert", db, name, coll, doc["_id"], {"fullDocument": doc}, post=doc)
            n += 1
        return _write_reply({"n": n}, errors)

    def _matching(self, coll: Collection | None, query: dict) -> list[dict]:
        if coll is None:
            return []
        return [doc for doc in coll.docs.values() if matches(doc, query)]

    def _update(self, db: str, cmd: dict) -> dict:
        name = cmd["update"]
        ordered = cmd.get("ordered", True)
        n = modified = 0
        upserted, errors = [], []
        for index, statement in enumerate(cmd.get("updates", [])):
            try:
                found, changed, new_id = self._update_one_statement(db, name, statement)
            except CommandError as exc:
                errors.append({"index": index, "code": exc.code, "errmsg": exc.errmsg})
                if ordered:
                    break
                continue
            n += found
            modified += changed
            if new_id is not MISSING:
                n += 1
                upserted.append({"index": index, "_id": new_id})
        reply: dict[str, Any] = {"n": n, "nModified": modified}
        if upserted:
            reply["upserted"] = upserted
        return _write_reply(reply, errors)

    def _update_one_statement(self, db: str, name: str, statement: dict) -> tuple[int, int, Any]:
        query, update = statement.get("q", {}), statement.get("u", {})
        multi, upsert = statement.get("multi", False), statement.get("upsert", False)
        if statement.get("arrayFilters"):
            raise not_implemented("arrayFilters")
        if multi and isinstance(update, dict) and update and \
                not any(k.startswith("$") for k in update):
            raise CommandError(9, "multi update is not supported for replacement-style update")
        coll = self._coll(db, name)
        targets = self._matching(coll, query)
        if not multi:
            targets = targets[:1]
        if not targets:
            if not upsert:
                return 0, 0, MISSING
            return 0, 0, self._upsert(db, name, query, update)
        changed = sum(self._apply(db, name, coll, old, update).changed for old in targets)
        return len(targets), changed, MISSING

    def _apply(self, db: str, name: str, coll: Collection, old: dict, update: Any) -> UpdateResult:
        """Update one stored document, logging a replace or update event if anything changed."""
        result = apply_update(old, update)
        if not result.changed:
            return result
        coll.docs[doc_key(old["_id"])] = result.doc
        if result.is_replacement:
            self._crud_event("replace", db, name, coll, old["_id"], {"fullDocument": result.doc},
                             pre=old, post=result.doc)
        else:
            self._crud_event("update", db, name, coll, old["_id"],
                             {"updateDescription": result.description()}, pre=old,
                             post=result.doc)
        return result

    def _upsert(self, db: str, name: str, query: dict, update: Any) -> Any:
        seed = {k: copy.deepcopy(v) for k, v in query.items()
                if not k.startswith("$") and not (isinstance(v, dict) and
                                                  any(op.startswith("$") for op in v))}
        base: dict = {}
        for path, value in seed.items():
            set_value(base, Diff("document"), path.split("."), value)
        result = apply_update(base, update, inserting=True)
        doc = result.doc
        if "_id" not in doc:
            doc["_id"] = ObjectId()
        doc = {"_id": doc.pop("_id"), **doc}
        coll = self._coll(db, name, create=True)
        if doc_key(doc["_id"]) in coll.docs:
            raise _duplicate_key_error(db, name, doc["_id"])
        coll.docs[doc_key(doc["_id"])] = doc
        self._crud_event("insert", db, name, coll, doc["_id"],
                         {"fullDocument": doc}, post=doc)
        return doc["_id"]

    def _delete(self, db: str, cmd: dict) -> dict:
        name = cmd["delete"]
        n = 0
        for statement in cmd.get("deletes", []):
            coll = self._coll(db, name)
            targets = self._matching(coll, statement.get("q", {}))
            if statement.get("limit", 0) == 1:
                n += self._delete_documents(db, name, coll, targets[:1])
            elif not self.replica_set or self._group is not None:  # in a transaction already
                n += self._delete_documents(db, name, coll, targets)
            else:
                # MongoDB 6.1+ deletes a multi-delete's documents in batches, each written as one
                # applyOps (exec/batched_delete_stage.cpp; jstests/noPassthrough/
                # batched_multi_deletes.js: "The deletion replicates as one applyOps per batch").
                for start in range(0, len(targets), BATCHED_DELETE_DOCS):
                    self._group = []
                    try:
                        n += self._delete_documents(db, name, coll,
                                                    targets[start:start + BATCHED_DELETE_DOCS])
                    finally:
                        changes, self._group = self._group, None
                    self._log_changes(changes)
        return _write_reply({"n": n}, [])

    def _delete_documents(self, db: str, name: str, coll: Collection, docs: list[dict]) -> int:
        for doc in docs:
            del coll.docs[doc_key(doc["_id"])]
            self._crud_event("delete", db, name, coll, doc["_id"], {}, pre=doc)
        return len(docs)

    def _find(self, db: str, cmd: dict) -> dict:
        name = cmd["find"]
        size = batch_size(cmd, cmd)
        at = self._read_point(cmd)
        docs = run_find(self._readable(db, name, at), cmd)
        cursor = ReadCursor(next(self._cursor_ids), f"{db}.{name}", deque(docs), at)
        # SERVER-83472 ("Empty find cursor does not include atClusterTime", unresolved): mongod
        # leaves atClusterTime out of a snapshot find's reply when it found nothing; aggregate
        # reports it always. Whoever needs the point in time of an empty read must aggregate.
        return self._open_read(cursor, size, single=bool(cmd.get("singleBatch")),
                               report_time=bool(docs))

    def _readable(self, db: str, name: str, at: Timestamp | None) -> list[dict]:
        """A collection's documents now, or as of a snapshot read's point in time."""
        coll = self._coll(db, name)
        if coll is None:
            return []
        return list(coll.docs.values()) if at is None else coll.versions.as_of(at)

    def _open_read(self, cursor: ReadCursor, size: int, *, single: bool = False,
                   report_time: bool = True) -> dict:
        """A read's first reply; the cursor stays open while documents remain (id 0 once none
        do, https://www.mongodb.com/docs/manual/reference/command/find/#output)."""
        first = take_batch(cursor.pending, size)
        alive = bool(cursor.pending) and not single
        if alive:
            self._cursors[cursor.id] = cursor
        reply: dict[str, Any] = {"firstBatch": first, "id": Int64(cursor.id if alive else 0),
                                 "ns": cursor.ns}
        if cursor.at_cluster_time is not None and report_time:
            # SERVER-47576/SERVER-47690: a snapshot read outside a transaction replies with the
            # timestamp it read at, in the cursor: {cursor: {..., atClusterTime: <Timestamp>}}
            reply["atClusterTime"] = cursor.at_cluster_time
        return {"cursor": reply, "ok": 1.0}

    def _read_point(self, cmd: dict) -> Timestamp | None:
        """The point in time a read sees: None (the current data) unless its read concern is
        "snapshot" (https://www.mongodb.com/docs/manual/reference/read-concern-snapshot/), then
        ``atClusterTime`` or, without one, the newest oplog time (a single node's majority
        commit point)."""
        concern = cmd.get("readConcern") or {}
        level = concern.get("level", "local")
        if level not in READ_CONCERN_LEVELS:
            raise CommandError(2, f"Enumeration value '{level}' for field 'readConcern.level' is "
                                  "not a valid value.")
        at = concern.get("atClusterTime")
        # repl/read_concern_args.cpp: atClusterTime only with snapshot, never with
        # afterClusterTime
        if at is not None and level != "snapshot":
            raise CommandError(72, "readConcern.atClusterTime is only valid for snapshot read "
                                   "concern")
        if at is not None and "afterClusterTime" in concern:
            raise CommandError(72, "Can not specify both afterClusterTime and atClusterTime "
                                   "fields in readConcern")
        if level != "snapshot" or "autocommit" in cmd:
            return None  # a transaction's snapshot: its isolation is not modelled
        if not self.replica_set:
            # read_concern_mongod.cpp: snapshot needs replication
            raise CommandError(20, "Cannot use non-local read concern until replica set is "
                                   "finished initializing.")
        if at is None:
            return self._last_ts
        if not isinstance(at, Timestamp):
            raise CommandError(14, "BSON field 'atClusterTime' is the wrong type, expected type "
                                   "'timestamp'")
        # db/read_concern_mongod.cpp waitForReadConcernImpl: not past the current cluster time
        if _ts_lt(self._last_ts, at):
            raise CommandError(72, f"readConcern atClusterTime value must not be greater than the "
                                   f"current clusterTime. Requested clusterTime: {_ts_str(at)}; "
                                   f"current clusterTime: {_ts_str(self._last_ts)}")
        self._check_snapshot(at)
        return at

    def _check_snapshot(self, at: Timestamp) -> None:
        """SnapshotTooOld (239) for a time the history no longer reaches: before what
        forget_history() dropped, or more than ``snapshot_window`` seconds behind the newest
        time (storage/wiredtiger/wiredtiger_kv_engine.cpp setOldestTimestampFromStable: the
        oldest timestamp lags the stable one by minSnapshotHistoryWindowInSeconds; the error
        and its message: wiredtiger_begin_transaction_block.cpp)."""
        window = Timestamp(max(0, self._last_ts.time - int(self.snapshot_window)), 0)
        if _ts_lt(at, _ts_max(self._snapshot_floor, window)):
            raise CommandError(239, f"Read timestamp {_ts_str(at)} is older than the oldest "
                                    "available timestamp.")

    # -- aggregate and change streams --

    def _aggregate(self, db: str, cmd: dict) -> dict:
        pipeline = cmd.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        stages = [check_stage(stage) for stage in pipeline]
        names = [name for name, _ in stages]
        if "$changeStream" in names[1:]:
            raise CommandError(40602, "$changeStream is only valid as the first stage in a "
                                      "pipeline.")
        if names and names[0] == "$changeStream":
            return self._open_change_stream(db, cmd, stages)
        target = cmd.get("aggregate")
        if not isinstance(target, str):
            raise not_implemented("collectionless aggregations other than $changeStream")
        if "cursor" not in cmd:
            # pipeline/aggregation_request_helper.cpp
            raise CommandError(9, "The 'cursor' option is required, except for aggregate with "
                                  "the explain argument")
        size = batch_size(cmd, cmd["cursor"])
        at = self._read_point(cmd)
        docs = run_pipeline(self._readable(db, target, at), stages)
        return self._open_read(ReadCursor(next(self._cursor_ids), f"{db}.{target}", deque(docs),
                                          at), size)

    def _open_change_stream(self, db: str, cmd: dict, stages: list) -> dict:
        if not self.replica_set:
            raise CommandError(40573, "The $changeStream stage is only supported on replica sets")
        spec = stages[0][1]
        if not isinstance(spec, dict):
            raise CommandError(14, "BSON field '$changeStream' is the wrong type, expected type "
                                   "'object'")
        target = cmd.get("aggregate")
        cluster = bool(spec.get("allChangesForCluster"))
        if cluster and (db != "admin" or target != 1):
            ns = f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate"
            raise CommandError(72, "A $changeStream with 'allChangesForCluster:true' may only be "
                                   "opened on the 'admin' database, and with no collection name; "
                                   f"found {ns}")
        if (db == "admin" and not cluster) or db in ("local", "config"):
            raise CommandError(73, f"$changeStream may not be opened on the internal {db} "
                                   "database")
        if isinstance(target, str) and target.startswith("system."):
            raise CommandError(73, f"$changeStream may not be opened on the internal "
                                   f"{db}.{target} collection")
        if not isinstance(target, str) and target != 1:
            raise CommandError(2, "Invalid aggregate namespace: 'aggregate' must be a collection "
                                  "name or 1")
        unknown = set(spec) - {"allChangesForCluster", "fullDocument", "fullDocumentBeforeChange",
                               "resumeAfter", "startAfter", "startAtOperationTime",
                               "showExpandedEvents"}
        if unknown:
            raise CommandError(40415, f"BSON field '$changeStream.{sorted(unknown)[0]}' is an "
                                      "unknown field.")
        if spec.get("showExpandedEvents"):
            raise not_implemented("showExpandedEvents")
        full_document = _enum(spec, "fullDocument", "default",
                              ("default", "updateLookup", "whenAvailable", "required"))
        before_change = _enum(spec, "fullDocumentBeforeChange", "off",
                              ("off", "whenAvailable", "required"))
        for index, (name, stage_spec) in enumerate(stages[1:], start=2):
            if name not in CHANGE_STREAM_STAGES:
                raise CommandError(20, f"{name} is not permitted in a $changeStream pipeline")
            # pipeline/document_source_change_stream_split_large_event.cpp
            if name == SPLIT_STAGE and stage_spec != {}:
                raise CommandError(7182800, "$changeStreamSplitLargeEvent spec should be an empty "
                                            "object")
            if name == SPLIT_STAGE and index != len(stages):
                raise CommandError(7182802, "$changeStreamSplitLargeEvent must be the last stage "
                                            "in the pipeline")
        split = len(stages) > 1 and stages[-1][0] == SPLIT_STAGE
        compiled = [compile_stage(name, spec) for name, spec in stages[1:] if name != SPLIT_STAGE]
        if "resumeAfter" in spec and "startAfter" in spec:
            raise CommandError(50865, "Do not specify both 'resumeAfter' and 'startAfter' in a "
                                      "$changeStream stage")
        token_doc = spec.get("resumeAfter", spec.get("startAfter"))
        token = parse_token(token_doc) if token_doc is not None else None
        # startAtOperationTime is inclusive: "The starting point for the change stream ... changes
        # that occurred at or after the specified timestamp" (the manual, db.collection.watch();
        # the scan below keeps entries at start_ts, the high-water mark sorting before them).
        start_at = spec.get("startAtOperationTime")
        if token is not None and start_at is not None:
            raise CommandError(40674, "Only one type of resume option is allowed, but multiple "
                                      "were found")
        if token is not None and "resumeAfter" in spec and token.from_invalidate:
            raise CommandError(260, "Attempting to resume a change stream using 'resumeAfter' is "
                                    "not allowed from an invalidate notification")
        if start_at is not None and not isinstance(start_at, Timestamp):
            raise CommandError(14, "BSON field '$changeStream.startAtOperationTime' is the wrong "
                                   "type, expected type 'timestamp'")
        batch_size = cmd.get("cursor", {}).get("batchSize", DEFAULT_FIRST_BATCH)
        with self._cond:
            # Without a resume point a stream starts one tick past the newest oplog entry, and
            # its first postBatchResumeToken is a high-water mark there; with a token, the scan
            # starts at the token's cluster time and its first token is the one it resumes from.
            start_ts = token.cluster_time if token else start_at or self._next_ts()
            pbrt = token.encode() if token else high_water_mark(start_ts)
            resume = token if token and token.token_type == EVENT_TOKEN else None
            position = high_water_mark(start_ts)["_data"] if resume else pbrt["_data"]
            if _ts_lt(start_ts, self._oldest_ts):
                raise CommandError(286, HISTORY_LOST_MSG, NON_RESUMABLE)
            cursor = ChangeStreamCursor(
                id=next(self._cursor_ids),
                ns=f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate",
                db=db, coll=target if isinstance(target, str) else None, cluster=cluster,
                stages=compiled, full_document=full_document, before_change=before_change,
                position=position, pbrt=pbrt, pbrt_time=start_ts, resume=resume, split=split)
            if token is None and start_at is None and self._open_gates:
                self._hold(self._open_gates.pop(0))
            docs, alive = self._next_batch(cursor, batch_size)
            if alive:
                self._cursors[cursor.id] = cursor
            self.change_streams_opened += 1
        return {"cursor": {"firstBatch": docs, "postBatchResumeToken": cursor.pbrt,
                           "id": Int64(cursor.id if alive else 0), "ns": cursor.ns},
                "ok": 1.0}

    def hold_next_open(self) -> OpenGate:
        """Stop the next stream opened without a resume point between picking its start time and
        scanning the oplog, until the gate is released: writes committed meanwhile come back in
        its firstBatch, as on MongoDB when they commit while the stream opens."""
        gate = OpenGate(self)
        with self._cond:
            self._open_gates.append(gate)
        return gate

    def _hold(self, gate: OpenGate) -> None:
        gate.reached = True
        self._cond.notify_all()
        while not gate.released and not self._stopped:
            self._cond.wait(0.05)

    def _next_batch(self, cursor: ChangeStreamCursor, limit: int) -> tuple[list, bool]:
        """Up to ``limit`` events after the cursor's position, and whether the cursor stays open.

        Sets ``cursor.pbrt``: the last event returned, or - once the scan reached the end of the
        oplog - a high-water mark at the newest oplog time when that is past the last event
        returned, so it advances when the oplog moves (another stream's event, a no-op), and
        only then (jstests/change_streams/report_post_batch_resume_token.js).
        """
        if cursor.position < self._lost_upto:
            raise CommandError(286, HISTORY_LOST_MSG, NON_RESUMABLE)
        docs: list[dict] = []
        if limit <= 0:
            return docs, True
        batch_bytes = 0
        entries = self._entries[bisect.bisect_right(self._tokens, cursor.position):]
        for entry in itertools.chain([None], entries):
            if entry is not None:
                if not cursor.in_scope(entry):
                    continue
                skip = 0
                if cursor.resume is not None:  # the resume point itself must come first
                    status = _resume_status(entry.data, cursor.resume)
                    if status == "check next":
                        cursor.position = entry.token
                        continue
                    if status == "surpassed":
                        raise CommandError(280, "cannot resume stream; the resume token was not "
                                                f"found. {shown(entry.event['_id'])}",
                                           NON_RESUMABLE)
                    fragment, cursor.resume = cursor.resume.fragment, None
                    if fragment is None:
                        cursor.position = entry.token
                        continue
                    skip = fragment + 1  # the fragments the client already has
                rendered = self._render(cursor, entry, skip)
                if rendered and docs and batch_bytes + rendered[0][1] > MAX_BATCH_BYTES:
                    return docs, True  # this one starts the next batch
                cursor.position = entry.token
                cursor.fragments.extend((out, size, entry.data.cluster_time)
                                        for out, size in rendered)
            while cursor.fragments:
                size = cursor.fragments[0][1]
                if len(docs) >= limit or (docs and batch_bytes + size > MAX_BATCH_BYTES):
                    return docs, True
                out, size, cursor.pbrt_time = cursor.fragments.popleft()
                docs.append(out)
                batch_bytes += size
                cursor.pbrt = out["_id"]
            if entry is not None and entry.invalidates is not None:
                cursor.pbrt = entry.event["_id"]
                return docs, False
            if len(docs) >= limit:
                return docs, True
        if cursor.resume is None and _ts_lt(cursor.pbrt_time, self._last_ts):
            cursor.pbrt, cursor.pbrt_time = high_water_mark(self._last_ts), self._last_ts
        return docs, True

    def _render(self, cursor: ChangeStreamCursor, entry: Entry,
                skip: int = 0) -> list[tuple[dict, int]]:
        """The event as this stream returns it, with its BSON size: none when its pipeline
        filters it out, else one document or, past the size limit with
        $changeStreamSplitLargeEvent, its fragments."""
        doc = dict(entry.event)  # logged events are never mutated; stages copy what they change
        op = doc["operationType"]
        if op == "update" and cursor.full_document != "default":
            if cursor.full_document == "updateLookup":
                coll = self._coll(entry.db, entry.coll)
                found = coll.docs.get(doc_key(doc["documentKey"]["_id"])) if coll else None
                image = found
            else:
                image = entry.post
                if image is None and cursor.full_document == "required":
                    raise CommandError(47, "Change stream was configured to require a post-image "
                                           "for all update events, but the post-image was not "
                                           f"found for event: {_event_summary(doc)}")
            doc = _with_field_after(doc, "fullDocument", image, "wallTime")
        if op in ("update", "replace", "delete") and cursor.before_change != "off":
            image = entry.pre
            if image is None and cursor.before_change == "required":
                raise CommandError(47, "Change stream was configured to require a pre-image for "
                                       "all update, delete and replace events, but the pre-image "
                                       f"was not found for event: {_event_summary(doc)}")
            doc["fullDocumentBeforeChange"] = image
        original_id = doc["_id"]
        for stage in cursor.stages:
            doc = stage(doc)
            if doc is None:
                return []
        if doc.get("_id") != original_id:
            raise CommandError(280, "Encountered an event whose _id field, which contains the "
                                    "resume token, was modified by the pipeline. Modifying the "
                                    "_id field of an event makes it impossible to resume the "
                                    "stream from that point. Only transformations that retain "
                                    "the unmodified _id field are allowed.", NON_RESUMABLE)
        size = _size(doc)
        if cursor.split and size > MAX_CHANGE_EVENT_BYTES:
            return [(fragment, _size(fragment)) for fragment in _split_event(doc, entry.data, skip)]
        if size > MAX_INTERNAL_BSON:
            # bson/bsonobj.cpp BSONObj::_assertInvalid
            raise CommandError(10334, f"BSONObj size: {size} (0x{size:X}) is invalid. Size must "
                                      f"be between 0 and {MAX_INTERNAL_BSON}(16MB) First element: "
                                      f"_id: {shown(doc['_id'])}")
        return [(doc, size)]

    def _get_more(self, db: str, cmd: dict) -> dict:
        cursor_id = int(cmd["getMore"])
        coll = cmd.get("collection")
        batch_size = cmd.get("batchSize") or 1 << 31
        wait = cmd.get("maxTimeMS", DEFAULT_AWAIT_MS) / 1000
        deadline = time.monotonic() + wait
        with self._cond:
            cursor = self._cursors.get(cursor_id)
            if cursor is None:
                raise CommandError(43, f"cursor id {cursor_id} not found")
            if cursor.ns != f"{db}.{coll}":
                raise CommandError(13, f"Requested getMore on namespace '{db}.{coll}', but cursor "
                                       f"belongs to a different namespace {cursor.ns}")
            if isinstance(cursor, ReadCursor):
                return self._read_more(cursor, batch_size)
            while True:
                try:
                    docs, alive = self._next_batch(cursor, batch_size)
                except CommandError:
                    self._cursors.pop(cursor_id, None)
                    raise
                remaining = deadline - time.monotonic()
                if docs or not alive or remaining <= 0 or self._stopped or cursor.killed:
                    break
                self.getmores_waiting += 1
                self._cond.notify_all()
                try:
                    self._cond.wait(remaining)
                finally:
                    self.getmores_waiting -= 1
            if cursor.killed:
                raise CommandError(237, f"cursor id {cursor_id} was killed")
            if not alive:
                self._cursors.pop(cursor_id, None)
        return {"cursor": {"nextBatch": docs, "postBatchResumeToken": cursor.pbrt,
                           "id": Int64(cursor_id if alive else 0), "ns": cursor.ns},
                "ok": 1.0}

    def _read_more(self, cursor: ReadCursor, size: int) -> dict:
        """The next batch of a find or aggregate cursor. A snapshot cursor reads at its point in
        time while the history reaches it, then fails with SnapshotTooOld (SERVER-47575; the
        manual: "A read operation that lasts longer than minSnapshotHistoryWindowInSeconds may
        terminate")."""
        if cursor.at_cluster_time is not None:
            try:
                self._check_snapshot(cursor.at_cluster_time)
            except CommandError:
                self._cursors.pop(cursor.id, None)
                raise
        docs = take_batch(cursor.pending, size)
        if not cursor.pending:
            self._cursors.pop(cursor.id, None)
        return {"cursor": {"nextBatch": docs, "id": Int64(cursor.id if cursor.pending else 0),
                           "ns": cursor.ns}, "ok": 1.0}

    def _kill_cursors(self, db: str, cmd: dict) -> dict:
        killed, missing = [], []
        for cursor_id in cmd.get("cursors", []):
            cursor = self._cursors.pop(int(cursor_id), None)
            if cursor is None:
                missing.append(cursor_id)
            else:
                cursor.killed = True
                killed.append(cursor_id)
        return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [],
                "cursorsUnknown": [], "ok": 1.0}



def _fault_key(command: str) -> str:
    """Faults match command names case-insensitively, and hello matches legacy isMaster too."""
    key = command.lower()
    return "hello" if key == "ismaster" else key


def _check_ns(db: str, name: str) -> None:
    if not name or "$" in name or not db or any(c in db for c in "/\\. \"$"):
        raise CommandError(73, f"Invalid namespace specified '{db}.{name}'")


def _enum(spec: dict, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = spec.get(name, default)
    if value not in allowed:
        raise CommandError(2, f"Enumeration value '{value}' for field '$changeStream.{name}' is "
                              "not a valid value.")
    return value


def _with_field_after(doc: dict, name: str, value: Any, after: str) -> dict:
    out = {}
    for key, item in doc.items():
        out[key] = item
        if key == after:
            out[name] = value
    return out


def _event_summary(doc: dict) -> str:
    return repr({k: doc[k] for k in ("_id", "operationType", "ns", "documentKey") if k in doc})


def _cursor_reply(ns: str, docs: list[dict]) -> dict:
    return {"cursor": {"firstBatch": docs, "id": Int64(0), "ns": ns}, "ok": 1.0}


def _duplicate_key(index: int, db: str, name: str, doc_id: Any) -> dict:
    exc = _duplicate_key_error(db, name, doc_id)
    return {"index": index, "code": exc.code, "keyPattern": {"_id": 1},
            "keyValue": {"_id": doc_id}, "errmsg": exc.errmsg}


def _duplicate_key_error(db: str, name: str, doc_id: Any) -> CommandError:
    return CommandError(11000, f"E11000 duplicate key error collection: {db}.{name} index: _id_ "
                               f"dup key: {{ _id: {doc_id!r} }}")


def _write_reply(reply: dict, errors: list[dict]) -> dict:
    if errors:
        reply["writeErrors"] = errors
    reply["ok"] = 1.0
    return reply



def _no_such_transaction(number: int) -> CommandError:
    return CommandError(251, f"Given transaction number {number} does not match any in-progress "
                             "transactions. The active transaction number is -1",
                        ("TransientTransactionError",))


def _size(doc: dict) -> int:
    return len(bson.encode(doc))


def _resume_status(event: TokenData, client: TokenData) -> str:
    """Where an event stands against the token a replica-set stream resumes from: "found",
    "check next" or "surpassed" (pipeline/document_source_change_stream_check_resumability.cpp
    compareAgainstClientResumeToken; the event identifiers compare as values, so the client's
    decoded with the type bits it sent)."""
    if event.cluster_time != client.cluster_time:
        return "surpassed"
    if event.token_type != client.token_type:
        return "surpassed" if event.token_type > client.token_type else "check next"
    if event.txn_op_index < client.txn_op_index:
        return "check next"
    if event.txn_op_index > client.txn_op_index:
        raise CommandError(50792, "Invalid resumeToken: txnOpIndex was skipped")
    if event.from_invalidate != client.from_invalidate:
        return "surpassed" if event.from_invalidate else "check next"
    if event.uuid != client.uuid:
        return "surpassed"
    mine, theirs = event.event_key(), client.event_key()
    if mine == theirs:
        return "found"
    return "surpassed" if mine > theirs else "check next"


def _split_event(event: dict, data: TokenData, skip: int) -> list[dict]:
    """$changeStreamSplitLargeEvent (pipeline/change_stream_split_event_helpers.cpp
    splitChangeEvent): the fields but ``_id`` by (size, name), packed greedily into fragments
    of at most the limit less the token's size; each fragment has its own token (the event's
    with fragmentNum) and ``splitEvent: {fragment, of}``. The first ``skip`` are left out."""
    limit = MAX_CHANGE_EVENT_BYTES - _size(event["_id"])
    fields = sorted((_size({name: value}) - 5, name) for name, value in event.items()
                    if name != "_id")
    fragments: list[dict] = []
    index = 0
    while index < len(fields):
        token = dataclasses.replace(data, fragment=len(fragments)).encode()
        fragment = {"_id": token, "splitEvent": {"fragment": len(fragments) + 1, "of": 0}}
        size = _size(fragment)
        while True:
            field_size, name = fields[index]
            fragment[name] = event[name]
            size += field_size
            index += 1
            if index == len(fields) or size + fields[index][0] > limit:
                break
        if size > limit:
            raise CommandError(7182500, f"Splitting change event failed: fragment size {size} is "
                                        f"greater than maximum allowed fragment size {limit}")
        fragments.append(fragment)
    for fragment in fragments:
        fragment["splitEvent"]["of"] = len(fragments)
    if skip and skip >= len(fragments):
        raise CommandError(280, "Attempted to resume from a split event, but the resumed stream "
                                "produced a different split. Ensure that the pipeline used to "
                                "resume is the same as the original", NON_RESUMABLE)
    return fragments[skip:]
