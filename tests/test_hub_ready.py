"""``ready`` (issue 15): every connection is told once, when its live feed is attached — after
any replay or catch-up — from which id on every write it may see reaches it."""

from __future__ import annotations

import json

from changerelay.hub import Hub
from changerelay.subscription import Subscription
from tests.support import FakeClient, event, token
from tests.test_hub import ONLY_C, hwm, keyed


def flush_now(flush):
    flush()


def new_hub(max_events=10_000, behind=lambda client, after: None) -> Hub:
    return Hub(flush_now, behind, max_events, 64 * 1024 * 1024)


class Ordered(FakeClient):
    """Events and control messages in the one order the client got them."""

    def __init__(self, subscription=None):
        super().__init__(subscription)
        self.log: list[str] = []

    def send(self, payload):
        tokens = json.loads(payload)
        self.log.extend(tokens)
        super().send(json.dumps(tokens).encode())

    def send_control(self, message, token=None):
        self.log.append(json.loads(message)["type"])
        super().send_control(message, token)


def test_a_live_client_is_told_ready_once_at_the_hubs_position():
    hub = new_hub()
    hub.start(token(0))
    hub.publish(event(1))
    client = Ordered()
    hub.subscribe(client)
    assert client.readies == [{"type": "ready", "resume_after": token(1)}]
    hub.publish(event(2))
    hub.start(token(3), resync=True)  # history lost: a resync, not a second ready
    hub.publish(event(4))
    assert client.log == ["ready", token(2), "resync", token(4)]
    assert len(client.readies) == 1


def test_a_resuming_client_is_told_ready_after_its_replay():
    hub = new_hub()
    hub.start(token(0))
    for n in range(1, 4):
        hub.publish(event(n))
    client = Ordered()
    assert hub.resume(client, token(1))
    hub.publish(event(4))
    assert client.log == [token(2), token(3), "ready", token(4)]
    assert client.readies == [{"type": "ready", "resume_after": token(3)}]


def test_a_client_resuming_from_history_is_told_ready_when_it_goes_live():
    behind = []
    hub = new_hub(max_events=2, behind=lambda client, after: behind.append((client, after)))
    hub.start(token(0))
    for n in range(1, 6):
        hub.publish(event(n))
    client = Ordered()
    assert not hub.resume(client, token(1))  # the caller catches it up from MongoDB first
    assert client.readies == []
    client.replay([event(2), event(3)])  # what a catch-up delivers, then hands over
    assert hub.resume(client, token(3))
    assert client.log == [token(2), token(3), token(4), token(5), "ready"]


def test_a_client_that_joins_before_the_stream_opens_is_told_once_it_has():
    hub = new_hub()
    client = Ordered()
    hub.subscribe(client)
    waiting = Ordered()
    assert hub.resume(waiting, token(3))
    assert client.readies == waiting.readies == []
    hub.start(token(3))
    assert client.readies == [{"type": "ready", "resume_after": token(3)}]
    assert waiting.readies == [{"type": "ready", "resume_after": token(3)}]


def test_a_client_that_leaves_before_the_stream_opens_is_not_told():
    hub = new_hub()
    client = Ordered()
    hub.subscribe(client)
    hub.unsubscribe(client)
    hub.start(token(3))
    assert client.readies == []


def test_a_client_ahead_of_the_hub_is_told_once_the_stream_passes_its_point():
    hub = new_hub()
    hub.start(hwm(1))
    hub.publish(keyed(5, 1))
    client = Ordered()
    assert hub.resume(client, keyed(7, 2).token)  # from a relay a moment ahead
    assert client.readies == []
    hub.publish(keyed(7, 2))
    hub.publish(keyed(8, 3))
    assert client.log == ["ready", keyed(8, 3).token]
    assert client.readies == [{"type": "ready", "resume_after": keyed(7, 2).token}]


def test_a_live_query_that_announced_itself_is_not_told_again():
    hub = new_hub()
    hub.start(token(0))
    client = Ordered()
    client.announced = True  # it sent its own ready, with its snapshot
    hub.subscribe(client)
    assert client.readies == []


def test_a_restricted_client_is_told_only_an_id_it_may_know():
    hub = new_hub()
    hub.start(hwm(1))
    for event_ in (keyed(5, 1, coll="c"), keyed(7, 2, coll="other")):
        hub.publish(event_)
    mine = Ordered(ONLY_C)
    hub.subscribe(mine)
    assert mine.readies == [{"type": "ready", "resume_after": hwm(7)}]  # not the other's event
    everyone = Ordered(Subscription())
    hub.subscribe(everyone)
    assert everyone.readies == [{"type": "ready", "resume_after": keyed(7, 2).token}]
