"""Catch-up from MongoDB's own history for clients that resume from before the replay buffer.

This is what makes resume work across relay restarts and between relay instances: the client's
id is a MongoDB resume token, so any relay can open a change stream right after it, replay up to
the point where its own log takes over, and hand the client to the hub.

Change streams are not free, so catch-ups are pooled, and shared fairly (``fairpool.py``). Each
is charged to the client that asked for it — its address, and its token's subject when auth is on
— and at most ``CATCHUP_STREAMS`` run at once, at most ``CATCHUP_STREAMS_PER_PEER`` for one
account; the rest wait their turn, round-robin across addresses, so that a peer resuming fifty
connections from fifty old ids holds its share of the streams, never all of them.

A queued catch-up accepts every new client of its own account (it starts from the oldest of their
positions: theirs to wait for). A running one accepts anyone's client whose position it has not
passed and is at most ``SHARE_SECONDS`` behind, and a catch-up that gets its turn takes along the
waiting clients of other accounts within ``SHARE_SECONDS`` of its start: each reads a little it
skips, instead of a stream of its own. A burst of thousands of reconnects, from wherever, after a
restart therefore opens a handful of change streams, not thousands.

A catch-up reads no faster than its riders drain. A rider that falls behind while others are
ready is set aside rather than waited for: it rejoins the queue once it has drained, and is cut
off if it does not drain in ``STALL_TIMEOUT``; so no rider slows the others down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from logzero import logger
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from . import events as ev
from .backoff import Backoff
from .fairpool import FairPool
from .fragments import OutOfOrder, Reassembly
from .hub import Hub, Subscriber
from .index import Shared
from .source import IMAGES_MISSING, bad_resume_token, resync_reason
from .tokens import order_key, returned_all_before, seconds, token_document, token_id

if TYPE_CHECKING:
    from .auth import Claims
    from .subscription import Subscription

BACKOFF_BASE = 0.4  # seconds before a failed catch-up stream is reopened the first time
BACKOFF_CAP = 5.0   # at most: its riders are waiting
CATCHUP_AWAIT_MS = 200  # short: an empty batch's resume token is what ends a catch-up
PACE_EVENTS = 1000     # events queued for one client before the catch-up waits for it
PACE_PATIENCE = 0.5    # seconds others wait for it before it is set aside to drain alone
STALL_TIMEOUT = 10.0   # seconds a client has to drain before it is cut off
# Cluster-time seconds a client may share a catch-up from before its own position: what it reads
# and skips. A restart's reconnects lie within seconds of each other; hours-old ids do not.
SHARE_SECONDS = 60


class Rider(Subscriber, Protocol):
    """A client riding a catch-up: the hub's interface, and what pacing it needs."""

    closed: bool
    backlog: deque[Any] | None  # what it has yet to write; None: nothing
    claims: Claims | None       # of its token, when auth is on

    async def drained(self) -> None: ...
    def cut_off(self) -> None: ...


def accounts(client: Rider) -> tuple[str, ...]:
    """Who a client's catch-up is charged to: its address, and its token's subject if any."""
    peer = f"peer {client.peer}"
    subject = None if client.claims is None else client.claims.subject
    return (peer,) if subject is None else (peer, f"sub {subject}")


def near(behind: str, ahead: str) -> bool:
    """``behind`` is at most ``SHARE_SECONDS`` of cluster time before ``ahead``."""
    return seconds(ahead) - seconds(behind) <= SHARE_SECONDS


R = TypeVar("R", bound=Rider)
# Opens a change stream on the relay's scope and pipeline, as ``ChangeSource.open_stream``.
OpenStream = Callable[..., Awaitable[AsyncChangeStream[Any]]]


class Job(Generic[R]):
    """One catch-up change stream and the clients riding on it, charged to ``key`` (``accounts``
    of the client it was opened for). Positions are ids."""

    def __init__(self, after: str, key: tuple[str, ...]):
        self.key = key
        self.start = after
        self.position = after      # the newest id this job has read past
        self.clients: dict[R, str] = {}  # client -> the newest id that client has seen
        self.routes = Shared()  # their subscriptions: an event is decided by those it concerns
        self.running = False
        self.after_invalidate = False  # position is an invalidate: continue with startAfter
        self.task: asyncio.Task[None] | None = None

    def accepts(self, after: str, key: tuple[str, ...]) -> bool:
        if not self.running:
            return key == self.key
        return order_key(after) >= order_key(self.position) and near(self.position, after)

    def add(self, client: R, after: str) -> None:
        self.clients[client] = after
        self.routes.hold(client.subscription)
        if not self.running and order_key(after) < order_key(self.start):
            self.start = self.position = after

    def remove(self, client: R) -> bool:
        """``client`` leaves this job (gone, or cut off); False if it was not riding it."""
        if self.clients.pop(client, None) is None:
            return False
        self.routes.release(client.subscription)
        return True


class CatchUp(Generic[R]):
    """Catch-ups for ``hub``'s clients, on streams from ``open_stream``, at most ``streams`` at
    once and ``per_peer`` for one account; ``missing_image(exc)`` says whether a failure is an
    event without a required image (``ChangeSource.missing_image``)."""

    def __init__(self, hub: Hub[R], open_stream: OpenStream, streams: int,
                 missing_image: Callable[[BaseException], str | None], *, per_peer: int):
        self.hub = hub
        self.open_stream = open_stream
        self.missing_image = missing_image
        self.jobs: list[Job[R]] = []
        self.pool = FairPool(streams, per_peer)
        self._aside: dict[R, asyncio.Task[None]] = {}  # riders set aside until they drain
        self.streams_opened = 0

    def add(self, client: R, after: str) -> None:
        key = accounts(client)
        for job in self.jobs:
            if job.accepts(after, key):
                job.add(client, after)
                return
        fresh: Job[R] = Job(after, key)
        fresh.add(client, after)
        self.jobs.append(fresh)
        fresh.task = asyncio.get_running_loop().create_task(self._run(fresh), name="catch-up")

    def discard(self, client: R) -> None:
        for job in tuple(self.jobs):
            if job.remove(client) and not job.clients:
                self._drop(job)
        aside = self._aside.pop(client, None)
        if aside is not None:
            aside.cancel()

    def clients(self) -> list[R]:
        return [*(client for job in self.jobs for client in job.clients), *self._aside]

    def count(self) -> int:
        return sum(len(job.clients) for job in self.jobs) + len(self._aside)

    async def stop(self) -> None:
        tasks = [job.task for job in self.jobs if job.task is not None]
        tasks += self._aside.values()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self, job: Job[R]) -> None:
        try:
            async with self.pool.hold(job.key):
                self._take_along(job)
                job.running = True
                backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP)
                while job.clients:
                    try:
                        if await self._stream(job):
                            return
                        continue  # invalidated: reopen right after the invalidate
                    except (PyMongoError, OutOfOrder) as exc:
                        reason = (IMAGES_MISSING if self.missing_image(exc) is not None
                                  else resync_reason(exc))
                        if reason is not None:
                            logger.warning("catch-up cannot go on (%s: %s); its %d clients are "
                                           "told to resync", reason, exc, len(job.clients))
                            self._resync(job, reason)
                            return
                        logger.warning("catch-up stream failed: %s", exc)
                    except Exception as exc:
                        # A bug, which a retry would meet again: the riders go live now, told
                        # that what they missed is not coming (its message may quote an event).
                        logger.error("catch-up failed (%s); its %d clients are told to resync",
                                     type(exc).__name__, len(job.clients))
                        self._resync(job, "resume_failed")
                        return
                    await asyncio.sleep(backoff.delay())
        finally:
            if job in self.jobs:
                self.jobs.remove(job)

    async def _stream(self, job: Job[R]) -> bool:
        """Replay from ``job.position``; True once handed over, False to reopen after an
        invalidate (which ends a change stream, as it ends the relay's own)."""
        open_stream, hub = self.open_stream, self.hub
        opened_from = job.position
        token = token_document(opened_from)
        try:
            if job.after_invalidate:
                stream = await open_stream(start_after=token, max_await_ms=CATCHUP_AWAIT_MS)
            else:
                stream = await open_stream(resume_after=token, max_await_ms=CATCHUP_AWAIT_MS)
        except OperationFailure as exc:
            if not bad_resume_token(exc) or job.position != job.start or job.after_invalidate:
                raise
            # The client's own id may be an invalidate: only startAfter continues from one.
            job.after_invalidate = True
            stream = await open_stream(start_after=token, max_await_ms=CATCHUP_AWAIT_MS)
        job.after_invalidate = False
        self.streams_opened += 1
        fragments = Reassembly()
        try:
            while job.clients:
                change = await stream.try_next()
                floor = hub.floor
                if change is None:
                    # Empty: is everything before the hub's log returned? On an idle
                    # deployment the resume token stops short of it until the oplog moves.
                    # (Between the fragments of a split event it is a fragment's: not yet.)
                    resume = stream.resume_token
                    if (resume is not None and floor is not None and not fragments.pending
                            and returned_all_before(token_id(resume), floor, opened_from)):
                        self._hand_over(job, floor)
                        return True
                    if not stream.alive:
                        raise ConnectionFailure("catch-up change stream closed by the server")
                    continue
                change = fragments.add(change)
                if change is None:
                    continue
                event = ev.encode_change(change)
                if floor is not None and event.key > order_key(floor):
                    self._hand_over(job, floor)
                    return True
                self._deliver(job, event)
                if event.op == "invalidate":
                    job.after_invalidate = True
                    return False
                await self._pace(job)
            return True
        finally:
            with contextlib.suppress(PyMongoError):
                await stream.close()

    def _deliver(self, job: Job[R], event: ev.Event) -> None:
        job.position = event.token
        concerned = job.routes.index.route([event])
        verdicts: dict[Subscription, Sequence[ev.Delivery]] = {}  # one match per subscription
        for client, seen in tuple(job.clients.items()):
            if event.key > order_key(seen):
                job.clients[client] = event.token
                try:
                    subscription = client.subscription
                    matched = verdicts.get(subscription)
                    if matched is None:
                        matched = verdicts[subscription] = (
                            subscription.select([event]) if subscription in concerned else [])
                    if matched:
                        client.sent = matched[-1].token
                        client.replay(matched)
                        self.hub.tally.replayed(client, matched)
                except Exception as exc:
                    self._failed(job, client, exc)
                if client.closed:
                    job.remove(client)

    def _take_along(self, job: Job[R]) -> None:
        """``job`` got its turn: waiting clients of other accounts near its start ride too (near
        where it started: each one taken may move the start back, but not the measure)."""
        start = job.start
        for other in tuple(self.jobs):
            if other is job or other.running:
                continue
            for client, after in tuple(other.clients.items()):
                if near(after, start) and near(start, after):
                    other.remove(client)
                    job.add(client, after)
            if not other.clients:
                self._drop(other)

    def _drop(self, job: Job[R]) -> None:
        """A job without riders ends; out of ``jobs`` at once, since a task cancelled before it
        ran never reaches its ``finally``, and a queued job left there would take new clients."""
        self.jobs.remove(job)
        if job.task is not None:
            job.task.cancel()

    async def _pace(self, job: Job[R]) -> None:
        """Read from MongoDB no faster than the riders drain, waiting for those ``PACE_EVENTS``
        behind; while others are ready, only ``PACE_PATIENCE``: the rest are set aside. Riders
        that are all behind get ``STALL_TIMEOUT`` together; then the stalled are cut off."""
        loop = asyncio.get_running_loop()
        waits = {loop.create_task(client.drained()): client for client in job.clients
                 if client.backlog is not None and len(client.backlog) > PACE_EVENTS}
        deadline = loop.time() + STALL_TIMEOUT
        try:
            while waits:
                done, _ = await asyncio.wait(waits, timeout=PACE_PATIENCE)
                for wait in done:
                    del waits[wait]
                behind = set(waits.values())
                ready = any(client not in behind for client in job.clients)
                if behind and (ready or loop.time() >= deadline):
                    for client in behind:
                        seen = job.clients.get(client)
                        job.remove(client)
                        if seen is not None and ready:
                            self._aside[client] = loop.create_task(self._rejoin(client, seen))
                        elif seen is not None:
                            client.cut_off()
                    return
        finally:
            for wait in waits:
                wait.cancel()

    async def _rejoin(self, client: R, seen: str) -> None:
        """A rider set aside: once drained, on from ``seen`` (from the hub's log if it reaches
        back that far, else back in the queue); cut off if it does not drain in time."""
        try:
            await asyncio.wait_for(client.drained(), STALL_TIMEOUT)
        except TimeoutError:
            self._aside.pop(client, None)
            client.cut_off()
            return
        self._aside.pop(client, None)
        if client.closed:
            return
        try:
            if not self.hub.resume(client, seen):
                self.add(client, seen)
        except Exception as exc:
            self.hub.failed(client, exc)

    def _hand_over(self, job: Job[R], floor: str) -> None:
        """Everything up to ``floor`` was delivered; the hub's log has the rest."""
        hub = self.hub
        clients, job.clients = job.clients, {}
        for client, seen in clients.items():
            if not client.closed:
                try:
                    hub.resume(client, max(seen, floor, key=order_key))
                except Exception as exc:
                    self._failed(job, client, exc)

    def _resync(self, job: Job[R], reason: str) -> None:
        hub = self.hub
        clients, job.clients = job.clients, {}
        message = ev.control("resync", reason=reason)
        for client in clients:
            if not client.closed:
                try:
                    client.send_control(message)
                    hub.subscribe(client)
                except Exception as exc:
                    self._failed(job, client, exc)

    def _failed(self, job: Job[R], client: R, exc: Exception) -> None:
        """Serving one rider raised: it leaves the job and ends as the hub's clients do."""
        job.remove(client)
        self.hub.failed(client, exc)

