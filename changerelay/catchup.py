"""Catch-up from MongoDB's own history for clients that resume from before the replay buffer.

This is what makes resume work across relay restarts and between relay instances: the client's
id is a MongoDB resume token, so any relay can open a change stream right after it, replay up to
the point where its own log takes over, and hand the client to the hub.

Change streams are not free, so catch-ups are pooled. A queued catch-up accepts every new client
(it will start from the oldest of their positions); a running one accepts clients whose position
it has not yet passed (each client skips what it had already seen). At most ``CATCHUP_STREAMS``
run at once; the rest wait their turn. A burst of thousands of reconnects therefore opens a handful
of change streams, not thousands.
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
from .fragments import Reassembly
from .hub import Hub, Subscriber
from .source import IMAGES_MISSING, bad_resume_token, resync_reason
from .tokens import order_key, returned_all_before, token_document, token_id

if TYPE_CHECKING:
    from .subscription import Subscription

BACKOFF_BASE = 0.4  # seconds before a failed catch-up stream is reopened the first time
BACKOFF_CAP = 5.0   # at most: its riders are waiting
CATCHUP_AWAIT_MS = 200  # short: an empty batch's resume token is what ends a catch-up
PACE_EVENTS = 1000     # events queued for one client before the catch-up waits for it
STALL_TIMEOUT = 10.0   # seconds a catch-up waits for one client before cutting it off


class Rider(Subscriber, Protocol):
    """A client riding a catch-up: the hub's interface, and what pacing it needs."""

    closed: bool
    backlog: deque[Any] | None  # what it has yet to write; None: nothing

    async def drained(self) -> None: ...
    def cut_off(self) -> None: ...


R = TypeVar("R", bound=Rider)
# Opens a change stream on the relay's scope and pipeline, as ``ChangeSource.open_stream``.
OpenStream = Callable[..., Awaitable[AsyncChangeStream[Any]]]


class Job(Generic[R]):
    """One catch-up change stream and the clients riding on it. Positions are ids."""

    def __init__(self, after: str):
        self.start = after
        self.position = after      # the newest id this job has read past
        self.clients: dict[R, str] = {}  # client -> the newest id that client has seen
        self.running = False
        self.after_invalidate = False  # position is an invalidate: continue with startAfter
        self.task: asyncio.Task[None] | None = None

    def accepts(self, after: str) -> bool:
        return not self.running or order_key(after) >= order_key(self.position)

    def add(self, client: R, after: str) -> None:
        self.clients[client] = after
        if not self.running and order_key(after) < order_key(self.start):
            self.start = self.position = after


class CatchUp(Generic[R]):
    """Catch-ups for ``hub``'s clients, on streams from ``open_stream``, at most ``streams`` at
    once; ``missing_image(exc)`` says whether a failure is an event without a required image
    (``ChangeSource.missing_image``)."""

    def __init__(self, hub: Hub[R], open_stream: OpenStream, streams: int,
                 missing_image: Callable[[BaseException], str | None]):
        self.hub = hub
        self.open_stream = open_stream
        self.missing_image = missing_image
        self.jobs: list[Job[R]] = []
        self._slots = asyncio.Semaphore(streams)
        self.streams_opened = 0

    def add(self, client: R, after: str) -> None:
        for job in self.jobs:
            if job.accepts(after):
                job.add(client, after)
                return
        fresh: Job[R] = Job(after)
        fresh.add(client, after)
        self.jobs.append(fresh)
        fresh.task = asyncio.get_running_loop().create_task(self._run(fresh), name="catch-up")

    def discard(self, client: R) -> None:
        for job in self.jobs:
            if job.clients.pop(client, None) is not None and not job.clients and job.task:
                job.task.cancel()

    def clients(self) -> list[R]:
        return [client for job in self.jobs for client in job.clients]

    def count(self) -> int:
        return sum(len(job.clients) for job in self.jobs)

    async def stop(self) -> None:
        for job in list(self.jobs):
            if job.task is not None:
                job.task.cancel()
        for job in list(self.jobs):
            if job.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job.task

    async def _run(self, job: Job[R]) -> None:
        try:
            async with self._slots:
                job.running = True
                backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP)
                while job.clients:
                    try:
                        if await self._stream(job):
                            return
                        continue  # invalidated: reopen right after the invalidate
                    except (PyMongoError, ValueError) as exc:  # ValueError: see fragments.py
                        reason = (IMAGES_MISSING if self.missing_image(exc) is not None
                                  else resync_reason(exc))
                        if reason is not None:
                            logger.warning("catch-up cannot go on (%s: %s); its %d clients are "
                                           "told to resync", reason, exc, len(job.clients))
                            self._resync(job, reason)
                            return
                        logger.warning("catch-up stream failed: %s", exc)
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
        verdicts: dict[Subscription, Sequence[ev.Delivery]] = {}  # one match per subscription
        for client, seen in tuple(job.clients.items()):
            if event.key > order_key(seen):
                job.clients[client] = event.token
                subscription = client.subscription
                matched = verdicts.get(subscription)
                if matched is None:
                    matched = verdicts[subscription] = subscription.select([event])
                if matched:
                    client.sent = matched[-1].token
                    client.replay(matched)
                    self.hub.tally.replayed(client, matched)
                if client.closed:
                    job.clients.pop(client, None)

    async def _pace(self, job: Job[R]) -> None:
        """Read from MongoDB no faster than the slowest rider drains; cut off a stalled one."""
        for client in tuple(job.clients):
            if client.backlog is not None and len(client.backlog) > PACE_EVENTS:
                try:
                    await asyncio.wait_for(client.drained(), STALL_TIMEOUT)
                except TimeoutError:
                    client.cut_off()
                    job.clients.pop(client, None)

    def _hand_over(self, job: Job[R], floor: str) -> None:
        """Everything up to ``floor`` was delivered; the hub's log has the rest."""
        hub = self.hub
        clients, job.clients = job.clients, {}
        for client, seen in clients.items():
            if not client.closed:
                hub.resume(client, max(seen, floor, key=order_key))

    def _resync(self, job: Job[R], reason: str) -> None:
        hub = self.hub
        clients, job.clients = job.clients, {}
        message = ev.control("resync", reason=reason)
        for client, _ in clients.items():
            if not client.closed:
                client.send_control(message)
                hub.subscribe(client)

