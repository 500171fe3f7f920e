"""DNS rebinding and origin spoofing, against a running relay.

A page on ``evil.example`` that rebinds its name to 127.0.0.1 makes the browser send
``Host: evil.example`` with a matching ``Origin``: only the Host check tells it from the real
page. Each attempt is made with a well-behaved client connected alongside, which must keep
receiving every event.
"""

from __future__ import annotations

import http.client
import json

import pytest
from tornado import httpclient, websocket

from tests.support import WS

pytestmark = pytest.mark.e2e

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def ask(relay, path: str, host: str | None, headers=None, method: str = "GET"):
    """``(status, JSON body or None)`` of one request with exactly this Host (None: none)."""
    connection = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    sent = dict(headers or {})
    if path.startswith("/socket"):
        sent = {**UPGRADE, **sent}
    if host is not None:
        sent["Host"] = host
    for name, value in sent.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    status = response.status
    body = None
    if status != 101 and not (path.startswith("/events") and status == 200):
        raw = response.read()
        if raw and response.getheader("Content-Type", "").startswith("application/json"):
            body = json.loads(raw)
    connection.close()
    return status, body


async def connect(relay, host: str, origin: str | None = None, headers=None) -> WS:
    sent = {"Host": host, **(headers or {})}
    if origin is not None:
        sent["Origin"] = origin
    request = httpclient.HTTPRequest(relay.ws_url, headers=sent)
    return WS(await websocket.websocket_connect(request))


async def still_receives(mongo, marker, *clients: WS) -> None:
    """Insert one document; every client must receive it next."""
    mongo.client[mongo.db].c.insert_one({"_id": marker})
    for client in clients:
        [frame] = await client.changes(1)
        assert frame["documentKey"] == {"_id": marker}


def refusals(relay):
    """(what, path, Host, headers, status, error) for a relay on 127.0.0.1 with the defaults."""
    port = relay.port
    evil = f"evil.example:{port}"
    return [
        ("rebound socket", "/socket", evil, {"Origin": f"http://{evil}"}, 421,
         "host_not_allowed"),
        ("rebound events", "/events", evil, {"Origin": f"http://{evil}"}, 421,
         "host_not_allowed"),
        ("rebound socket, no Origin", "/socket", evil, {}, 421, "host_not_allowed"),
        ("rebound page", "/", evil, {}, 421, "host_not_allowed"),
        ("rebound page, HEAD", "/", evil, {}, 421, None),
        ("rebound static file", "/static/changerelay.js", evil, {}, 421, "host_not_allowed"),
        ("another port", "/socket", "127.0.0.1:1", {}, 421, "host_not_allowed"),
        ("no port: port 80", "/", "localhost", {}, 421, "host_not_allowed"),
        ("a loopback name on another domain", "/", f"localhost.evil.example:{port}", {}, 421,
         "host_not_allowed"),
        ("no Host at all", "/", None, {}, 400, None),
        ("https origin for the http relay", "/socket", f"127.0.0.1:{port}",
         {"Origin": f"https://127.0.0.1:{port}"}, 403, "origin_not_allowed"),
        ("https origin on its default port", "/events", f"127.0.0.1:{port}",
         {"Origin": "https://127.0.0.1"}, 403, "origin_not_allowed"),
        ("forwarded https from an untrusted peer", "/socket", f"127.0.0.1:{port}",
         {"Origin": f"https://127.0.0.1:{port}", "X-Forwarded-Proto": "https"}, 403,
         "origin_not_allowed"),
        ("same host, another port in Origin", "/events", f"127.0.0.1:{port}",
         {"Origin": "http://127.0.0.1:1"}, 403, "origin_not_allowed"),
    ]


async def test_rebinding_attempts_are_refused_and_a_bystander_keeps_receiving(mongo, relay):
    bystander = await WS.connect(relay.ws_url)
    for number, (what, path, host, headers, status, error) in enumerate(refusals(relay)):
        method = "HEAD" if "HEAD" in what else "GET"
        got, body = ask(relay, path, host, headers, method)
        assert got == status, (what, got, body)
        if error is not None:
            assert body["error"] == error and len(body["message"]) > 20, (what, body)
        await still_receives(mongo, number, bystander)
    assert relay.ready()["clients"] == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_any_host(relay, path):
    """Kubernetes probes send the pod's IP as Host."""
    assert ask(relay, path, "10.1.2.3:8000")[0] == 200
    assert ask(relay, path, "evil.example")[0] == 200


async def test_loopback_names_on_the_bound_port_are_served(mongo, relay):
    port = relay.port
    for host in (f"localhost:{port}", f"LocalHost:{port}", f"localhost.:{port}",
                 f"127.0.0.1:{port}", f"[::1]:{port}", f"[0:0:0:0:0:0:0:1]:{port}"):
        assert ask(relay, "/", host)[0] == 200, host
        assert ask(relay, "/static/changerelay.js", host)[0] == 200, host
        client = await connect(relay, host, origin=f"http://{host}")
        await still_receives(mongo, host, client)
        client.close()


async def test_allowed_hosts_replace_the_loopback_default(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          ALLOWED_HOSTS="Relay.Example., [::1]:9000, api.example:443")
    relay.wait_ready()
    port = relay.port
    bystander = await connect(relay, f"relay.example:{port}")
    served = [f"relay.example:{port}", "RELAY.EXAMPLE", "relay.example:80", "relay.example.",
              "[0::1]:9000", "api.example:443"]
    for host in served:
        assert ask(relay, "/", host)[0] == 200, host
    client = await connect(relay, "RELAY.example", origin="http://relay.example")
    await still_receives(mongo, "by name", client, bystander)
    refused = [f"127.0.0.1:{port}", f"localhost:{port}", "[::1]:9001", "[::1]",
               "api.example", "api.example:80", "relay.example.evil.example", "evil.example"]
    for number, host in enumerate(refused):
        status, body = ask(relay, "/socket", host, {"Origin": f"http://{host}"})
        assert (status, body["error"]) == (421, "host_not_allowed"), host
        assert ask(relay, "/healthz", host)[0] == 200
        await still_receives(mongo, number, bystander)


async def test_forwarded_proto_is_believed_from_a_trusted_proxy_only(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, TRUSTED_PROXIES="127.0.0.1",
                          ALLOWED_HOSTS="relay.example")
    relay.wait_ready()
    tls = {"X-Forwarded-Proto": "https"}
    bystander = await connect(relay, "relay.example", "https://relay.example", tls)
    for host, origin in (("relay.example", "https://relay.example"),
                         ("relay.example:443", "https://relay.example"),
                         ("relay.example", "https://relay.example:443")):
        client = await connect(relay, host, origin, tls)
        await still_receives(mongo, host + origin, client, bystander)
        client.close()
    assert ask(relay, "/events", "relay.example", {"Origin": "https://relay.example", **tls})[0] \
        == 200
    for number, (host, origin, headers) in enumerate([
        ("relay.example", "http://relay.example", tls),          # http page, https relay
        ("relay.example", "https://relay.example", {}),          # no forwarded proto: http
        ("relay.example", "https://relay.example", {"X-Forwarded-Proto": "http"}),
        ("relay.example:80", "https://relay.example", tls),      # port 80 is not https' default
    ]):
        status, body = ask(relay, "/socket", host, {"Origin": origin, **headers})
        assert (status, body["error"]) == (403, "origin_not_allowed"), (host, origin, headers)
        await still_receives(mongo, number, bystander)


async def test_forwarded_proto_from_a_peer_outside_trusted_proxies_is_ignored(mongo,
                                                                              relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, TRUSTED_PROXIES="10.0.0.0/8",
                          ALLOWED_HOSTS="relay.example")
    relay.wait_ready()
    bystander = await connect(relay, "relay.example", "http://relay.example")
    for number, proto in enumerate(("https", "wss", "http, https")):
        status, body = ask(relay, "/events", "relay.example",
                           {"Origin": "https://relay.example", "X-Forwarded-Proto": proto,
                            "X-Forwarded-For": "10.0.0.1"})
        assert (status, body["error"]) == (403, "origin_not_allowed"), proto
        await still_receives(mongo, number, bystander)


async def test_allowed_origins_are_normalised_and_compare_the_scheme(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          ALLOWED_ORIGINS="HTTPS://App.Example:443/, http://localhost:3000")
    relay.wait_ready()
    host = f"127.0.0.1:{relay.port}"
    for origin in ("https://app.example", "https://APP.example:443", "http://localhost:3000"):
        client = await connect(relay, host, origin)
        await still_receives(mongo, origin, client)
        client.close()
    for origin in ("http://app.example", "https://app.example:8443", "http://localhost:3001",
                   "https://localhost:3000", "null", f"http://{host}"):
        status, body = ask(relay, "/events", host, {"Origin": origin})
        assert (status, body["error"]) == (403, "origin_not_allowed"), origin


async def test_a_relay_on_all_interfaces_warns_and_checks_no_host(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, HOST="0.0.0.0")
    relay.wait_ready()
    assert "DNS rebinding" in relay.wait_log("ALLOWED_HOSTS")
    client = await connect(relay, "relay.example", origin="http://relay.example")
    await still_receives(mongo, "any host", client)
    status, body = ask(relay, "/socket", "relay.example", {"Origin": "https://relay.example"})
    assert (status, body["error"]) == (403, "origin_not_allowed")


async def test_no_warning_when_hosts_are_set_or_loopback(mongo, relay_factory):
    listed = relay_factory(MONGO_SRV=mongo.uri, HOST="0.0.0.0", ALLOWED_HOSTS="relay.example")
    listed.wait_ready()
    assert ask(listed, "/", "evil.example")[0] == 421
    loopback = relay_factory(MONGO_SRV=mongo.uri)
    loopback.wait_ready()
    for relay in (listed, loopback):
        relay.wait_log("GET /readyz")  # logged after the warning would have been
        assert "ALLOWED_HOSTS" not in relay.log()



def test_static_files_load_cross_origin_only_for_allowed_origins(mongo, relay_factory):
    """A page on another allowed origin imports changerelay.js as an ES module: that load is a
    CORS request, so the script must come with Access-Control-Allow-Origin — for allowed
    origins only."""
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          ALLOWED_ORIGINS="https://app.example")
    relay.wait_ready()
    host = f"127.0.0.1:{relay.port}"
    allowed = relay.get("/static/changerelay.js", {"Origin": "https://app.example", "Host": host})
    assert allowed.code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in allowed.headers["Vary"]
    other = relay.get("/static/changerelay.js", {"Origin": "https://evil.example", "Host": host})
    assert other.code == 200 and "Access-Control-Allow-Origin" not in other.headers
