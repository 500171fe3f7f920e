"""Admission decisions that need no server: client address behind proxies, origins, caps."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from changerelay.app import Relay
from changerelay.limits import Connections
from changerelay.subscription import SubscriptionError


def request(remote_ip, forwarded=None, origin=None, host="relay.example:8000"):
    headers = {}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    if origin is not None:
        headers["Origin"] = origin
    return SimpleNamespace(remote_ip=remote_ip, headers=headers, host=host)


def relay(trusted=(), origins=()):
    fake = Relay.__new__(Relay)
    fake.config = SimpleNamespace(
        trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted), allowed_origins=origins)
    return fake


@pytest.mark.parametrize("trusted, peer, forwarded, expected", [
    ((), "10.0.0.5", "1.2.3.4", "10.0.0.5"),                      # no proxies: XFF ignored
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4", "1.2.3.4"),          # one trusted hop
    (("10.0.0.0/8",), "10.0.0.5", "6.6.6.6, 1.2.3.4", "1.2.3.4"),  # spoofed left part ignored
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4, 10.1.1.1", "1.2.3.4"),  # two trusted hops
    (("10.0.0.0/8",), "8.8.8.8", "1.2.3.4", "8.8.8.8"),           # untrusted peer
    (("10.0.0.0/8",), "10.0.0.5", "", "10.0.0.5"),                # proxy without XFF
    (("10.0.0.0/8",), "10.0.0.5", "10.0.0.6", "10.0.0.6"),        # only proxies: the last one
    (("10.0.0.0/8",), "10.0.0.5", "garbage, 1.2.3.4", "1.2.3.4"),
])
def test_client_address(trusted, peer, forwarded, expected):
    assert relay(trusted).peer_address(request(peer, forwarded)) == expected


@pytest.mark.parametrize("origins, origin, allowed", [
    ((), None, True),                                     # not a browser
    ((), "http://relay.example:8000", True),              # same origin
    ((), "https://relay.example:8000", True),             # same host and port
    ((), "http://evil.example", False),
    (("https://app.example",), "https://app.example", True),
    (("https://app.example",), "https://app.example/", True),
    (("https://app.example",), "http://relay.example:8000", False),
    (("*",), "http://anything.example", True),
])
def test_origin(origins, origin, allowed):
    check = relay(origins=origins).check_origin
    if allowed:
        check(request("1.1.1.1", origin=origin))
    else:
        with pytest.raises(SubscriptionError) as info:
            check(request("1.1.1.1", origin=origin))
        assert info.value.status == 403 and info.value.code == "origin_not_allowed"


def test_connection_caps_count_and_release():
    caps = Connections(total=3, per_address=2)
    caps.acquire("a")
    caps.acquire("a")
    with pytest.raises(SubscriptionError) as info:
        caps.acquire("a")
    assert info.value.status == 429
    caps.acquire("b")
    with pytest.raises(SubscriptionError) as info:
        caps.acquire("c")
    assert info.value.status == 503
    caps.release("a")
    caps.acquire("c")
    assert caps.total == 3 and dict(caps.by_address) == {"a": 1, "b": 1, "c": 1}


def test_no_caps_by_default():
    caps = Connections()
    for _ in range(10_000):
        caps.acquire("same")
    assert caps.total == 10_000


def test_an_expired_token_ends_a_client_that_is_still_catching_up():
    """``exp`` is enforced on every connection, not only on those already live in the hub."""
    import time

    from changerelay.auth import Authenticator, Claims
    from changerelay.hub import Hub

    class Rider:
        claims = Claims(time.time() - 60, None, None)
        expired = False

        def expire(self):
            self.expired = True

    rider = Rider()
    fake = Relay.__new__(Relay)
    fake.config = SimpleNamespace(position_interval=5.0)
    fake.hub = Hub()
    fake.auth = Authenticator.__new__(Authenticator)
    fake.catchup = SimpleNamespace(clients=lambda: [rider])
    fake._tick()
    assert rider.expired
