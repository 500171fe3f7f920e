"""metrics.py and what feeds it, in process: the hub's tally per group per flush, the causes of
disconnects, the scraper's token, the exposition."""

from __future__ import annotations

import datetime
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from changerelay import events as ev
from changerelay.admission import Refusal
from changerelay.disconnect import CLIENT_CLOSED, CLOSES, cause_of
from changerelay.filters import compile_filter
from changerelay.hub import Hub
from changerelay.metrics import Metrics, State, check_scraper, transport
from changerelay.subscription import Subscription
from tests.support import token

EVERYTHING = Subscription()


class Client:
    """A hub subscriber that may be cut off by its own delivery."""

    def __init__(self, encoding: str, hub: Hub | None = None, cut_off: bool = False,
                 subscription: Subscription = EVERYTHING):
        self.encoding = encoding
        self.subscription = subscription
        self.last_send = 0.0
        self.told = self.sent = None
        self.announced = True  # its ready: a control message, which no metric here counts
        self.hub = hub
        self.cut_off = cut_off
        self.received = 0

    def pack(self, events):
        return b"x" * (10 * len(events))

    def weight(self, event):
        return 7

    def deliver(self, events, payload):
        if self.cut_off:
            self.hub.unsubscribe(self)  # as Client.cut_off does, through the relay's detach
            return
        self.received += len(events)

    def replay(self, events):
        self.received += len(events)

    def send_control(self, message, token=None):
        pass


def change(n: int, wall: datetime.datetime | None = None, owner: str = "a") -> ev.Event:
    document = {"_id": {"_data": token(n)}, "operationType": "insert",
                "ns": {"db": "db", "coll": "c"}, "documentKey": {"_id": n},
                "fullDocument": {"_id": n, "owner": owner}}
    if wall is not None:
        document["wallTime"] = wall
    return ev.encode_change(document)


def samples(metrics: Metrics) -> dict[tuple, float]:
    text = metrics.exposition().decode()
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def refresh(metrics: Metrics, **given) -> dict[tuple, float]:
    values = dict(clients={}, catchup_streams=0, buffered=0, up=True, lag=None, received=0,
                  reopens=0)
    values.update(given)
    metrics.refresh(State(**values))
    return samples(metrics)


def hub_with(metrics: Metrics, call_soon=lambda flush: flush()) -> Hub:
    hub = Hub(call_soon, lambda client, after: None, 10_000, 1 << 26, metrics)
    hub.start(token(0))
    return hub


def test_deliveries_and_bytes_count_each_client_of_each_encoding():
    metrics = Metrics()
    hub = hub_with(metrics)
    clients = [Client("ws"), Client("ws-deflate"), Client("sse"), Client("sse-chunked"),
               Client("ws")]
    for client in clients:
        hub.subscribe(client)
    for n in range(1, 4):
        hub.publish(change(n))
    got = refresh(metrics)
    assert got[("changerelay_deliveries_total", ("transport", "ws"))] == 9
    assert got[("changerelay_deliveries_total", ("transport", "sse"))] == 6
    assert got[("changerelay_bytes_sent_total", ("transport", "ws"))] == 90
    assert got[("changerelay_bytes_sent_total", ("transport", "sse"))] == 60
    assert got == refresh(metrics)  # counted once, however often refreshed


def test_a_client_cut_off_by_its_delivery_is_not_counted():
    metrics = Metrics()
    hub = hub_with(metrics)
    slow = Client("ws", hub, cut_off=True)
    hub.subscribe(slow)
    hub.subscribe(Client("ws"))
    hub.publish(change(1))
    hub.publish(change(2))  # the slow client left during the first flush
    assert refresh(metrics)[("changerelay_deliveries_total", ("transport", "ws"))] == 2


def test_unsubscribing_twice_leaves_the_others_counted():
    metrics = Metrics()
    hub = hub_with(metrics)
    gone, staying = Client("ws"), Client("ws")
    hub.subscribe(gone)
    hub.subscribe(staying)
    hub.unsubscribe(gone)
    hub.unsubscribe(gone)  # the relay detaches a client more than once
    hub.publish(change(1))
    assert refresh(metrics)[("changerelay_deliveries_total", ("transport", "ws"))] == 1


def test_replays_count_per_client_with_their_weight():
    metrics = Metrics()
    hub = hub_with(metrics)
    for n in range(1, 6):
        hub.publish(change(n))
    resumed = Client("sse")
    assert hub.resume(resumed, token(2))
    got = refresh(metrics)
    assert got[("changerelay_deliveries_total", ("transport", "sse"))] == 3
    assert got[("changerelay_bytes_sent_total", ("transport", "sse"))] == 21
    assert resumed.received == 3


def test_latency_is_observed_once_per_group_per_flush():
    metrics = Metrics()
    flushes = []
    hub = hub_with(metrics, flushes.append)  # flushed when the test says
    committed = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # as PyMongo decodes
    for owner in ("a", "b"):
        subscription = Subscription(filter=compile_filter({"fullDocument.owner": owner}))
        for _ in range(3):
            hub.subscribe(Client("ws", subscription=subscription))
    for n in range(1, 5):
        hub.publish(change(n, committed - datetime.timedelta(seconds=2), "ab"[n % 2]))
    flushes.pop()()  # one flush for the four
    hub.publish(change(9))  # no wallTime (MongoDB before 6.0): nothing to observe
    flushes.pop()()
    got = refresh(metrics)
    assert got[("changerelay_delivery_latency_seconds_count",)] == 2  # 2 groups, 1 flush
    assert got[("changerelay_deliveries_total", ("transport", "ws"))] == 4 * 3 + 3
    assert 2 * 2 <= got[("changerelay_delivery_latency_seconds_sum",)] < 2 * 30
    assert got[("changerelay_delivery_latency_seconds_bucket", ("le", "1.0"))] == 0


def test_commit_time_reads_wall_time_as_utc():
    wall = datetime.datetime(2026, 12, 1, 6, 3, 4, 250000)
    assert change(1, wall).committed == datetime.datetime(
        2026, 12, 1, 6, 3, 4, 250000, tzinfo=datetime.UTC).timestamp()
    assert change(1, wall).leave.committed == change(1, wall).committed
    assert change(1).committed is None


def test_gauges_and_running_totals():
    metrics = Metrics()
    got = refresh(metrics, clients={"ws": 3, "sse": 1}, catchup_streams=2, buffered=40,
                  up=False, lag=0.25, received=100, reopens=1)
    assert got[("changerelay_clients", ("transport", "ws"))] == 3
    assert got[("changerelay_clients", ("transport", "sse"))] == 1
    assert got[("changerelay_catchup_streams",)] == 2
    assert got[("changerelay_replay_buffer_events",)] == 40
    assert got[("changerelay_source_up",)] == 0
    assert got[("changerelay_source_lag_seconds",)] == 0.25
    assert got[("changerelay_events_received_total",)] == 100
    assert got[("changerelay_source_reopens_total",)] == 1
    got = refresh(metrics, received=130, reopens=1, up=True)
    assert got[("changerelay_events_received_total",)] == 130
    assert got[("changerelay_source_reopens_total",)] == 1
    assert got[("changerelay_source_up",)] == 1
    assert got[("changerelay_clients", ("transport", "ws"))] == 0


def test_refusals_and_disconnects_by_label():
    metrics = Metrics()
    for status in (400, 400, 421):
        metrics.refused(status)
    metrics.disconnected("slow_consumer")
    got = refresh(metrics)
    assert got[("changerelay_handshake_refusals_total", ("status", "400"))] == 2
    assert got[("changerelay_handshake_refusals_total", ("status", "421"))] == 1
    assert got[("changerelay_disconnects_total", ("reason", "slow_consumer"))] == 1


@pytest.mark.parametrize("cause", sorted(CLOSES))
def test_every_close_is_its_own_cause(cause):
    close = CLOSES[cause]
    if close.reason is not None:
        assert cause_of(close.frame) == cause
    else:  # the reason names the fault: the code alone tells the cause
        assert cause_of((close.code, "a reason naming the fault")) == cause


def test_no_close_is_the_client_leaving():
    assert cause_of(None) == CLIENT_CLOSED
    assert CLIENT_CLOSED not in CLOSES


def test_transports_of_encodings():
    assert [transport(e) for e in ("ws", "ws-deflate", "sse", "sse-chunked")] == [
        "ws", "ws", "sse", "sse"]


def test_the_scraper_token():
    check_scraper(None, None)
    check_scraper("anything", None)
    check_scraper("s3cret", "s3cret")
    with pytest.raises(Refusal) as missing:
        check_scraper(None, "s3cret")
    assert missing.value.status == 401 and missing.value.code == "missing_token"
    with pytest.raises(Refusal) as wrong:
        check_scraper("s3creT", "s3cret")
    assert wrong.value.status == 403
    assert "s3cret" not in json.dumps(json.loads(wrong.value.body()))
