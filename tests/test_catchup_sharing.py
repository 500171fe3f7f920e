"""Who shares a catch-up stream, and a rider that stops reading holds no one up (issue 11
item 10)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import SimpleNamespace

import jwt

from changerelay.auth import Authenticator
from changerelay.catchup import PACE_EVENTS, SHARE_SECONDS, CatchUp, Job, accounts
from changerelay.hub import Hub
from changerelay.subscription import Subscription
from tests.support import event, token


def at(seconds: int, n: int = 1) -> str:
    """An id at cluster time ``seconds``."""
    return f"82{seconds:08X}{n:08X}"


class Rider:
    def __init__(self, peer: str, backlog: int = 0):
        self.peer = peer
        self.claims = None
        self.subscription = Subscription()
        self.encoding = "ws"
        self.last_send = 0.0
        self.told = self.sent = None
        self.announced = False
        self.controls: list[bytes] = []
        self.closed = False
        self.backlog = deque(range(backlog)) if backlog else None
        self.cut = False
        self._drained = asyncio.get_running_loop().create_future()

    async def drained(self):
        if self.backlog is not None:
            await asyncio.shield(self._drained)

    def drain(self):
        self.backlog = None
        self._drained.set_result(None)

    def cut_off(self):
        self.cut = self.closed = True

    def send_control(self, message, token=None):
        self.controls.append(message)


async def never_opens(**kwargs):
    await asyncio.Event().wait()


def new_catchup(streams=2, per_peer=1, floor=0) -> CatchUp:
    hub = Hub(lambda flush: flush(), lambda client, after: None, 100, 1 << 20)
    hub.start(token(floor))
    return CatchUp(hub, never_opens, streams, lambda exc: None, per_peer=per_peer)


async def test_a_queued_catch_up_takes_only_its_own_peers_a_running_one_anyone_near():
    mine, theirs = accounts(Rider("a")), accounts(Rider("b"))
    job = Job(at(1000), mine)
    assert job.accepts(at(10), mine) and not job.accepts(at(1000), theirs)
    job.running = True
    assert job.accepts(at(1000 + SHARE_SECONDS), theirs)
    assert not job.accepts(at(1001 + SHARE_SECONDS), theirs)  # would read a minute for nothing
    assert not job.accepts(at(999), mine)                      # already passed


async def test_a_catch_up_given_its_turn_takes_along_waiting_clients_near_its_start():
    catchup = new_catchup(streams=1)
    first, near_one, nearer, far_one = Rider("a"), Rider("b"), Rider("d"), Rider("c")
    catchup.add(first, at(1000))          # runs (and waits on its stream)
    await asyncio.sleep(0)
    catchup.add(near_one, at(990))         # older than its position: waits, on b's account
    catchup.add(far_one, at(10))           # hours before: waits on c's account
    catchup.add(nearer, at(995))           # waits on d's account
    await asyncio.sleep(0)
    assert len(catchup.jobs) == 4
    catchup.discard(first)                 # the stream frees; b's catch-up gets its turn
    async with asyncio.timeout(2):
        while not any(job.running and near_one in job.clients for job in catchup.jobs):
            await asyncio.sleep(0.01)
    assert [set(job.clients) for job in catchup.jobs] == [{near_one, nearer}, {far_one}]
    assert catchup.jobs[0].start == at(990)
    await catchup.stop()


async def test_a_rider_that_stops_reading_is_set_aside_and_the_others_go_on():
    catchup = new_catchup(floor=10)  # the hub's log starts after the riders' point
    job = Job(token(0), ("peer a",))
    reading, stalled = Rider("a"), Rider("b", backlog=PACE_EVENTS + 1)
    job.add(reading, token(5))
    job.add(stalled, token(5))
    job.running = True
    async with asyncio.timeout(2):        # PACE_PATIENCE, not STALL_TIMEOUT
        await catchup._pace(job)
    assert list(job.clients) == [reading]
    assert catchup.count() == 1 and stalled in catchup.clients() and not stalled.cut
    stalled.drain()
    async with asyncio.timeout(2):        # back in the queue, from where it was
        while not any(stalled in job.clients for job in catchup.jobs):
            await asyncio.sleep(0.01)
    assert [job.clients[stalled] for job in catchup.jobs if stalled in job.clients] == [token(5)]
    await catchup.stop()


async def test_riders_all_stalled_are_waited_for_together_then_cut_off(monkeypatch):
    from changerelay import catchup as module

    monkeypatch.setattr(module, "STALL_TIMEOUT", 1.0)
    catchup = new_catchup()
    job = Job(token(0), ("peer a",))
    stalled = [Rider("a", backlog=PACE_EVENTS + 1) for _ in range(5)]
    for rider in stalled:
        job.add(rider, token(5))
    job.running = True
    async with asyncio.timeout(3):        # one timeout for all five, not five in turn
        await catchup._pace(job)
    assert all(rider.cut for rider in stalled) and not job.clients


async def test_taking_along_is_measured_from_where_the_catch_up_started():
    """Clients a minute apart each, in a chain: only those within a minute of the start ride."""
    catchup = new_catchup(streams=1)
    blocker = Rider("z")
    catchup.add(blocker, at(100_000))
    await asyncio.sleep(0)
    chain = [Rider(f"p{n}") for n in range(4)]
    for n, rider in enumerate(chain):  # 10,000, then 40 s, 80 s, 120 s before it
        catchup.add(rider, at(10_000 - 40 * n))
    await asyncio.sleep(0)
    catchup.discard(blocker)
    async with asyncio.timeout(2):
        while not any(job.running for job in catchup.jobs):
            await asyncio.sleep(0.01)
    assert set(catchup.jobs[0].clients) == {chain[0], chain[1]}
    await catchup.stop()


def test_a_catch_up_is_charged_to_the_address_and_the_tokens_subject():
    secret = "s" * 40
    request = SimpleNamespace(headers={"Authorization": "Bearer " + jwt.encode(
        {"exp": int(time.time()) + 60, "sub": "alice"}, secret, algorithm="HS256")},
        query_arguments={})
    claims = Authenticator(secret, ["HS256"]).authenticate(request)
    rider = SimpleNamespace(peer="203.0.113.7", claims=claims)
    assert accounts(rider) == ("peer 203.0.113.7", "sub alice")
    assert accounts(SimpleNamespace(peer="203.0.113.7", claims=None)) == ("peer 203.0.113.7",)


async def test_a_rider_set_aside_goes_on_from_the_hubs_log_when_it_reaches_back_far_enough():
    catchup = new_catchup()
    for n in range(1, 4):
        catchup.hub.publish(event(n))
    job = Job(token(0), ("peer a",))
    reading, stalled = Rider("a"), Rider("b", backlog=PACE_EVENTS + 1)
    stalled.replay = lambda events: stalled.replayed.extend(e.token for e in events)
    stalled.replayed = []
    job.add(reading, token(1))
    job.add(stalled, token(1))
    job.running = True
    await catchup._pace(job)
    stalled.drain()
    async with asyncio.timeout(2):
        while stalled not in catchup.hub.clients:
            await asyncio.sleep(0.01)
    assert stalled.replayed == [token(2), token(3)] and not catchup.jobs
