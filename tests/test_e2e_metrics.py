"""``GET /metrics``: Prometheus counters equal to what the relay did, on one process or many."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import pytest

from changerelay.primary import TestPrimary
from tests.support import (
    SSE,
    WS,
    free_port,
    metrics,
    metrics_until,
    wait_metrics,
    websocket_by_hand,
)

pytestmark = pytest.mark.e2e

EVENTS = 100


def ws_frame_size(text: str) -> int:
    """Bytes of a server's (unmasked) text frame carrying ``text`` (RFC 6455 §5.2)."""
    length = len(text.encode())
    return length + (2 if length < 126 else 4 if length < 1 << 16 else 10)


async def ws_event_bytes(client: WS, count: int) -> int:
    """Read ``count`` events; the bytes of their frames."""
    total = seen = 0
    while seen < count:
        message = await asyncio.wait_for(client.conn.read_message(), 20)
        assert message is not None, client.close_code
        if "operationType" in json.loads(message):
            total += ws_frame_size(message)
            seen += 1
    return total


async def sse_event_bytes(stream: SSE, count: int) -> int:
    """Read ``count`` events from a chunked event stream; the bytes of the chunks that carried
    them, chunk framing included (each flush is one chunk)."""
    total = seen = 0
    while seen < count:
        head = await asyncio.wait_for(stream.reader.readuntil(b"\r\n"), 20)
        data = await stream.reader.readexactly(int(head.strip(), 16) + 2)
        records = data[:-2].split(b"\n\n")
        events = [r for r in records if r.startswith(b"id: ") and b"\nevent: " not in r]
        if events:
            assert len(events) == len([r for r in records if r]), data  # events only
            total += len(head) + len(data)
            seen += len(events)
    return total


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


async def test_counters_equal_what_was_sent_to_three_websockets_and_one_event_stream(
        mongo, relay_factory):
    # A closed event stream is noticed at the next write: a heartbeat a second.
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, SSE_HEARTBEAT=1)
    relay.wait_ready()
    websockets = [await WS.connect(relay.ws_url) for _ in range(3)]
    stream = await SSE.open(relay.port)
    await metrics_until(relay, lambda s: value(s, "changerelay_clients", transport="ws") == 3
                 and value(s, "changerelay_clients", transport="sse") == 1)
    collection = mongo.client[mongo.db].c
    for start in range(0, EVENTS, 10):  # several flushes, not one
        collection.insert_many([{"_id": n, "n": n} for n in range(start, start + 10)])
    ws_bytes = [await ws_event_bytes(client, EVENTS) for client in websockets]
    sse_bytes = await sse_event_bytes(stream, EVENTS)

    samples = await asyncio.to_thread(metrics, relay)
    assert value(samples, "changerelay_events_received_total") == EVENTS
    assert value(samples, "changerelay_deliveries_total", transport="ws") == 3 * EVENTS
    assert value(samples, "changerelay_deliveries_total", transport="sse") == EVENTS
    assert value(samples, "changerelay_bytes_sent_total", transport="ws") == sum(ws_bytes)
    assert value(samples, "changerelay_bytes_sent_total", transport="sse") == sse_bytes
    assert value(samples, "changerelay_clients", transport="ws") == 3
    assert value(samples, "changerelay_clients", transport="sse") == 1
    assert value(samples, "changerelay_source_up") == 1
    assert value(samples, "changerelay_source_reopens_total") == 0
    assert value(samples, "changerelay_catchup_streams") == 0
    assert value(samples, "changerelay_replay_buffer_events") == EVENTS
    assert 0 <= value(samples, "changerelay_source_lag_seconds") < 30
    # One group (every client has the same subscription): one observation per flush with
    # events, never one per delivery.
    observed = value(samples, "changerelay_delivery_latency_seconds_count")
    assert 1 <= observed <= EVENTS
    assert value(samples, "changerelay_delivery_latency_seconds_bucket", le="+Inf") == observed
    assert 0 <= value(samples, "changerelay_delivery_latency_seconds_sum") < 30 * observed
    for client in websockets:
        client.close()
        await client.closed()
    stream.close()
    await stream.writer.wait_closed()
    await metrics_until(relay, lambda s: value(s, "changerelay_clients", transport="ws") == 0
                 and value(s, "changerelay_clients", transport="sse") == 0
                 and value(s, "changerelay_disconnects_total", reason="client_closed") == 4)


async def test_a_resumed_client_counts_its_replay(mongo, relay):
    collection = mongo.client[mongo.db].c
    first = await WS.connect(relay.ws_url)
    collection.insert_many([{"_id": n} for n in range(5)])
    frames = await first.changes(5)
    resumed = await WS.connect(f"{relay.ws_url}?resume_after={frames[1]['_id']['_data']}")
    await resumed.changes(3)
    await metrics_until(
        relay, lambda s: value(s, "changerelay_deliveries_total", transport="ws") == 8)


def refused(relay, path: str, status: int, headers: dict | None = None) -> None:
    response = relay.get(path, headers=headers)
    assert response.code == status, response.body
    assert set(response.json()) == {"error", "message"}


async def test_refusals_by_status_and_disconnects_by_reason(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WS_PING_INTERVAL=1,
                          SSE_HEARTBEAT=1)
    relay.wait_ready()
    bystander = await WS.connect(relay.ws_url)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    refused(relay, "/socket?filter={", 400, upgrade)
    refused(relay, "/events?ops=nope", 400)
    refused(relay, "/events", 421, {"Host": "evil.example"})
    refused(relay, "/socket?filter={", 400)  # a probe (no Upgrade): the client asking why
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as crowded:
        # Refused before Tornado reads it (gate.py): too many header lines.
        crowded.sendall(b"GET /socket HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        + b"".join(b"X-%d: 1\r\n" % n for n in range(200)) + b"\r\n")
        assert crowded.recv(4096).startswith(b"HTTP/1.1 431 ")
    silent = websocket_by_hand(relay.port)  # answers no ping
    broken = websocket_by_hand(relay.port)
    broken.sendall(struct.pack("!BB", 0x81, 1) + b"x")  # unmasked: RFC 6455 §5.1
    closing = await WS.connect(relay.ws_url)
    closing.close()
    await closing.closed()
    stream = await SSE.open(relay.port)
    stream.close()
    await stream.writer.wait_closed()

    samples = await metrics_until(
        relay, lambda s: value(s, "changerelay_disconnects_total", reason="ping_timeout") == 1
        and value(s, "changerelay_disconnects_total", reason="protocol_error") == 1
        and value(s, "changerelay_disconnects_total", reason="client_closed") == 2)
    assert value(samples, "changerelay_handshake_refusals_total", status="400") == 2
    assert value(samples, "changerelay_handshake_refusals_total", status="421") == 1
    assert value(samples, "changerelay_handshake_refusals_total", status="431") == 1
    mongo.client[mongo.db].c.insert_one({"_id": "after"})
    [frame] = await bystander.changes(1)
    assert frame["documentKey"] == {"_id": "after"}
    samples = await asyncio.to_thread(metrics, relay)
    assert value(samples, "changerelay_clients", transport="ws") == 1
    silent.close()
    broken.close()


@pytest.mark.fault
def test_source_up_follows_mongodb_down_and_back(relay_factory):
    port = free_port()
    primary = TestPrimary(port=port).start()
    try:
        relay = relay_factory(MONGO_SRV=primary.uri + "&serverSelectionTimeoutMS=500")
        relay.wait_ready()
        wait_metrics(relay, lambda s: value(s, "changerelay_source_up") == 1)
    finally:
        primary.stop()
    wait_metrics(relay, lambda s: value(s, "changerelay_source_up") == 0, timeout=30)
    with TestPrimary(port=port):
        samples = wait_metrics(relay, lambda s: value(s, "changerelay_source_up") == 1,
                               timeout=30)
        assert value(samples, "changerelay_source_reopens_total") >= 1


async def test_one_scrape_sums_every_worker(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REUSE_PORT=2)
    deadline = time.monotonic() + 30
    ready = set()
    while len(ready) < 2:  # each worker has its own change stream
        status = relay.ready()
        if status.get("source") == "open":
            ready.add(status["pid"])
        assert time.monotonic() < deadline, relay.log()
    clients = [await WS.connect(relay.ws_url) for _ in range(8)]
    mongo.client[mongo.db].c.insert_many([{"_id": n} for n in range(50)])
    for client in clients:
        await client.changes(50)
    # Each worker received the 50 events: only a sum over both says 100.
    for _ in range(4):  # whichever worker answers, the same totals
        await metrics_until(relay, lambda s: value(s, "changerelay_events_received_total") == 100
                     and value(s, "changerelay_deliveries_total", transport="ws") == 400
                     and value(s, "changerelay_clients", transport="ws") == 8)
    relay.proc.send_signal(15)
    assert relay.proc.wait(10) == 0


def test_metrics_token_refusals(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, METRICS_TOKEN="s3cret-scrape")
    relay.wait_ready()
    missing = relay.get("/metrics")
    assert missing.code == 401 and missing.json()["error"] == "missing_token"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = relay.get("/metrics", headers={"Authorization": "Bearer s3cret-scrapf"})
    assert wrong.code == 403 and wrong.json()["error"] == "metrics_token_mismatch"
    assert "s3cret" not in wrong.body.decode()
    samples = metrics(relay, headers={"Authorization": "Bearer s3cret-scrape"})
    assert value(samples, "changerelay_source_up") == 1


def test_metrics_answer_without_a_token_when_none_is_set(relay):
    assert ("changerelay_source_up",) in metrics(relay)
