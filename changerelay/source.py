"""The change stream: the one ``watch()`` loop that feeds the hub.

PyMongo already resumes once by itself on errors the change-stream spec calls resumable. This loop
handles everything else, so the relay never stops watching while the process runs:

* any other failure → reopen with ``resume_after`` the last token seen, after a capped exponential
  backoff, one log line per attempt;
* ``invalidate`` (collection dropped or renamed, database dropped) → reopen with ``start_after`` the
  invalidate token, which is the only way MongoDB lets a stream continue past one;
* 286 ChangeStreamHistoryLost (our resume point has left the oplog) → start from now and tell every
  client to resync, since the events in between are gone for good;
* a resume token MongoDB refuses (``bad_resume_token``) → start from now too: reopening with it
  would fail the same way every time;
* a standalone server (40573) or failed authentication → the readiness probe names the fix;
* 47 NoMatchingDocument under FULL_DOCUMENT(_BEFORE_CHANGE)=required → stop: the event has no
  image and never will, so reopening would fail on it forever; /readyz says how to recover;
* an event over 16 MB (10334 BSONObjectTooLarge, or 7182500 when even its split fails) → stop
  too, for the same reason, and /readyz names ``$changeStreamSplitLargeEvent``; with that stage
  in PIPELINE the fragments are put back together (``fragments.py``) before publishing.
In both cases connected clients are told in an ``error`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable, Mapping
from typing import Any

from bson import json_util
from logzero import logger
from pymongo import AsyncMongoClient
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
)

from . import events as ev
from .backoff import Backoff
from .config import Config
from .fragments import OutOfOrder, Reassembly
from .hub import Hub
from .pipeline import SPLIT_STAGE, Stage, change_stream_stages
from .tokens import token_id

ResumeToken = Mapping[str, Any]  # a change event's _id: {"_data": hex, ...}

# MongoDB's error codes: by name in src/mongo/base/error_codes.yml, or (five digits) the location
# code of the uassert that raises them, in the file named.
FAILED_TO_PARSE = 9
UNAUTHORIZED = 13
AUTH_FAILED = 18                # AuthenticationFailed
INVALID_BSON = 22
CURSOR_NOT_FOUND = 43
NO_MATCHING_DOCUMENT = 47
INVALID_RESUME_TOKEN = 260
HISTORY_LOST = 286              # ChangeStreamHistoryLost
NOT_REPLICA_SET = 40573         # document_source_change_stream.cpp: "only ... on replica sets"
BAD_TOKEN_DATA = 40647          # resume_token.cpp: "Bad resume token: _data of missing or ..."
KEYSTRING_UNKNOWN_TYPE = 50811  # key_string.cpp: "KeyString format error: Unknown type"
BSON_OBJECT_TOO_LARGE = 10334   # bson/bsonobj.cpp: "BSONObj size: ... is invalid"
SPLIT_EVENT_FAILED = 7182500    # change_stream_split_event_helpers.cpp: one field over 16 MB
# Refusals of a resume token itself: nothing but another token gets past them. 9 FailedToParse is
# resume_token.cpp's "resume token string was not a valid hex string"; 22 InvalidBSON is BSON that
# does not decode, which for a token a client handed us means the token.
BAD_TOKEN_CODES = frozenset({FAILED_TO_PARSE, INVALID_BSON, INVALID_RESUME_TOKEN, BAD_TOKEN_DATA,
                             KEYSTRING_UNKNOWN_TYPE})
# resume_token.cpp words its other refusals (40646, 40649, 50793-50796, 50870-50872, 51055-51057
# ...) with "resume token" or "Token type", and key_string.cpp prefixes every decoding failure of
# the KeyString a token is with "KeyString format error".
BAD_TOKEN_WORDS = ("resume token", "token type", "keystring format error")
# The driver specification's word for a failure a change stream can resume past
# (specifications/source/change-streams/change-streams.md, "Resumable Error").
RESUMABLE_LABEL = "ResumableChangeStreamError"

IMAGES_MISSING = "images_missing"  # the source's state, and the reason catch-up riders resync
EVENT_TOO_LARGE = "event_too_large"  # likewise
# States the stream stops in: the event it failed on fails every reopen the same way.
STOPPED = (IMAGES_MISSING, EVENT_TOO_LARGE)
IMAGE_SETTINGS = {"post-image": "FULL_DOCUMENT", "pre-image": "FULL_DOCUMENT_BEFORE_CHANGE"}
STOPPED_HELP = ("this relay stopped following MongoDB's changes ({state}) until its operator "
                "fixes the cause (/readyz says how); keep your last id: after the fix you resume "
                "from it, or are told to resync")

BACKOFF_BASE = 0.25  # seconds before the first retry
BACKOFF_CAP = 10.0   # seconds between retries at most, however long MongoDB stays away
# Seconds the driver looks for a server and waits to connect before it says why it cannot: the
# driver's own 30 s would leave /readyz at "connecting" for that long.
DRIVER_TIMEOUT_MS = 5000
MAX_REASON = 300  # characters of a driver's message kept for /readyz and the log
# How long one getMore waits on the server for new events: an empty batch then still carries a
# fresh resume token (the hub's position), and a stop is noticed within a second.
MAX_AWAIT_MS = 1000

# What the "unreachable" line and /readyz add, as the replica-set line names its fix.
UNREACHABLE_HELP = (
    "check that MONGO_SRV names the right hosts and port (for Atlas, the mongodb+srv:// string "
    "from Connect > Drivers), that mongod is running and answers there (mongosh with the same "
    "URI), and that no firewall stands between (on Atlas, Network Access must list this "
    "machine's address)"
)
# What browsers are told in ``source`` messages: what is wrong and what happens next, never a host,
# a replica-set name or the driver's words (the log and /readyz have those, for the operator).
BROWSER_MESSAGES = {
    "connecting": "The relay is connecting to MongoDB.",
    "open": "MongoDB is connected: changes arrive live.",
    "unreachable": "The relay cannot reach MongoDB; it keeps retrying.",
    "not_replica_set": ("MongoDB is not a replica set, which change streams need; the relay "
                        "retries until its operator fixes that."),
    "auth_failed": ("The relay could not sign in to MongoDB; it retries until its operator "
                    "fixes the credentials."),
    "unauthorized": ("The relay may not read changes from MongoDB; it retries until its "
                     "operator grants access."),
    "error": "MongoDB refused the change stream; the relay keeps retrying.",
    IMAGES_MISSING: ("The relay stopped following changes: an event lacks a document image it "
                     "is set to require. Its operator must fix this; keep your last id."),
    EVENT_TOO_LARGE: ("The relay stopped following changes: an event is over MongoDB's 16 MB "
                      "limit. Its operator must fix this; keep your last id."),
}

REPLICA_SET_HELP = (
    "change streams need a replica set, and this MongoDB is a standalone server: start it with "
    "`mongod --replSet rs0` and run `rs.initiate()` once in mongosh (a one-member replica set is "
    "fine), or use an Atlas cluster"
)


def bad_resume_token(exc: BaseException) -> bool:
    """MongoDB refused a resume token itself: retrying with that token cannot help."""
    if not isinstance(exc, OperationFailure):
        return False
    if exc.code in BAD_TOKEN_CODES:
        return True
    message = str(exc).lower()
    return any(words in message for words in BAD_TOKEN_WORDS)


def resync_reason(exc: BaseException) -> str | None:
    """Why a change stream cannot go on from its resume point — the reason its clients are told
    to resync — or None when trying again may get past the failure.

    Trying again helps where the driver specification calls a failure resumable: anything but a
    server's refusal (the network; a primary stepping down, which PyMongo raises as
    NotPrimaryError, a ConnectionFailure), CursorNotFound, and what the server labels
    ResumableChangeStreamError. Any other refusal comes again at every attempt, so a code the
    relay has no name for ends in a resync too, never in retries while a client waits.
    """
    if not isinstance(exc, OperationFailure):
        return None
    if exc.code == CURSOR_NOT_FOUND or exc.has_error_label(RESUMABLE_LABEL):
        return None
    if exc.code == HISTORY_LOST:
        return "history_lost"
    if bad_resume_token(exc):
        return "invalid_token"
    if too_large(exc):
        return EVENT_TOO_LARGE
    return "resume_failed"


def too_large(exc: BaseException) -> bool:
    """MongoDB cannot send an event: over 16 MB, or split and still too large a field."""
    return isinstance(exc, OperationFailure) and exc.code in (BSON_OBJECT_TOO_LARGE,
                                                              SPLIT_EVENT_FAILED)


def too_large_help(config: Config) -> str:
    """What /readyz says when the stream stopped on an event MongoDB cannot send."""
    if any(SPLIT_STAGE in stage for stage in config.pipeline):
        fix = ("it is split ($changeStreamSplitLargeEvent) and one of its fields alone is over "
               "16 MB, which no split can send: leave that field out of the events with a "
               "PIPELINE $unset (or REDACT), or stop asking for the images that carry it")
    else:
        fix = ('add {"$changeStreamSplitLargeEvent": {}} as the last PIPELINE stage (MongoDB '
               "7.0+ or 6.0.9+): MongoDB then sends it in fragments, which the relay puts back "
               "together; or make events smaller (a PIPELINE $project or $unset, fewer images); "
               "and set CLIENT_BUFFER_BYTES above the largest event")
    return ("MongoDB has a change event over 16 MB (BSONObjectTooLarge) that this change stream "
            "cannot return, so the stream stopped (it would fail on that event at every "
            f"reopen). To go past it, {fix}; then restart the relay: it starts from now, and "
            "clients resuming from before that event get it, or are told to resync "
            f"({EVENT_TOO_LARGE})")


def missing_image(exc: BaseException, config: Config) -> str | None:
    """``"post-image"`` or ``"pre-image"`` when ``exc`` is a ``required`` stream failing on an
    event without that image, else None.

    MongoDB raises 47 NoMatchingDocument, saying which image, from its post- and pre-image
    stages (src/mongo/db/pipeline/document_source_change_stream_add_post_image.cpp and
    ..._add_pre_image.cpp: "Change stream was configured to require a post-image for all update
    events, but the post-image was not found for event: ..."). Images are recorded when a
    document is written, so that event will never have one.
    """
    if not isinstance(exc, OperationFailure) or exc.code != NO_MATCHING_DOCUMENT:
        return None
    required = [image for image, setting in IMAGE_SETTINGS.items()
                if getattr(config, setting.lower()) == "required"]
    named = [image for image in required if image in str(exc)]
    found = named or required
    return found[0] if found else None


def images_help(image: str, config: Config) -> str:
    """What /readyz says when the stream stopped on an event without a required image."""
    return (f"MongoDB has no {image} for an event in {config.watch_db}.{config.watch_collection}"
            f" and {IMAGE_SETTINGS[image]}=required, so the change stream stopped (it would "
            "fail on that event at every reopen). Enable images: db.runCommand({collMod: "
            f"\"{config.watch_collection}\", changeStreamPreAndPostImages: {{enabled: true}}}}) "
            "(MongoDB 6.0+), then restart the relay: it starts from now, and clients resuming "
            f"from before that event are told to resync ({IMAGES_MISSING})")


class ChangeSource:
    """Runs ``watch()`` forever and publishes every change to the hub."""

    def __init__(self, config: Config, hub: Hub[Any],
                 client: AsyncMongoClient[Any] | None = None,
                 on_state: Callable[[bytes], None] | None = None):
        self.config = config
        self.hub = hub
        self.client = client
        # Told the ``source`` message of every new state (the relay passes it to every client;
        # without it, the hub's clients are told).
        self.on_state = on_state
        self.state = "connecting"
        self.reason = "connecting to MongoDB"
        self.since = _now()  # when the state began: an outage's start, for every client
        self.last_event_at: float | None = None
        self.last_change: ev.Change | None = None  # for the lag: its wallTime
        self.attempts = 0
        self.opened = 0  # times the stream opened: all but the first are reopens
        self._token: ResumeToken | None = None        # where to reopen from: resume_after
        self._start_after: ResumeToken | None = None  # ...or start_after, after an invalidate
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="change-source")
        return self._task

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.client is not None:
            await self.client.close()

    def missing_image(self, exc: BaseException) -> str | None:
        """``missing_image`` under this relay's image settings (catch-ups ask it too)."""
        return missing_image(exc, self.config)

    @property
    def ready(self) -> bool:
        return self.state == "open"

    def lag(self) -> float | None:
        """Seconds from the last event's commit (its wallTime) to its receipt; None before
        one, or without wallTime."""
        if self.last_change is None or self.last_event_at is None:
            return None
        commit = ev.commit_time(self.last_change)
        if commit is None:
            return None
        received = time.time() - (time.monotonic() - self.last_event_at)
        return max(0.0, received - commit)

    def message(self) -> bytes:
        """The ``source`` control message of the current state, as browsers are told it."""
        return ev.control("source", state=self.state, message=BROWSER_MESSAGES[self.state],
                          since=self.since)

    def _enter(self, state: str, reason: str) -> None:
        changed = state != self.state
        self.state, self.reason = state, reason
        if changed:
            self.since = _now()
            (self.on_state or self.hub.broadcast)(self.message())

    def status(self) -> dict[str, object]:
        return {
            "source": self.state,
            "reason": self.reason,
            "since": self.since,
            "scope": self.config.scope,
            "attempts": self.attempts,
            "last_event_age": None if self.last_event_at is None else round(
                time.monotonic() - self.last_event_at, 3),
        }

    # -- the loop -----------------------------------------------------------------------------

    def mongo(self) -> AsyncMongoClient[Any]:
        """The driver's client, created on first use (it connects in the background)."""
        if self.client is None:
            self.client = AsyncMongoClient(self.config.mongo_uri,
                                           **client_options(self.config.mongo_uri))
        return self.client

    def target(self) -> AsyncMongoClient[Any] | AsyncDatabase[Any] | AsyncCollection[Any]:
        """What one ``watch()`` covers: the deployment, WATCH_DB, or WATCH_COLLECTION in it."""
        client, db, coll = self.mongo(), self.config.watch_db, self.config.watch_collection
        if db is None:
            return client
        return client[db] if coll is None else client[db][coll]

    def pipeline(self) -> list[Stage]:
        return change_stream_stages(self.config.pipeline, self.config.redact)

    async def run(self) -> None:
        backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP)
        while not self._stopping:
            try:
                self.mongo()
                await self._watch()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._enter(*self._classify(exc))
                if self.state in STOPPED:
                    logger.error("change stream stopped (%s): %s", self.state, self.reason)
                    self.hub.broadcast(ev.control("error", code=self.state,
                                                  message=STOPPED_HELP.format(state=self.state)))
                    return
                delay = backoff.delay()
                logger.warning("change stream %s: %s — retrying in %.1fs (attempt %d)",
                               self.state, self.reason, delay, backoff.failures)
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        self.attempts += 1
        fresh = self._token is None and self._start_after is None
        try:
            stream = await self.open_stream(self._start_after, self._token)
        except OperationFailure as exc:
            if exc.code != HISTORY_LOST or fresh:
                raise
            logger.error("the resume point is no longer in the oplog (286): starting from now; "
                         "clients are told to resync")
            self._token = self._start_after = None
            stream = await self.open_stream()
            fresh = True
        await self._pump(stream, unplaced=self._opened(stream, fresh))

    async def open_stream(self, start_after: ResumeToken | None = None,
                          resume_after: ResumeToken | None = None,
                          max_await_ms: int = MAX_AWAIT_MS) -> AsyncChangeStream[Any]:
        """``watch()`` on the configured scope, pipeline and image modes (catch-ups too)."""
        mode, before = self.config.full_document, self.config.full_document_before_change
        options: dict[str, Any] = dict(
            full_document=None if mode == "default" else mode,
            full_document_before_change=None if before == "off" else before,
            max_await_time_ms=max_await_ms)
        if start_after is not None:
            options["start_after"] = start_after
        elif resume_after is not None:
            options["resume_after"] = resume_after
        return await self.target().watch(self.pipeline(), **options)

    def _opened(self, stream: AsyncChangeStream[Any], fresh: bool) -> bool:
        """Tell the hub where the stream stands; a fresh start after the first is a gap.

        True when that is not known yet: MongoDB picks a fresh stream's start time and then
        scans, so events committed in between come back in its first batch, and until they are
        read PyMongo has no resume token (the change streams spec, "Updating the Cached Resume
        Token": a non-empty firstBatch leaves it unset until its documents are iterated). The
        first of them is then where the stream starts.
        """
        token = stream.resume_token
        self.opened += 1
        self._enter("open", "change stream open")
        logger.info("change stream open on %s (%s)", self.config.scope,
                    "from now" if fresh else "resumed")
        if token is None:
            return fresh
        self._token, self._start_after = token, None
        if fresh:
            self._start(token_id(token))
        else:
            self.hub.advance(token_id(token))
        return False

    def _start(self, floor: str) -> None:
        self.hub.start(floor, resync=self.hub.floor is not None)

    async def _pump(self, stream: AsyncChangeStream[Any], unplaced: bool) -> None:
        """Publish every change; ``unplaced``: the hub is still to learn where the stream
        starts (see ``_opened``)."""
        hub = self.hub
        fragments = Reassembly()
        try:
            while True:
                change = await stream.try_next()
                if change is None:
                    token = stream.resume_token
                    if token is not None and not fragments.pending:
                        self._token = token
                        if unplaced:
                            self._start(token_id(token))
                            unplaced = False
                        else:
                            hub.advance(token_id(token))
                    if not stream.alive:
                        raise ConnectionFailure("the change stream was closed by the server")
                    continue
                self.last_event_at = time.monotonic()
                change = fragments.add(change)
                if change is None:
                    continue
                self.last_change = change
                event = ev.encode_change(change, deflate=self.config.ws_compression)
                if unplaced:
                    self._start(event.token)
                    unplaced = False
                hub.publish(event)
                if change.get("operationType") == "invalidate":
                    self._start_after = change["_id"]
                    self._token = None
                    logger.info("change stream invalidated (%s): reopening after it",
                                json_util.dumps(change.get("ns", {})))
                    return
                self._token = change["_id"]
        finally:
            with contextlib.suppress(PyMongoError):
                await stream.close()

    def _classify(self, exc: Exception) -> tuple[str, str]:
        """The state a failure leaves the source in, and its reason for /readyz and the log."""
        code = getattr(exc, "code", None)
        image = missing_image(exc, self.config)
        if image is not None:
            return IMAGES_MISSING, images_help(image, self.config)
        if too_large(exc):
            return EVENT_TOO_LARGE, too_large_help(self.config)
        if isinstance(exc, OperationFailure) and code == NOT_REPLICA_SET:
            return "not_replica_set", REPLICA_SET_HELP
        if isinstance(exc, OperationFailure) and code == AUTH_FAILED:
            return "auth_failed", ("authentication failed: check the user name and password in "
                                   "MONGO_SRV")
        if isinstance(exc, OperationFailure) and code == UNAUTHORIZED:
            return "unauthorized", ("the MongoDB user may not open change streams here: grant it "
                                    "the changeStream and find actions (e.g. the read role) on the "
                                    f"watched scope ({_short(exc)})")
        if bad_resume_token(exc):
            self._token = self._start_after = None
            return "error", f"resume token rejected ({_short(exc)})"
        if isinstance(exc, ConnectionFailure | ConfigurationError):
            return "unreachable", f"cannot reach MongoDB ({_short(exc)}); {UNREACHABLE_HELP}"
        if isinstance(exc, PyMongoError | OutOfOrder):  # OutOfOrder: reopen from the last event
            return "error", _short(exc)
        logger.exception("unexpected error in the change stream loop")
        return "error", f"{type(exc).__name__}: {exc}"


def _now() -> str:
    """UTC now in ISO 8601, to the second (what ``Date`` parses in every browser)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _short(exc: Exception) -> str:
    """The driver's message without the topology dump and full server reply."""
    text = str(exc)
    for cut in (", full error:", " (configured timeouts", ", Timeout:"):
        text = text.split(cut)[0]
    return text if len(text) < MAX_REASON else text[:MAX_REASON - 3] + "..."


def client_options(uri: str) -> dict[str, Any]:
    """Driver options we set unless the connection string already does."""
    lowered = uri.lower()
    options: dict[str, Any] = {"appname": "changerelay"}
    if "serverselectiontimeoutms" not in lowered:
        options["serverSelectionTimeoutMS"] = DRIVER_TIMEOUT_MS
    if "connecttimeoutms" not in lowered:
        options["connectTimeoutMS"] = DRIVER_TIMEOUT_MS
    return options
