"""One client's failure never stops the others (issue 11 item 8).

A client whose ``deliver``, ``pack``, ``replay`` or ``send_control`` raises — a bug in the relay
that only some client meets — is logged once and cut on its own; every other client still gets
every event, in order, exactly once: in the live flush (whichever group it is in, wherever in the
group), for clients resuming ahead, on catch-ups, at hand-over and on resync. A catch-up that
fails for any reason hands its riders on instead of stranding them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque

import pytest
from logzero import logger

from changerelay import events as ev
from changerelay.catchup import CatchUp, Job
from changerelay.hub import Hub
from changerelay.subscription import Subscription
from tests.support import FakeClient, event, token

SECRET = "s3cret-card-number"
NUMBERS = itertools.count()


class Client(FakeClient):
    """A client as the hub and catch-ups see it, recording what it is handed.

    Hashes by a number given in creation order, so that in a small set (a group) clients come in
    that order: a test can put the broken one first, last or between bystanders.
    """

    def __init__(self, subscription=None, peer="bystander"):
        super().__init__(subscription)
        self.number = next(NUMBERS)
        self.peer = peer
        self.backlog: deque | None = None
        self.claims = None
        self.failures = 0

    def __hash__(self):
        return self.number

    def replay(self, events):
        self.received.extend(e.token for e in events)

    def fail(self):
        self.failures += 1
        self.closed = True

    async def drained(self):
        return None

    def cut_off(self):
        self.closed = True


class Broken(Client):
    """Raises at ``step`` ("deliver", "pack", "replay" or "send_control") with an event's
    contents in the message, as a real bug might."""

    def __init__(self, step, subscription=None, peer="203.0.113.66"):
        super().__init__(subscription, peer)
        self.step = step
        self.announced = True  # told ready already: what fails here is a later message
        if step == "pack":  # an encoding of its own: the group packs once per encoding
            self.encoding = "broken"

    def _raise(self, what):
        raise ValueError(f"cannot handle {what!r}")

    def deliver(self, events, payload):
        if self.step == "deliver":
            self._raise([e.change for e in events])
        super().deliver(events, payload)

    def pack(self, events):
        if self.step == "pack":
            self._raise([e.change for e in events])
        return super().pack(events)

    def replay(self, events):
        if self.step == "replay":
            self._raise([e.change for e in events])
        super().replay(events)

    def send_control(self, message, token=None):
        if self.step == "send_control":
            self._raise(message)
        super().send_control(message, token)


@pytest.fixture
def log_lines():
    """What the relay's logger writes, one string per record."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def secret_event(n: int) -> ev.Event:
    return ev.encode_change({"_id": {"_data": token(n)}, "operationType": "insert",
                             "ns": {"db": "db", "coll": "c"}, "documentKey": {"_id": n},
                             "fullDocument": {"_id": n, "card": SECRET}})


def started_hub() -> Hub:
    hub = Hub(lambda flush: flush(), lambda client, after: None, 10000, 64 * 1024 * 1024)
    hub.start(token(0))
    return hub


# Three subscriptions that all match the test's inserts: three groups, in this order.
GROUPS = [Subscription(ops=["insert"]), Subscription(namespaces=[("db", None)]),
          Subscription(ops=["insert", "update"])]


def assert_cut_once(broken, hub, log_lines):
    assert broken.failures == 1
    assert broken not in hub.clients
    mentions = [line for line in log_lines if broken.peer in line]
    assert len(mentions) == 1, log_lines
    assert not any(SECRET in line for line in log_lines), "the event's contents were logged"


@pytest.mark.parametrize("step", ["deliver", "pack"])
@pytest.mark.parametrize("group", [0, 1, 2])
@pytest.mark.parametrize("place", ["first", "middle", "last"])
def test_a_client_failing_in_any_group_is_cut_and_every_other_gets_every_event(
        step, group, place, log_lines):
    hub = started_hub()
    clients: list[list[Client]] = []
    broken = None
    for index, subscription in enumerate(GROUPS):
        members = []
        for slot in ("first", "middle", "last"):
            if index == group and slot == place:
                broken = Broken(step, subscription)
                members.append(broken)
            members.append(Client(subscription))
        clients.append(members)
    for members in clients:
        for client in members:
            hub.subscribe(client)
    bystanders = [c for members in clients for c in members if c is not broken]
    for n in (1, 2, 3, 4):  # a flush each: the failure comes at the first
        hub.publish(secret_event(n))
    for bystander in bystanders:
        assert bystander.received == [token(n) for n in (1, 2, 3, 4)]
    assert_cut_once(broken, hub, log_lines)
    assert hub.position == token(4)


def test_a_batch_reaches_later_groups_when_one_client_fails_in_it(log_lines):
    """Several events in one flush: the batch is not lost for the groups after the failure."""
    pending = []
    hub = Hub(pending.append, lambda client, after: None, 10000, 64 * 1024 * 1024)
    hub.start(token(0))
    broken = Broken("deliver", GROUPS[0])
    later = [Client(GROUPS[1]), Client(GROUPS[2])]
    for client in (broken, *later):
        hub.subscribe(client)
    for n in (1, 2, 3):
        hub.publish(secret_event(n))
    pending.pop()()
    for client in later:
        assert client.received == [token(1), token(2), token(3)]
    assert_cut_once(broken, hub, log_lines)


def test_a_client_resuming_ahead_that_fails_does_not_stop_the_others(log_lines):
    hub = started_hub()
    hub.publish(event(1))
    live = Client()
    hub.subscribe(live)
    broken, ahead = Broken("deliver"), Client()
    assert hub.resume(broken, token(2))
    assert hub.resume(ahead, token(2))
    for n in (2, 3, 4):
        hub.publish(secret_event(n))
    assert live.received == [token(2), token(3), token(4)]
    assert ahead.received == [token(3), token(4)]
    assert_cut_once(broken, hub, log_lines)


def test_control_messages_to_everyone_go_on_past_a_failing_client(log_lines):
    hub = started_hub()
    broken = Broken("send_control")
    others = [Client(), Client()]
    for client in (others[0], broken, others[1]):
        hub.subscribe(client)
    hub.broadcast(ev.control("error", code="x", message="y"))
    hub.start(token(5), resync=True)
    for client in others:
        assert [c["type"] for c in client.controls] == ["error", "resync"]
    assert_cut_once(broken, hub, log_lines)


def test_positions_go_on_past_a_failing_client(log_lines):
    hub = started_hub()
    hub.publish(event(1))
    broken = Broken("send_control")
    others = [Client(), Client()]
    for client in (others[0], broken, others[1]):
        hub.subscribe(client)
    hub.send_positions(idle=0)
    for client in others:
        assert client.controls == [{"type": "position", "resume_after": token(1)}]
    assert_cut_once(broken, hub, log_lines)


def test_a_rider_failing_during_a_catch_up_does_not_stop_the_others(log_lines):
    hub = started_hub()
    catchup = CatchUp(hub, open_stream=None, streams=1, missing_image=lambda exc: None, per_peer=1)
    job = Job(token(0), ("peer x",))
    broken = Broken("replay")
    riders = [Client(), broken, Client()]
    for rider in riders:
        job.add(rider, token(0))
    for n in (1, 2, 3):
        catchup._deliver(job, secret_event(n))
    for rider in (riders[0], riders[2]):
        assert rider.received == [token(1), token(2), token(3)]
    assert broken not in job.clients
    assert_cut_once(broken, hub, log_lines)


@pytest.mark.parametrize("step", ["replay", "send_control"])
def test_hand_over_and_resync_go_on_past_a_failing_rider(step, log_lines):
    hub = started_hub()
    for n in (1, 2, 3):
        hub.publish(event(n))
    catchup = CatchUp(hub, open_stream=None, streams=1, missing_image=lambda exc: None, per_peer=1)
    job = Job(token(0), ("peer x",))
    broken = Broken(step)
    riders = [Client(), broken, Client()]
    for rider in riders:
        job.add(rider, token(1))
    if step == "replay":
        catchup._hand_over(job, token(1))
        expected = [token(2), token(3)]
    else:
        catchup._resync(job, "history_lost")
        expected = []
    hub.publish(event(4))
    for rider in (riders[0], riders[2]):
        assert rider.received == [*expected, token(4)]
        assert rider in hub.clients
    assert_cut_once(broken, hub, log_lines)


class Failing(Exception):
    """Not a PyMongoError: what a bug in the catch-up itself raises."""


class FailingValue(ValueError):
    """A bug's ValueError, which is not fragments' OutOfOrder: it too must not be retried."""


@pytest.mark.parametrize("failing", [Failing, FailingValue])
@pytest.mark.parametrize("where", ["open", "read"])
async def test_a_catch_up_failing_for_any_reason_hands_its_riders_on(where, failing, log_lines):
    hub = started_hub()

    class Stream:
        resume_token = None
        alive = True

        async def try_next(self):
            raise failing("boom")

        async def close(self):
            pass

    async def open_stream(**kwargs):
        if where == "open":
            raise failing("boom")
        return Stream()

    catchup = CatchUp(hub, open_stream, streams=1, missing_image=lambda exc: None, per_peer=1)
    riders = [Client(), Client()]
    for rider in riders:
        catchup.add(rider, token(0))
    task = catchup.jobs[0].task
    async with asyncio.timeout(5):
        await asyncio.wait({task})
    hub.publish(event(1))
    for rider in riders:
        assert rider.controls == [{"type": "resync", "reason": "resume_failed"}]
        assert rider.received == [token(1)]
    assert not catchup.jobs
    assert sum("catch-up" in line for line in log_lines) == 1, log_lines
