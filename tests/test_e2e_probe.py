"""``GET /socket`` without ``Upgrade``: the handshake's admission, answered for browsers to read.

A browser does not show a page why its WebSocket was refused (it reports 1006 and nothing else),
so the JavaScript client fetches the same URL without ``Upgrade``: the relay runs exactly the
admission of the handshake and answers its JSON refusal, or 204 when the handshake would be
admitted. Each case here compares the two answers byte for byte, with a client connected
alongside that must keep receiving.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import jwt
import pytest

from tests.support import WS

pytestmark = pytest.mark.e2e

SECRET = "probe-secret-" + "x" * 32
Q = urllib.parse.quote
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def token(ttl: int = 300, key: str = SECRET) -> str:
    return jwt.encode({"sub": "prober", "exp": int(time.time()) + ttl}, key, algorithm="HS256")


def request(relay, target: str, headers: dict) -> tuple[int, bytes, http.client.HTTPMessage]:
    """GET with exactly these headers (and Host); a 101 is answered without reading a body."""
    connection = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = response.read() if response.status != 101 else b""
        return response.status, body, response.headers
    finally:
        connection.close()


def probe_and_handshake(relay, query: str, headers: dict | None = None):
    """``(probe, handshake)``: the same request without and with a WebSocket upgrade."""
    target = f"/socket?{query}" if query else "/socket"
    headers = headers or {}
    return request(relay, target, headers), request(relay, target, {**headers, **UPGRADE})


REFUSED = [
    # (what, query, headers, status, error)
    ("malformed filter", f"filter={Q('{nope')}", {}, 400, "invalid_json"),
    ("unknown operator", "filter=" + Q(json.dumps({"fullDocument.a": {"$where": "1"}})), {}, 400,
     "unknown_operator"),
    ("unknown parameter", "since=yesterday", {}, 400, "unknown_parameter"),
    ("namespace outside the scope", "ns=elsewhere", {}, 400, "ns_outside_scope"),
    ("malformed resume_after", "resume_after=xyz", {}, 400, "invalid_resume_after"),
    ("query over 32 KiB", "ops=" + "i" * (33 * 1024), {}, 414, "query_too_large"),
    ("cross-origin page", "", {"Origin": "http://evil.example"}, 403, "origin_not_allowed"),
    ("a Host it does not answer to", "", {"Host": "evil.example"}, 421, "host_not_allowed"),
]


async def test_a_plain_get_answers_what_the_handshake_would(mongo, relay):
    bystander = await WS.connect(relay.ws_url)
    orders = mongo.client[mongo.db].orders
    for number, (what, query, headers, status, error) in enumerate(REFUSED):
        (got, body, _), (refused, refusal, _) = probe_and_handshake(relay, query, headers)
        assert (got, refused) == (status, status), what
        assert json.loads(body)["error"] == error, what
        assert body == refusal, what
        orders.insert_one({"_id": number})
        [change] = await bystander.changes(1)
        assert change["documentKey"] == {"_id": number}, what

    for query in ("", f"ns={mongo.db}.orders&ops=insert,update",
                  "filter=" + Q(json.dumps({"fullDocument.total": {"$gt": 5}}))):
        (got, body, headers), _ = probe_and_handshake(relay, query)
        assert (got, body) == (204, b""), query
        assert headers["Cache-Control"] == "no-store"
    assert relay.ready()["clients"] == 1  # the bystander: a probe is no connection


def test_a_foreign_upgrade_is_still_told_to_speak_websocket(relay):
    status, body, _ = request(relay, "/socket", {"Upgrade": "h2c", "Connection": "Upgrade"})
    assert status == 400 and json.loads(body)["error"] == "websocket_required"


async def test_the_probe_counts_connection_caps_without_taking_a_slot(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, MAX_CONNECTIONS_PER_IP=1)
    relay.wait_ready()
    for _ in range(3):  # were a probe to hold its slot, the second would be refused
        assert probe_and_handshake(relay, "")[0][0] == 204
    first = await WS.connect(relay.ws_url)
    (got, body, _), (refused, refusal, _) = probe_and_handshake(relay, "")
    assert (got, refused) == (429, 429) and body == refusal
    assert json.loads(body)["error"] == "too_many_connections_from_address"
    first.close()
    deadline = time.monotonic() + 10
    while request(relay, "/socket", {})[0] != 204:  # the relay sees the close a moment later
        assert time.monotonic() < deadline, "the slot was never released"
        time.sleep(0.02)

    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, MAX_CONNECTIONS=1)
    relay.wait_ready()
    held = await WS.connect(relay.ws_url)
    (got, body, _), (refused, refusal, _) = probe_and_handshake(relay, "")
    assert (got, refused) == (503, 503) and body == refusal
    mongo.client[mongo.db].orders.insert_one({"_id": "held"})
    [change] = await held.changes(1)
    assert change["documentKey"] == {"_id": "held"}


def test_the_probe_checks_the_token(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, AUTH_JWT_SECRET=SECRET)
    relay.wait_ready()
    for query, status, error in ((f"access_token={token(ttl=-60)}", 401, "token_expired"),
                                 (f"access_token={token(key='y' * 40)}", 401, "invalid_token"),
                                 ("", 401, "missing_token")):
        (got, body, headers), (refused, refusal, _) = probe_and_handshake(relay, query)
        assert (got, refused) == (status, status) and body == refusal, query
        assert json.loads(body)["error"] == error
        assert headers["WWW-Authenticate"] == 'Bearer realm="changerelay"'
    assert probe_and_handshake(relay, f"access_token={token()}")[0][0] == 204


def test_an_allowed_page_on_another_origin_may_read_the_answer(mongo, relay_factory):
    """fetch() shows a cross-origin page the response only with Access-Control-Allow-Origin;
    an origin that may not connect is not told anything it could read."""
    app = "http://app.example"
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, ALLOWED_ORIGINS=app)
    relay.wait_ready()
    status, body, headers = request(relay, f"/socket?filter={Q('{nope')}", {"Origin": app})
    assert status == 400 and json.loads(body)["error"] == "invalid_json"
    assert headers["Access-Control-Allow-Origin"] == app and "Origin" in headers["Vary"]
    status, _, headers = request(relay, "/socket", {"Origin": app})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == app
    status, _, headers = request(relay, "/socket", {"Origin": "http://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
