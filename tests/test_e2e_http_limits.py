"""The HTTP layer bounds every request before it costs the relay more than its head.

A request head (request line and headers) is read within a size, a header count and a deadline,
and refused in JSON when it breaks one (431, 414, 408, 400); no route reads a body (413, before
reading it); connections that have not finished their request have a cap of their own, past which
the oldest goes, so that probes still get in; at the open-files limit the relay stops accepting
for a moment instead of spinning; and SIGTERM ends the process in time whatever the clients and
MongoDB are doing. Each abuse runs beside a bystander client that must keep receiving its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time

import psutil
import pytest

from tests.support import WS, ParkedHeads, RawHTTP

pytestmark = pytest.mark.e2e

HEAD_LIMIT = 64 * 1024  # MAX_REQUEST_HEAD_BYTES's default
QUERY_LIMIT = 32 * 1024  # admission.MAX_QUERY_BYTES
HEADER_LINES = 100  # gate.MAX_HEADER_LINES


def head(target: str = "/healthz", *fields: str, method: str = "GET", port: int = 80) -> bytes:
    """A request head; ``port`` for the Host header (the probes do not check it)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def head_of_size(size: int, target: str = "/healthz") -> bytes:
    """A request head of exactly ``size`` bytes, its excess in one header."""
    bare = head(target, "X-Pad: ")
    return head(target, "X-Pad: " + "p" * (size - len(bare)))


def refusal(port: int, data: bytes, timeout: float = 5, closes: bool = True) -> tuple[int, str]:
    """Send ``data`` on a fresh connection: the relay's status and JSON ``error``, after which it
    must close the connection if the head itself was refused (``closes``)."""
    client = RawHTTP(port)
    try:
        client.send(data)
        response = client.response(timeout)
        assert response is not None, "closed without an answer"
        assert response.headers["Content-Type"] == "application/json"
        body = response.json()
        assert set(body) == {"error", "message"} and body["message"], body
        if closes:
            assert client.closed(timeout), "still open after a refusal"
        return response.code, body["error"]
    finally:
        client.close()


def answer(port: int, data: bytes, timeout: float = 5) -> int:
    client = RawHTTP(port)
    try:
        client.send(data)
        response = client.response(timeout)
        assert response is not None, "closed without an answer"
        return response.code
    finally:
        client.close()


class Bystander:
    """A WebSocket client that must get each event written while others misbehave."""

    def __init__(self, mongo, client: WS):
        self.collection = mongo.client[mongo.db].c
        self.client = client
        self.count = 0

    @classmethod
    async def connect(cls, mongo, relay) -> Bystander:
        return cls(mongo, await WS.connect(relay.ws_url))

    async def still_served(self, what: str = "") -> None:
        self.count += 1
        self.collection.insert_one({"_id": self.count})
        [change] = await self.client.changes(1, timeout=10)
        assert change["documentKey"] == {"_id": self.count}, what


async def test_a_head_past_its_limits_gets_a_json_refusal(mongo, relay):
    bystander = await Bystander.connect(mongo, relay)
    port = relay.port
    assert answer(port, head_of_size(HEAD_LIMIT)) == 200
    assert refusal(port, head_of_size(HEAD_LIMIT + 1)) == (431, "headers_too_large")
    many = [f"X-{n}: {n}" for n in range(HEADER_LINES - 1)]  # and Host: the cap exactly
    assert answer(port, head("/healthz", *many)) == 200
    assert refusal(port, head("/healthz", *many, "X-One: more")) == (431, "too_many_headers")
    await bystander.still_served("after the header limits")

    # A long request line is a long URI (414), whichever limit it meets first: the head's, or
    # below it the query's.
    assert refusal(port, head("/socket?ops=" + "i" * HEAD_LIMIT)) == (414, "uri_too_long")
    query = "ops=" + "i" * QUERY_LIMIT
    for upgrade in ((), ("Upgrade: websocket", "Connection: Upgrade",
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                         "Sec-WebSocket-Version: 13")):
        assert refusal(port, head(f"/socket?{query}", *upgrade, port=port), closes=False) == (
            414, "query_too_large")  # admission's refusal: the connection may stay open
    await bystander.still_served("after the long URIs")


async def test_a_body_is_refused_before_it_is_read(mongo, relay):
    bystander = await Bystander.connect(mongo, relay)
    promised = [  # (method and target, fields): the body is promised, never sent
        ("GET /healthz", "Content-Length: 100000000"),
        ("GET /socket", "Content-Length: 1"),
        ("HEAD /", "Content-Length: 10"),
        ("GET /events", "Transfer-Encoding: chunked"),
        ("POST /socket", "Content-Length: 5"),
        ("GET /healthz", "Transfer-Encoding: gzip, chunked"),
        ("GET /healthz", "Content-Length: 0, 7"),
    ]
    for line, field in promised:
        method, target = line.split()
        assert refusal(relay.port, head(target, field, method=method)) == (
            413, "body_not_allowed"), line
        await bystander.still_served(line)
    assert answer(relay.port, head("/healthz", "Content-Length: 0")) == 200
    assert refusal(relay.port, head("/healthz", "Content-Length: ten")) == (
        400, "malformed_request")


async def test_a_head_tornado_cannot_read_gets_a_json_400(mongo, relay):
    bystander = await Bystander.connect(mongo, relay)
    for data in (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
                 b"GET /healthz\r\nHost: x\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
                 b"\r\n\r\n"):
        assert refusal(relay.port, data) == (400, "malformed_request"), data
        await bystander.still_served(repr(data))


async def test_a_head_is_cut_at_its_deadline_whatever_its_pace(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REQUEST_HEAD_TIMEOUT=1)
    relay.wait_ready()
    bystander = await Bystander.connect(mongo, relay)
    dribbler, idle = RawHTTP(relay.port), RawHTTP(relay.port)
    started = time.monotonic()
    data = head("/healthz", "X-Slow: " + "s" * 100)
    sent = 0
    while not select.select([dribbler.sock], [], [], 0)[0] and time.monotonic() - started < 3:
        dribbler.send(data[sent:sent + 1])
        sent += 1
        time.sleep(0.05)  # the pace under test: a byte every 50 ms, never finishing in time
    cut = time.monotonic() - started
    assert cut < 1.5, f"a dribbled head was still read after {cut:.1f}s"
    response = dribbler.response()
    assert response is not None and response.code == 408
    assert response.json()["error"] == "request_timeout"
    assert idle.closed(timeout=1) and idle.buffer == b"", "an idle connection: closed, unanswered"

    # Between requests on a kept-alive connection the deadline runs again from the response.
    kept = RawHTTP(relay.port)
    kept.send(head("/healthz"))
    assert kept.response().code == 200
    answered = time.monotonic()
    assert kept.closed(timeout=3)
    assert 0.8 < time.monotonic() - answered < 3
    await bystander.still_served()


async def test_every_request_on_a_kept_alive_connection_passes_the_same_limits(mongo, relay):
    bystander = await Bystander.connect(mongo, relay)
    client = RawHTTP(relay.port)
    client.send(head("/healthz") + head("/readyz"))  # pipelined: both are answered, in order
    assert [client.response().code, client.response().code] == [200, 200]
    client.send(head("/healthz"))
    assert client.response().code == 200
    many = [f"X-{n}: {n}" for n in range(HEADER_LINES)]
    client.send(head("/healthz", *many))
    response = client.response()
    assert (response.code, response.json()["error"]) == (431, "too_many_headers")
    assert client.closed()
    await bystander.still_served()


async def test_a_frame_sent_behind_the_handshake_still_arrives(mongo, relay):
    """The head is read before Tornado; what the client sent after it is Tornado's, then the
    WebSocket's: here a close frame right behind the upgrade request, answered in kind."""
    client = RawHTTP(relay.port)
    close_frame = bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2])  # masked close 1000
    client.send(head("/socket", "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                     "Sec-WebSocket-Version: 13", port=relay.port) + close_frame)
    response = client.response()
    assert response.code == 101
    assert client.closed()
    assert client.buffer[:4] == bytes([0x88, 0x02, 0x03, 0xE8])  # the relay's close, 1000


async def test_unfinished_requests_have_a_cap_and_probes_still_get_in(mongo, relay_factory):
    cap = 16
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, MAX_PENDING_REQUESTS=cap)
    relay.wait_ready()
    bystander = await Bystander.connect(mongo, relay)
    parked = []
    for _ in range(3 * cap):
        client = RawHTTP(relay.port)
        client.send(head_of_size(HEAD_LIMIT)[:-10])  # all but the end of the head
        parked.append(client)
    for _ in range(cap):  # every probe finds its place: at the cap the oldest unfinished goes
        started = time.monotonic()
        assert answer(relay.port, head("/healthz")) == 200
        assert answer(relay.port, head("/readyz")) == 200
        assert time.monotonic() - started < 1
    open_ = [client for client in parked if not client.closed(timeout=0.2)]
    assert len(open_) <= cap, f"{len(open_)} unfinished requests held at a cap of {cap}"
    assert parked[-1] in open_, "the newest should be the last to go"
    for client in parked:
        client.close()
    await bystander.still_served()


async def test_connection_caps_apply_after_the_head_and_spare_the_probes(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, MAX_CONNECTIONS=2,
                          MAX_CONNECTIONS_PER_IP=1, TRUSTED_PROXIES="127.0.0.1")
    relay.wait_ready()
    first = await WS.connect(relay.ws_url, headers={"X-Forwarded-For": "10.0.0.1"})
    with pytest.raises(Exception, match="429"):
        await WS.connect(relay.ws_url, headers={"X-Forwarded-For": "10.0.0.1"})
    second = await WS.connect(relay.ws_url, headers={"X-Forwarded-For": "10.0.0.2"})
    with pytest.raises(Exception, match="503"):
        await WS.connect(relay.ws_url, headers={"X-Forwarded-For": "10.0.0.3"})
    assert relay.get("/healthz").code == 200
    assert relay.ready()["status"] == 200
    bystander = Bystander(mongo, first)
    await bystander.still_served()
    second.close()


async def test_at_the_open_files_limit_the_relay_backs_off_and_recovers(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, LOG_LEVEL="INFO")
    relay.wait_ready()
    bystander = await Bystander.connect(mongo, relay)
    process = psutil.Process(relay.proc.pid)
    limit = process.num_fds() + 20
    process.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
    hogs = [socket.create_connection(("127.0.0.1", relay.port)) for _ in range(60)]
    relay.wait_log("not accepting connections")
    cpu = sum(process.cpu_times()[:2])
    started = time.monotonic()
    for _ in range(30):  # 3 s of events: the connected client is still served
        await bystander.still_served("at the open-files limit")
        await asyncio.sleep(0.1)
    busy = (sum(process.cpu_times()[:2]) - cpu) / (time.monotonic() - started)
    assert busy < 0.3, f"the relay used {busy:.0%} of a core while it could not accept"
    lines = [line for line in relay.lines if "not accepting" in line or "Too many" in line]
    assert len(lines) <= 2, lines[:5]
    assert "Traceback" not in relay.log()

    for hog in hogs:
        hog.close()
    deadline = time.monotonic() + 10
    while True:  # it recovers by itself
        try:
            if relay.get("/healthz").code == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "never accepted again"
        await asyncio.sleep(0.1)
    await bystander.still_served("after the open-files limit")


SHUTDOWN_TIMEOUT = 2


def wait_exit(relay, bound: float) -> None:
    """SIGTERM: the relay must end with status 0 within ``bound`` seconds, with no traceback."""
    started = time.monotonic()
    try:
        code = relay.terminate(bound + 5)
    finally:
        relay.kill()
    took = time.monotonic() - started
    assert code == 0
    assert took < bound, f"exited {took:.1f}s after SIGTERM"
    assert "Traceback" not in relay.log()


async def test_sigterm_with_200_parked_heads_exits_0_in_time(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          SHUTDOWN_TIMEOUT=SHUTDOWN_TIMEOUT)
    relay.wait_ready()
    client = await WS.connect(relay.ws_url)
    parked = ParkedHeads(relay.port, 200)
    parked.push(2)  # 2 MiB of headers each, as fast as the relay takes them
    wait_exit(relay, SHUTDOWN_TIMEOUT + 1)
    assert await client.closed() == (1001, "server shutting down")
    parked.close()


class Frozen:
    """A TCP forwarder to the test primary that can stop forwarding: MongoDB gone silent (a
    partition), connections open and nothing answered."""

    def __init__(self, port: int):
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.listener.getsockname()[1]}/?directConnection=true"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(downstream)
            if self.frozen.is_set():
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                downstream.close()
                continue
            self.sockets.append(upstream)
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        """Forward until either side closes, then close both (a stopped server's connections
        end); once frozen, forward nothing and close nothing."""
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and not self.frozen.is_set():
                target.sendall(data)
        if not self.frozen.is_set():
            source.close()
            target.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.mark.fault
@pytest.mark.parametrize("gone", ["silent", "stopped"])
async def test_sigterm_right_after_mongodb_goes_away_exits_0_in_time(primary, writer,
                                                                      relay_factory, gone):
    """MongoDB silent (a partition: connections open, nothing answered) or stopped, just before
    SIGTERM, with a live client and one that came from history (a catch-up stream)."""
    writer.shop.c.insert_many([{"_id": "before the relay"}, {"_id": "caught up"}])
    # Done with: closed while MongoDB is there to end its sessions. Closed after primary.stop(),
    # the driver would first wait out server selection (30 s) to send endSessions.
    writer.close()
    forwarder = Frozen(primary.port)
    relay = relay_factory(MONGO_SRV=forwarder.uri, WATCH_DB="shop",
                          SHUTDOWN_TIMEOUT=SHUTDOWN_TIMEOUT)
    relay.wait_ready()
    client = await WS.connect(relay.ws_url)
    catching_up = await WS.connect(f"{relay.ws_url}?resume_after={primary.tokens()[0]}")
    assert (await catching_up.changes(1))[0]["documentKey"] == {"_id": "caught up"}
    if gone == "silent":
        forwarder.frozen.set()
    else:
        primary.stop()
    await asyncio.sleep(0.2)
    wait_exit(relay, SHUTDOWN_TIMEOUT + 1)
    assert await client.closed() == (1001, "server shutting down")
    catching_up.close()
    forwarder.close()
