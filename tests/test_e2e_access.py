"""Each client sees only what it may: bad input, tokens, row rules, redaction, browser safety.

Every refusal is checked against a running relay with a well-behaved client connected alongside,
which must keep receiving every event: bad input never costs anyone else anything.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
import uuid

import jwt
import pytest
from tornado import httpclient, websocket

from tests.support import SSE, WS

pytestmark = pytest.mark.e2e

SECRET = "test-secret-" + "x" * 32


def token(claims=None, key=SECRET, algorithm="HS256", ttl=300, **extra):
    body = {"sub": "tester", "exp": int(time.time()) + ttl, **(claims or {}), **extra}
    return jwt.encode(body, key, algorithm=algorithm)


def unsigned(claims) -> str:
    """A token with alg "none" — must never be accepted."""
    import base64

    def b64(data):
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


# A database of this module's own, so that a run against MONGODB_TEST_URI touches nothing else.
SHOP = "shop_" + uuid.uuid4().hex[:8]
GOOD = token({"ns": [SHOP]})
Q = urllib.parse.quote

BAD_HANDSHAKES = [
    # (description, query string, headers, status, error code)
    ("malformed filter JSON", f"filter={Q('{nope')}", {}, 400, "invalid_json"),
    ("unknown operator", f"filter={Q(json.dumps({'fullDocument.a': {'$where': 'x'}}))}", {},
     400, "unknown_operator"),
    ("$expr", f"filter={Q(json.dumps({'$expr': {'$eq': [1, 1]}}))}", {}, 400,
     "unknown_operator"),
    ("unknown operation type", "ops=insert,upsert", {}, 400, "unknown_operation_type"),
    ("namespace outside scope", "ns=other", {}, 400, "ns_outside_scope"),
    ("nesting deeper than 16", "filter=" + Q('{"fullDocument.a":' + '{"$not":' * 17 + '{"$eq":1}'
                                              + "}" * 18), {}, 400, "filter_too_deep"),
    ("filter over 4 KiB", "filter=" + Q(json.dumps({"fullDocument.a": "x" * 5000})), {}, 400,
     "filter_too_large"),
    ("300 $or branches", "filter=" + Q(json.dumps(
        {"$or": [{"fullDocument.a": i} for i in range(300)]})), {}, 400, "filter_too_large"),
    ("unknown query parameter", "since=yesterday", {}, 400, "unknown_parameter"),
    ("malformed resume_after", "resume_after=xyz", {}, 400, "invalid_resume_after"),
    ("invalid UTF-8", "ns=%ff%fe", {}, 400, "invalid_encoding"),
    ("no token", "", {"Authorization": ""}, 401, "missing_token"),
    ("wrong key", "", {"Authorization": "Bearer " + token(key="y" * 40)},
     401, "invalid_token"),
    ("alg none", "", {"Authorization": "Bearer " + unsigned({"exp": int(time.time()) + 300})},
     401, "invalid_token"),
    ("expired", "", {"Authorization": "Bearer " + token(ttl=-60)}, 401, "token_expired"),
    ("no exp", "", {"Authorization": "Bearer " + jwt.encode({"sub": "x"}, SECRET)}, 401,
     "invalid_token"),
    ("token for another namespace", f"ns={SHOP}.secrets",
     {"Authorization": "Bearer " + token({"ns": [f"{SHOP}.orders"]})}, 403, "ns_forbidden"),
    ("token granting no namespace", "", {"Authorization": "Bearer " + token({"ns": []})}, 403,
     "ns_forbidden"),
    ("token with a malformed ns", "", {"Authorization": "Bearer " + token({"ns": f"{SHOP}."})},
     401, "invalid_token"),
    ("cross-origin handshake", "", {"Origin": "https://evil.example"}, 403,
     "origin_not_allowed"),
]


@pytest.fixture
def secured(mongo, relay_factory):
    # A leeway of 1 s, not the default 5: tests whose tokens expire mid-connection wait it out.
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=SHOP, AUTH_JWT_SECRET=SECRET,
                          AUTH_LEEWAY_SECONDS=1)
    relay.wait_ready()
    yield relay
    if not mongo.fake:
        mongo.client.drop_database(SHOP)


def _headers(extra):
    headers = {"Authorization": f"Bearer {GOOD}"}
    headers.update(extra)
    return {k: v for k, v in headers.items() if v}


@pytest.mark.parametrize("path", ["/socket", "/events"])
async def test_every_bad_handshake_is_refused_and_others_keep_receiving(mongo, secured, path):
    bystander = await WS.connect(secured.ws_url, headers={"Authorization": f"Bearer {GOOD}"})
    shop = mongo.client[SHOP]
    for number, (what, query, headers, status, code) in enumerate(BAD_HANDSHAKES):
        response = secured.get(f"{path}?{query}" if query else path, headers=_headers(
            {**headers, "Upgrade": "websocket", "Connection": "Upgrade",
             "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            if path == "/socket" else headers))
        assert response.code == status, (what, response.body)
        body = response.json()
        assert body["error"] == code, (what, body)
        assert len(body["message"]) > 10
        shop.orders.insert_one({"_id": number})
        [frame] = await bystander.changes(1)
        assert frame["documentKey"] == {"_id": number}, what


BAD_UPGRADES = [
    ("no Connection: Upgrade", {"Connection": "keep-alive"}, 400, "bad_handshake"),
    ("version 8", {"Sec-WebSocket-Version": "8"}, 426, "unsupported_websocket_version"),
    ("no version", {"Sec-WebSocket-Version": ""}, 426, "unsupported_websocket_version"),
    ("no key", {"Sec-WebSocket-Key": ""}, 400, "bad_handshake"),
    ("short key", {"Sec-WebSocket-Key": "c2hvcnQ="}, 400, "bad_handshake"),
    ("key not base64", {"Sec-WebSocket-Key": "!!!!!!!!!!!!!!!!!!!!!!=="}, 400, "bad_handshake"),
]


def _upgrade_request(relay, headers: dict):
    """GET /socket with exactly these headers (urllib would add ``Connection: close``)."""
    connection = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    connection.request("GET", "/socket", headers=headers)
    response = connection.getresponse()
    body = response.read() if response.status != 101 else b""
    connection.close()
    return response.status, body, response.headers


async def test_bad_websocket_upgrades_get_json_errors_and_others_keep_receiving(mongo, secured):
    bystander = await WS.connect(secured.ws_url, headers={"Authorization": f"Bearer {GOOD}"})
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    for number, (what, headers, status, code) in enumerate(BAD_UPGRADES):
        got, body, reply_headers = _upgrade_request(secured, _headers({**upgrade, **headers}))
        assert got == status, (what, body)
        assert json.loads(body)["error"] == code, what
        if status == 426:
            assert reply_headers["Sec-WebSocket-Version"] == "13"
        mongo.client[SHOP].orders.insert_one({"_id": number})
        [frame] = await bystander.changes(1)
        assert frame["documentKey"] == {"_id": number}, what
    assert _upgrade_request(secured, _headers(upgrade))[0] == 101


async def test_huge_query_string_is_refused_without_harm(mongo, secured):
    bystander = await WS.connect(secured.ws_url, headers={"Authorization": f"Bearer {GOOD}"})
    response = secured.get("/socket?filter=" + "a" * (33 * 1024), headers=_headers({}))
    assert response.code == 414 and response.json()["error"] == "query_too_large"
    response = secured.get("/socket?filter=" + "a" * (1 << 20), headers=_headers({}))
    assert response.code == 414 and response.json()["error"] == "uri_too_long"
    mongo.client[SHOP].orders.insert_one({"_id": "after"})
    [frame] = await bystander.changes(1)
    assert frame["documentKey"] == {"_id": "after"}
    assert secured.get("/healthz").code == 200


async def test_oversized_inbound_frame_closes_that_client_with_1009_only(mongo, secured):
    auth = {"Authorization": f"Bearer {GOOD}"}
    bystander = await WS.connect(secured.ws_url, headers=auth)
    chatty = await WS.connect(secured.ws_url, headers=auth)
    await chatty.conn.write_message("hello")  # small frames are ignored
    await chatty.conn.write_message("x" * 5000)
    code, _ = await chatty.closed()
    assert code == 1009
    mongo.client[SHOP].orders.insert_one({"_id": 1})
    [frame] = await bystander.changes(1)
    assert frame["documentKey"] == {"_id": 1}


async def test_a_token_granting_no_namespace_is_refused_not_taken_for_every_namespace(
        mongo, secured):
    everything = await WS.connect(secured.ws_url, headers={
        "Authorization": f"Bearer {token()}"})  # no ns claim: the whole watched scope
    with pytest.raises(httpclient.HTTPClientError) as refused:  # today: joins, gets everything
        await WS.connect(secured.ws_url, headers={"Authorization": f"Bearer {token({'ns': []})}"})
    assert refused.value.code == 403
    assert json.loads(refused.value.response.body)["error"] == "ns_forbidden"
    stream = await SSE.open(secured.port, extra={
        "Authorization": f"Bearer {token({'ns': []})}"})
    assert stream.status == 403
    mongo.client[SHOP].orders.insert_one({"_id": 1})
    [frame] = await everything.changes(1)
    assert frame["documentKey"] == {"_id": 1}


async def test_a_string_exp_is_refused_and_every_expired_token_is_still_closed(mongo, secured):
    short = [await WS.connect(f"{secured.ws_url}?access_token={token({'ns': [SHOP]}, ttl=1)}")
             for _ in range(5)]
    stringy = jwt.encode({"exp": str(int(time.time()) + 300), "ns": [SHOP]}, SECRET)
    try:  # today: admitted, and the expiry pass then raises TypeError on every tick
        stray, refused = await WS.connect(f"{secured.ws_url}?access_token={stringy}"), None
    except httpclient.HTTPClientError as exc:
        stray, refused = None, exc
    bystander = await WS.connect(secured.ws_url, headers={"Authorization": f"Bearer {GOOD}"})
    for client in short:
        assert await client.closed(timeout=20) == (1008, "token expired")
    assert stray is None and refused.code == 401
    body = json.loads(refused.response.body)
    assert body["error"] == "invalid_token" and "exp claim" in body["message"]
    mongo.client[SHOP].orders.insert_one({"_id": "after"})
    [frame] = await bystander.changes(1)
    assert frame["documentKey"] == {"_id": "after"}


async def test_access_token_query_parameter_and_exp_enforced_during_connection(mongo, secured):
    short = token({"ns": [SHOP]}, ttl=1)
    client = await WS.connect(f"{secured.ws_url}?access_token={short}")
    mongo.client[SHOP].orders.insert_one({"_id": 1})
    await client.changes(1)
    code, reason = await client.closed(timeout=15)  # exp + AUTH_LEEWAY_SECONDS
    assert (code, reason) == (1008, "token expired")
    assert client.frames[-1]["code"] == "token_expired"
    assert short not in secured.log()  # access lines leave the query string out


async def test_row_level_rules_alice_and_bob_each_see_exactly_their_own(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, AUTH_JWT_SECRET=SECRET,
                          FULL_DOCUMENT="whenAvailable")  # row rules need post-images
    relay.wait_ready()
    mongo.client[mongo.db].create_collection(
        "notes", changeStreamPreAndPostImages={"enabled": True})

    def for_user(name):
        return token({"ns": [mongo.db], "filter": {"fullDocument.owner": name}})

    alice = await WS.connect(f"{relay.ws_url}?access_token={for_user('alice')}")
    bob = await WS.connect(relay.ws_url,
                           headers={"Authorization": f"Bearer {for_user('bob')}"})
    # bob also filters further; the rule and his filter are ANDed.
    bob_big = await WS.connect(
        relay.ws_url + "?filter=" + Q(json.dumps({"fullDocument.n": {"$gte": 10}})),
        headers={"Authorization": f"Bearer {for_user('bob')}"})
    notes = mongo.client[mongo.db].notes
    expected = {"alice": [], "bob": [], "bob_big": []}
    for n in range(40):
        owner = "alice" if n % 3 else "bob"
        notes.insert_one({"_id": n, "owner": owner, "n": n})
        expected[owner].append(("insert", n))
        if owner == "bob" and n >= 10:
            expected["bob_big"].append(("insert", n))
    notes.update_one({"_id": 1}, {"$set": {"n": 100}})
    expected["alice"].append(("update", 1))
    notes.delete_one({"_id": 2})  # no pre-images here: the rule cannot decide it, so withheld
    notes.insert_one({"_id": "end", "owner": "alice", "n": 0})
    expected["alice"].append(("insert", "end"))
    notes.insert_one({"_id": "end-b", "owner": "bob", "n": 50})
    expected["bob"].append(("insert", "end-b"))
    expected["bob_big"].append(("insert", "end-b"))

    def seen(frames):
        return [(f["operationType"], f["documentKey"]["_id"]) for f in frames]

    assert seen(await alice.changes(len(expected["alice"]))) == expected["alice"]
    assert seen(await bob.changes(len(expected["bob"]))) == expected["bob"]
    assert seen(await bob_big.changes(len(expected["bob_big"]))) == expected["bob_big"]
    for client in (alice, bob, bob_big):
        for frame in client.frames:
            assert frame.get("fullDocument", {}).get("owner") in (None, "alice"
                                                                  if client is alice
                                                                  else "bob")


@pytest.mark.parametrize("path", ["/socket", "/events"])
async def test_origins(mongo, relay_factory, path):
    relay = relay_factory(MONGO_SRV=mongo.uri, ALLOWED_ORIGINS="https://app.example")
    relay.wait_ready()
    assert relay.get(path, headers={"Origin": "https://evil.example"}).code == 403
    same = relay.get("/socket", headers={"Origin": relay.url})
    assert same.code == 403  # an explicit list replaces the same-origin default

    request = httpclient.HTTPRequest(relay.ws_url, headers={"Origin": "https://app.example"})
    conn = await websocket.websocket_connect(request)
    conn.close()
    stream = await SSE.open(relay.port, extra={"Origin": "https://app.example"})
    assert stream.status == 200  # and readable by EventSource on that origin:
    assert "access-control-allow-origin: https://app.example" in stream.head
    stream.close()


async def test_default_origin_is_same_origin_only(mongo, relay):
    assert relay.get("/socket", headers={"Origin": "https://evil.example"}).code == 403

    request = httpclient.HTTPRequest(relay.ws_url, headers={"Origin": relay.url})
    conn = await websocket.websocket_connect(request)
    conn.close()


async def test_connection_caps_and_trusted_proxies(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, MAX_CONNECTIONS=3, MAX_CONNECTIONS_PER_IP=2,
                          TRUSTED_PROXIES="127.0.0.1")
    relay.wait_ready()

    def via(client_ip):
        return {"X-Forwarded-For": client_ip}

    a1 = await WS.connect(relay.ws_url, headers=via("203.0.113.1"))
    await WS.connect(relay.ws_url, headers=via("203.0.113.1"))
    third = relay.get("/socket", headers={**via("203.0.113.1"), "Upgrade": "websocket"})
    assert third.code == 429 and third.json()["error"] == "too_many_connections_from_address"
    await WS.connect(relay.ws_url, headers=via("203.0.113.2"))
    fourth = relay.get("/socket", headers=via("203.0.113.3"))
    assert fourth.code == 503 and fourth.json()["error"] == "too_many_connections"
    a1.close()
    deadline = time.monotonic() + 10
    while relay.ready()["clients"] != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await WS.connect(relay.ws_url, headers=via("203.0.113.3"))


async def test_untrusted_peer_cannot_spoof_its_address(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, MAX_CONNECTIONS_PER_IP=1)
    relay.wait_ready()

    await WS.connect(relay.ws_url, headers={"X-Forwarded-For": "198.51.100.1"})
    second = relay.get("/socket", headers={"X-Forwarded-For": "198.51.100.2"})
    assert second.code == 429  # both are 127.0.0.1: no TRUSTED_PROXIES, no believing XFF




def test_security_headers_on_the_page(relay):
    page = relay.get("/")
    csp = page.headers["Content-Security-Policy"]
    for part in ("default-src 'self'", "script-src 'self'", "object-src 'none'",
                 f"connect-src 'self' ws://127.0.0.1:{relay.port}"):
        assert part in csp
    assert "unsafe-inline" not in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["X-Content-Type-Options"] == "nosniff"


async def test_two_clients_same_filter_share_bytes(mongo, relay):
    query = "?filter=" + Q(json.dumps({"fullDocument.kind": "a"}))
    one = await WS.connect(relay.ws_url + query)
    two = await WS.connect(relay.ws_url + query)
    coll = mongo.client[mongo.db].things
    for n in range(20):
        coll.insert_one({"_id": n, "kind": "a" if n % 2 else "b"})
    a = await one.changes(10)
    b = await two.changes(10)
    assert a == b and [f["documentKey"]["_id"] for f in a] == list(range(1, 20, 2))
    assert relay.ready()["subscriptions"] == 1


async def test_client_that_never_answers_pings_is_closed(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WS_PING_INTERVAL=0.3)
    relay.wait_ready()

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write((f"GET /socket HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    opcodes, payload = [], b""
    async with asyncio.timeout(10):
        while True:  # read frames, never answer: pings (0x9), a close frame, then the end
            try:
                head = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                break
            payload = await reader.readexactly(head[1] & 0x7F)
            opcodes.append(head[0] & 0x0F)
    assert 0x9 in opcodes and opcodes[-1] == 0x8, opcodes
    assert int.from_bytes(payload[:2], "big") in (1000, 1001, 1011)
    writer.close()
    # a polite client alongside is unaffected
    polite = await WS.connect(relay.ws_url)
    mongo.client[mongo.db].c.insert_one({"_id": "still"})
    [frame] = await polite.changes(1)
    assert frame["documentKey"] == {"_id": "still"}
