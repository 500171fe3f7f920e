"""The hub routes events through the subscription index (issue 14): its work per event grows
with the subscriptions the event concerns, not with the subscriptions there are, and every
client still gets exactly the plain ``select`` of its subscription over the events after its
starting point — live, replayed, from a relay ahead, and riding a catch-up."""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changerelay import events as ev
from changerelay.catchup import CatchUp, Job
from changerelay.filters import compile_filter
from changerelay.hub import Hub
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription
from tests.support import batches, examples, subscriptions, token


class Recorder:
    """A client that keeps what it is handed, in order, as (kind, id, bytes)."""

    encoding = "ws"

    def __init__(self, subscription: Subscription):
        self.subscription = subscription
        self.got: list[tuple[str, str, bytes]] = []
        self.controls: list[dict] = []
        self.last_send = 0.0
        self.told = None
        self.sent = None
        self.closed = False
        self.backlog = None
        self.peer = "test"

    def pack(self, events):
        return b""

    def deliver(self, events, payload):
        self.got += [seen(item) for item in events]

    def replay(self, events):
        self.deliver(events, b"")

    def send_control(self, message, token=None):
        self.controls.append(json.loads(message))

    def fail(self):
        raise AssertionError("no client fails here")


def seen(item: ev.Delivery) -> tuple[str, str, bytes]:
    return type(item).__name__, item.token, item.data


def new_hub(call_soon=lambda flush: flush(), max_events=10_000) -> Hub:
    hub = Hub(call_soon, lambda client, after: None, max_events, 1 << 26)
    hub.start(token(0))
    return hub


def owner(n: int, kind: str = "filter") -> Subscription:
    spec = {"fullDocument.owner": f"u{n}"}
    if kind == "rule":
        return Subscription(access=AccessRule(spec, post_images=True))
    return Subscription(filter=compile_filter(spec))


def owned(n: int, user: int) -> ev.Event:
    return ev.encode_change({"_id": {"_data": token(n)}, "operationType": "insert",
                             "ns": {"db": "db", "coll": "c"}, "documentKey": {"_id": n},
                             "fullDocument": {"_id": n, "owner": f"u{user}"}})


def counted(subscription: Subscription, examined: Counter) -> Subscription:
    """``subscription`` counting the events it is asked to decide."""
    select = subscription.select

    def counting(events):
        examined[subscription] += len(events)
        return select(events)

    subscription.select = counting
    return subscription


# -- the work per event ------------------------------------------------------------------------

def test_live_events_are_decided_by_the_groups_they_concern_alone():
    scheduled: list = []
    hub = new_hub(call_soon=scheduled.append)
    examined: Counter = Counter()
    clients = [Recorder(counted(owner(n, kind), examined))
               for n in range(500) for kind in ("filter", "rule")]
    for client in clients:
        hub.subscribe(client)
    for n in range(1, 11):  # one at a time
        hub.publish(owned(n, 7 * n))
        scheduled.pop()()
    for n in range(11, 31):  # one batch
        hub.publish(owned(n, 7 * n))
    scheduled.pop()()
    assert sum(examined.values()) == 2 * 30  # each event: its owner's filter and rule only
    for client in clients:
        expected = [seen(item) for item in client.subscription.select(
            [owned(n, 7 * n) for n in range(1, 31)])]
        assert client.got == expected


def test_each_indexed_path_is_walked_once_per_event(monkeypatch):
    """The log's postings and the flush's routing share one walk of the event (review of
    issue 14: they walked each indexed path twice)."""
    from changerelay import filters, index, postings

    walks: Counter = Counter()
    real = filters.reached

    def counting(document, parts):
        walks[parts] += 1
        return real(document, parts)

    for module in (filters, index, postings):
        monkeypatch.setattr(module, "reached", counting, raising=False)
    scheduled: list = []
    hub = new_hub(call_soon=scheduled.append)
    clients = [Recorder(owner(n)) for n in range(20)]
    for client in clients:
        hub.subscribe(client)
    for n in range(1, 6):  # one at a time
        hub.publish(owned(n, n))
        scheduled.pop()()
    for n in range(6, 16):  # one batch
        hub.publish(owned(n, n))
    scheduled.pop()()
    assert walks == {("fullDocument", "owner"): 15}
    for client in clients:
        expected = [seen(item) for item in client.subscription.select(
            [owned(n, n) for n in range(1, 16)])]
        assert client.got == expected


def test_a_subscription_whose_clients_all_left_is_asked_nothing():
    hub = new_hub()
    examined: Counter = Counter()
    gone = [Recorder(counted(owner(n), examined)) for n in range(100)]
    for client in gone:
        hub.subscribe(client)
    for client in gone:
        hub.unsubscribe(client)
    stays = Recorder(counted(owner(1), examined))
    hub.subscribe(stays)
    for n in range(1, 101):
        hub.publish(owned(n, n))
    assert examined == {stays.subscription: 1}
    assert stays.got == [seen(owned(1, 1))]


def test_clients_from_a_relay_ahead_are_decided_alone_too():
    hub = new_hub()
    hub.publish(owned(1, 0))
    examined: Counter = Counter()
    clients = [Recorder(counted(owner(n), examined)) for n in range(1000)]
    for client in clients:
        assert hub.resume(client, token(3))  # a relay that has seen up to 3
    for n in range(2, 8):
        hub.publish(owned(n, n))
    assert sum(examined.values()) <= 4  # events 4-7, one owner each
    assert [client.got for client in clients[:8]] == [
        [], [], [], [], *[[seen(owned(n, n))] for n in range(4, 8)]]


def test_a_resuming_client_is_replayed_from_the_events_its_subscription_may_concern():
    hub = new_hub()
    for n in range(1000):
        hub.subscribe(Recorder(owner(n)))
        hub.subscribe(Recorder(owner(n, "rule")))
    for n in range(1, 3001):
        hub.publish(owned(n, n % 1000))
    examined: Counter = Counter()
    filtered = Recorder(counted(owner(7), examined))
    ruled = Recorder(counted(owner(7, "rule"), examined))
    unknown = Recorder(counted(owner(5000), examined))
    for client in (filtered, ruled, unknown):
        assert hub.resume(client, token(1000))
    assert sum(examined.values()) == 2 + 2  # events 1007 and 2007, for each; none for 5000
    assert filtered.got == ruled.got == [seen(owned(n, 7)) for n in (1007, 2007)]


def test_replay_from_before_a_path_was_looked_up_finds_the_events_before_too():
    hub = new_hub()
    for n in range(1, 11):
        hub.publish(owned(n, n % 5))
    hub.subscribe(Recorder(owner(3)))  # from here on the log files events by owner
    for n in range(11, 21):
        hub.publish(owned(n, n % 5))
    early, late = Recorder(owner(3)), Recorder(owner(3))
    assert hub.resume(early, token(0)) and hub.resume(late, token(10))
    assert early.got == [seen(owned(n, 3)) for n in (3, 8, 13, 18)]
    assert late.got == [seen(owned(n, 3)) for n in (13, 18)]


def test_replay_after_the_log_has_moved_on_many_times():
    """Far more events than the log holds: what the look-ups find is what is still in it."""
    hub = new_hub(max_events=100)
    hub.subscribe(Recorder(owner(3)))
    for n in range(1, 10_001):
        hub.publish(owned(n, n % 10))
    client = Recorder(owner(3))
    assert not hub.resume(client, token(9000))  # before the log: catch-up's
    assert hub.resume(client, token(9950))
    assert client.got == [seen(owned(n, 3)) for n in (9953, 9963, 9973, 9983, 9993)]


def test_catch_up_riders_are_decided_by_the_subscriptions_an_event_concerns():
    hub = new_hub()
    examined: Counter = Counter()
    catchup = CatchUp(hub, open_stream=None, streams=1, missing_image=lambda exc: None,
                      per_peer=1)
    job = Job(token(0), ("peer",))
    riders = [Recorder(counted(owner(n), examined)) for n in range(1000)]
    for rider in riders:
        job.add(rider, token(0))
    for n in range(1, 21):
        catchup._deliver(job, owned(n, n))
    assert sum(examined.values()) == 20
    assert riders[5].got == [seen(owned(5, 5))] and riders[500].got == []


# -- the property: routed delivery is the plain select, on every path -------------------------

JOINS = st.tuples(st.sampled_from(["live", "replay", "ahead"]), st.integers(0, 8),
                  st.integers(1, 4))


@settings(max_examples=examples(300), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.booleans().flatmap(lambda post: st.lists(
           st.tuples(subscriptions(st.just(post)), JOINS), min_size=1, max_size=8)),
       batches(max_size=8), st.lists(st.booleans(), min_size=8, max_size=8),
       st.sampled_from([3, 10_000]))
def test_every_client_gets_select_over_the_events_after_its_start(clients, events, flushes,
                                                                   capacity):
    """Clients join live, replay from inside the log or come from a relay ahead, at any point;
    events are flushed one at a time or in batches. Each client gets its subscription's select
    over the events after where it started, in order: nothing the index left out."""
    scheduled: list = []
    hub = new_hub(call_soon=scheduled.append, max_events=capacity)
    starts: list[tuple[Recorder, int]] = []
    for published in range(len(events) + 1):
        for subscription, (how, at, offset) in clients:
            if min(at, len(events)) != published:
                continue
            client = Recorder(subscription)
            if how == "live":
                hub.subscribe(client)
                starts.append((client, published))
            elif how == "replay":
                start = max(0, published - offset)
                if hub.resume(client, token(start)):  # else before the log: catch-up's
                    starts.append((client, start))
            else:
                assert hub.resume(client, token(published + offset))
                starts.append((client, published + offset))
        if published < len(events):
            hub.publish(events[published])
            if flushes[published] and scheduled:
                scheduled.pop()()
    hub.flush()
    for client, start in starts:
        expected = client.subscription.select(events[start:])
        assert client.got == [seen(item) for item in expected], client.subscription


@settings(max_examples=examples(200), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans().flatmap(lambda post: st.lists(
           st.tuples(subscriptions(st.just(post)), st.integers(0, 3)), min_size=1, max_size=8)),
       batches(max_size=6))
def test_every_rider_gets_select_over_the_events_after_its_position(riders, events):
    hub = new_hub()
    catchup = CatchUp(hub, open_stream=None, streams=1, missing_image=lambda exc: None,
                      per_peer=1)
    job = Job(token(0), ("peer",))
    joined = [(Recorder(subscription), start) for subscription, start in riders]
    for rider, start in joined:
        job.add(rider, token(start))
    for event in events:
        catchup._deliver(job, event)
    for rider, start in joined:
        expected = rider.subscription.select(events[start:])
        assert rider.got == [seen(item) for item in expected], rider.subscription
