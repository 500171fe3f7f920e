"""The relay's periodic jobs, on a real Relay that is not started: no socket, no MongoDB."""

from __future__ import annotations

import asyncio
import time

from changerelay import config as cfg
from changerelay.app import PING_SLICES, Relay
from changerelay.auth import Claims
from changerelay.catchup import Job
from changerelay.clients import EventStreamClient, WebSocketClient
from changerelay.subscription import Subscription
from tests.support import token


class Rider:
    """A client still catching up from MongoDB, whose token expired a minute ago."""

    def __init__(self, expires: float):
        self.claims = Claims(expires, None, None)
        self.subscription = Subscription()
        self.peer = "rider"
        self.expired = False

    def expire(self):
        self.expired = True


def relay(**environ) -> Relay:
    return Relay(cfg.load([], environ, dotenv_path=None))


async def test_an_expired_token_ends_a_client_that_is_still_catching_up():
    """``exp`` is enforced on every connection, not only on those already live in the hub."""
    secured = relay(AUTH_JWT_SECRET="s" * 32)
    late, fresh = Rider(time.time() - 60), Rider(time.time() + 60)
    job = Job(token(0), ("peer rider",))
    job.add(late, token(0))
    job.add(fresh, token(0))
    secured.catchup.jobs.append(job)
    secured.expire_tokens()
    assert late.expired and not fresh.expired


async def test_without_auth_no_token_is_checked():
    open_relay = relay()
    rider = Rider(time.time() - 60)
    job = Job(token(0), ("peer rider",))
    job.add(rider, token(0))
    open_relay.catchup.jobs.append(job)
    open_relay.expire_tokens()
    assert not rider.expired


class Socket:
    """A client of the relay's periodic passes; ``broken`` ones raise in every pass."""

    def __init__(self, broken: bool = False):
        self.broken = broken
        self.peer = "broken" if broken else "bystander"
        self.subscription = Subscription()
        self.pinged = self.beaten = self.shut = self.failed = 0
        self.announced = True  # its ready is not what these tests are about
        self.closed = False

    def send_control(self, message, token=None):
        pass

    def _pass(self) -> None:
        if self.broken:
            raise RuntimeError("a bug only this client meets")

    def ping(self, now, timeout):
        self._pass()
        self.pinged += 1

    def heartbeat(self):
        self._pass()
        self.beaten += 1

    def shutdown(self):
        self._pass()
        self.shut += 1

    def fail(self):
        self.failed += 1


class WebSocket(Socket, WebSocketClient):
    __hash__ = object.__hash__
    encoding = "ws"


class EventStream(Socket, EventStreamClient):
    __hash__ = object.__hash__
    encoding = "sse"


async def test_one_client_raising_in_a_periodic_pass_does_not_stop_it_for_the_others():
    """Pings, heartbeats and the shutdown pass go on past a client that raises (issue 11 item 8):
    it is cut alone, and every other client is pinged, kept alive and told of the shutdown."""
    served = relay(SHUTDOWN_TIMEOUT="0.2")
    sockets = [kind(broken=(i % 3 == 1)) for i in range(30) for kind in (WebSocket, EventStream)]
    for client in sockets:
        served.attach(client, None)
    for _ in range(PING_SLICES):
        served.ping()
    served.heartbeat()
    bystanders = [c for c in sockets if not c.broken]
    assert all(c.pinged == 1 for c in bystanders if isinstance(c, WebSocket))
    assert all(c.beaten == 1 for c in bystanders if isinstance(c, EventStream))
    assert all(c.failed == 1 and c not in served.hub.clients for c in sockets if c.broken)
    for client in sockets:
        served.hub.subscribe(client)  # back, broken ones included, for the shutdown pass
    await served.shutdown()
    assert all(c.shut == 1 for c in bystanders)


class Counted(WebSocket):
    """A WebSocket whose close the relay began with ``close`` (code, reason), or None."""

    def __init__(self, close=None):
        super().__init__()
        self.close = close
        self.told = self.sent = None
        self.last_send = 0.0

    def ended_with(self):
        return self.close

    def send_control(self, message, token=None):
        pass


def disconnects(served: Relay) -> dict[str, float]:
    return {sample.labels["reason"]: sample.value
            for sample in served.metrics.disconnects.collect()[0].samples
            if sample.name.endswith("_total")}


async def test_every_connection_is_counted_once_by_why_it_ended():
    """Counted when its connection closes, whatever ended it: the hub failing it (it has left
    the hub before the relay is told), the relay cutting it off (detached first, then closed),
    or the client leaving."""
    served = relay()
    failing = Counted((1011, "internal error"))
    cut = Counted((1013, "slow consumer"))
    leaving = Counted()
    for client in (failing, cut, leaving):
        served.attach(client, None)
    try:
        raise RuntimeError("a bug only this client meets")
    except RuntimeError as exc:
        served.hub.failed(failing, exc)
    served.detach(failing)  # what its on_end does
    served.detach(cut)
    for client in (failing, cut, leaving):
        served.lost(client)  # its connection closed
    assert disconnects(served) == {"internal_error": 1, "slow_consumer": 1, "client_closed": 1}


async def test_clients_still_catching_up_are_pinged_and_kept_alive():
    """A client waiting for or riding a catch-up (fair queue: possibly for a while) is pinged, so
    that a dead peer is found, and its event stream gets heartbeats, so that proxies keep it."""
    served = relay()
    waiting = [WebSocket(), EventStream()]
    job = Job(token(0), ("peer 192.0.2.1",))
    for client in waiting:
        job.add(client, token(0))
        served.keep_alive(client)  # as attach does before it hands a client to a catch-up
    served.catchup.jobs.append(job)
    for _ in range(PING_SLICES):
        served.ping()
    served.heartbeat()
    assert (waiting[0].pinged, waiting[1].beaten) == (1, 1)


async def test_a_live_query_still_sending_its_snapshot_is_pinged_and_kept_alive():
    """A live query's snapshot may take a while to write to a slow reader: meanwhile its peer is
    pinged like any other (a dead one is found and its read slot freed) and its event stream
    gets heartbeats."""
    served = relay()
    held = asyncio.Event()

    async def snapshot_in_progress(opened, client):
        await held.wait()

    served.live.serve = snapshot_in_progress
    snapshotting = [WebSocket(), EventStream()]
    for client in snapshotting:
        served.start_live_query(client, None, None)
    for _ in range(PING_SLICES):
        served.ping()
    served.heartbeat()
    assert (snapshotting[0].pinged, snapshotting[1].beaten) == (1, 1)
    held.set()
    while served.snapshotting:
        await asyncio.sleep(0)
