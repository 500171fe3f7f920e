"""Admission decisions that need no server: client address and scheme behind proxies, Host,
origins, the query string, caps."""

from __future__ import annotations

import ipaddress
import json
from types import SimpleNamespace

import pytest

from changerelay import admission
from changerelay import config as cfg
from changerelay.admission import Connections, Refusal


def request(remote_ip, forwarded=None, proto=None):
    headers = {}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    if proto is not None:
        headers["X-Forwarded-Proto"] = proto
    return SimpleNamespace(remote_ip=remote_ip, protocol="http", headers=headers)


def networks(*names):
    return tuple(ipaddress.ip_network(name) for name in names)


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
    address, _ = admission.forwarded(request(peer, forwarded), networks(*trusted))
    assert address == expected


@pytest.mark.parametrize("trusted, peer, forwarded, proto, scheme", [
    ((), "10.0.0.5", None, "https", "http"),                      # no proxies: ignored
    (("10.0.0.0/8",), "8.8.8.8", None, "https", "http"),          # untrusted peer: ignored
    (("10.0.0.0/8",), "10.0.0.5", None, "https", "https"),        # the proxy terminated TLS
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4", "HTTPS", "https"),
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4", "http", "http"),
    (("10.0.0.0/8",), "10.0.0.5", None, None, "http"),            # proxy that says nothing
    # the client's own "https" before the proxy's "http": the proxy's word counts
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4", "https, http", "http"),
    # two trusted proxies, each appending: the outer one's is the client's scheme
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4, 10.0.0.9", "https, http", "https"),
    # the hop before the proxy is untrusted: its "https" is not believed
    (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4, 6.6.6.6", "https, http", "http"),
    (("10.0.0.0/8",), "10.0.0.5", None, "gopher", "http"),        # not a scheme we serve
    (("10.0.0.0/8",), "10.0.0.5", None, "wss", "https"),
])
def test_served_scheme(trusted, peer, forwarded, proto, scheme):
    _, served = admission.forwarded(request(peer, forwarded, proto), networks(*trusted))
    assert served == scheme


@pytest.mark.parametrize("text, expected", [
    ("relay.example", ("relay.example", None)),
    ("Relay.EXAMPLE:8000", ("relay.example", 8000)),
    ("relay.example.:443", ("relay.example", 443)),               # the absolute name
    ("127.0.0.1:8000", ("127.0.0.1", 8000)),
    ("[::1]:8000", ("[::1]", 8000)),
    ("[0:0:0:0:0:0:0:1]", ("[::1]", None)),
    ("[2001:DB8::A]:1", ("[2001:db8::a]", 1)),
    ("my_service:80", ("my_service", 80)),                        # container names
    ("localhost:08000", ("localhost", 8000)),
    ("", None), (":8000", None), ("relay.example:", None), ("relay.example:0", None),
    ("relay.example:65536", None), ("relay.example:80:80", None), ("::1", None), ("[::1", None),
    ("[::1]x", None), ("[fe80::1%25eth0]", None), ("[127.0.0.1]", None), ("a b", None),
    ("relay..example", None), ("relay.example/x", None), ("user@relay.example", None),
    ("relay.example:+80", None), ("relay.example: 80", None), ("a" * 254, None), (".", None),
    ("relay.example, evil.example", None),
])
def test_host_parsing(text, expected):
    assert admission.parse_host(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("http://relay.example", ("http", "relay.example", 80)),
    ("https://relay.example", ("https", "relay.example", 443)),
    ("HTTPS://Relay.Example:443/", ("https", "relay.example", 443)),
    ("http://relay.example:8000", ("http", "relay.example", 8000)),
    ("http://[::1]:8000", ("http", "[::1]", 8000)),
    ("null", None), ("", None), ("ftp://relay.example", None), ("relay.example", None),
    ("http://", None), ("http://relay.example/app", None), ("http://relay.example?x", None),
    ("http://relay.example#x", None), ("http://u:p@relay.example", None),
    ("http://relay.example:99999", None), ("https:relay.example", None),
])
def test_origin_parsing(text, expected):
    assert admission.parse_origin(text) == expected


LOOPBACK_8000 = {("localhost", 8000), ("127.0.0.1", 8000), ("[::1]", 8000)}


@pytest.mark.parametrize("setting, listen, port, expected", [
    ((), "127.0.0.1", 8000, LOOPBACK_8000),
    ((), "localhost", 8000, LOOPBACK_8000),
    ((), "::1", 41234, {(name, 41234) for name, _ in LOOPBACK_8000}),
    ((), "127.0.0.2", 8000, LOOPBACK_8000 | {("127.0.0.2", 8000)}),
    ((), "0.0.0.0", 8000, None),                                  # containers: warned about
    ((), "::", 8000, None),
    ((), "", 8000, None),
    ((), "relay.example", 8000, None),
    (("*",), "127.0.0.1", 8000, None),                            # an explicit "any"
    ((("relay.example", None),), "127.0.0.1", 8000, {("relay.example", None)}),
    ((("relay.example", None), "*"), "0.0.0.0", 8000, None),
])
def test_allowed_hosts(setting, listen, port, expected):
    allowed = admission.allowed_hosts(setting, listen, port)
    assert allowed == (None if expected is None else frozenset(expected))


RELAY_HOSTS = frozenset({("relay.example", None), ("api.example", 443), ("[::1]", 8000),
                         ("localhost", 80)})


@pytest.mark.parametrize("host, scheme, allowed", [
    ("relay.example", "http", True),
    ("RELAY.example:8000", "http", True),                         # a name without a port: any
    ("relay.example.", "https", True),
    ("api.example:443", "http", True),
    ("api.example", "https", True),                               # https' default port
    ("api.example", "http", False),                               # http: port 80
    ("api.example:8443", "https", False),
    ("[0::1]:8000", "http", True),
    ("[::1]", "http", False),
    ("localhost", "http", True),                                  # http's default port
    ("localhost:80", "http", True),
    ("localhost", "https", False),
    ("evil.example", "http", False),
    ("relay.example.evil.example", "http", False),
    ("evil.example:8000", "http", False),
    ("", "http", False),
    (None, "http", False),                                        # HTTP/1.0 without Host
    ("relay.example:99999", "http", False),
])
def test_host_check(host, scheme, allowed):
    served = admission.served_origin(host, scheme)
    if allowed:
        admission.check_host(served, RELAY_HOSTS)
    else:
        with pytest.raises(Refusal) as info:
            admission.check_host(served, RELAY_HOSTS)
        assert info.value.status == 421 and info.value.code == "host_not_allowed"
        assert "ALLOWED_HOSTS" in info.value.message


def test_no_host_check_lets_any_host_through():
    admission.check_host(admission.served_origin("evil.example", "http"), None)
    admission.check_host(None, None)


def test_a_long_origin_is_not_echoed_whole():
    with pytest.raises(Refusal) as info:
        admission.check_origin("http://" + "a" * 100_000, None, ())
    assert len(info.value.body()) < 1000


APP = (admission.parse_origin("https://app.example"),)


@pytest.mark.parametrize("origins, origin, host, scheme, allowed", [
    ((), None, "relay.example:8000", "http", True),               # not a browser
    ((), "http://relay.example:8000", "relay.example:8000", "http", True),  # same origin
    ((), "HTTP://Relay.Example:8000", "relay.example:8000", "http", True),
    ((), "http://relay.example", "relay.example:80", "http", True),
    ((), "https://relay.example", "relay.example", "https", True),  # behind a TLS proxy
    ((), "https://relay.example:443", "relay.example", "https", True),
    ((), "https://relay.example:8000", "relay.example:8000", "http", False),  # https for http
    ((), "http://relay.example", "relay.example", "https", False),  # http for https
    ((), "http://relay.example:8001", "relay.example:8000", "http", False),
    ((), "http://relay.example", "relay.example:8000", "http", False),
    ((), "http://evil.example", "relay.example:8000", "http", False),
    ((), "null", "relay.example:8000", "http", False),
    ((), "http://relay.example:8000", None, "http", False),
    (APP, "https://app.example", "relay.example:8000", "http", True),
    (APP, "https://app.example:443", "relay.example:8000", "http", True),
    (APP, "https://APP.example/", "relay.example:8000", "http", True),
    (APP, "http://app.example", "relay.example:8000", "http", False),
    (APP, "https://app.example:8443", "relay.example:8000", "http", False),
    (APP, "http://relay.example:8000", "relay.example:8000", "http", False),  # list replaces
    (("*",), "http://anything.example", "relay.example:8000", "http", True),
    (("*",), "null", "relay.example:8000", "http", True),
])
def test_origin(origins, origin, host, scheme, allowed):
    served = admission.served_origin(host, scheme)
    if allowed:
        admission.check_origin(origin, served, origins)
    else:
        with pytest.raises(Refusal) as info:
            admission.check_origin(origin, served, origins)
        assert info.value.status == 403 and info.value.code == "origin_not_allowed"


@pytest.mark.parametrize("raw, expected", [
    ("relay.example", (("relay.example", None),)),
    ("Relay.Example:8443, [::1]:8000,my_service", (("relay.example", 8443), ("[::1]", 8000),
                                                   ("my_service", None))),
    ("*", ("*",)),
])
def test_allowed_hosts_setting(raw, expected):
    assert cfg.load(["--allowed-hosts", raw], {}, dotenv_path=None).allowed_hosts == expected


@pytest.mark.parametrize("raw", ["https://relay.example", "relay.example:99999",
                                 "relay example", "[::1", "relay.example/path", "::1",
                                 "*.example.com"])
def test_a_malformed_allowed_host_names_the_setting(raw):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load([], {"ALLOWED_HOSTS": raw}, dotenv_path=None)
    assert info.value.setting == "ALLOWED_HOSTS" and "host[:port]" in str(info.value)


def test_allowed_origins_setting_is_normalised():
    config = cfg.load([], {"ALLOWED_ORIGINS": "HTTPS://App.Example:443/, http://[::1]:3000, *"},
                      dotenv_path=None)
    assert config.allowed_origins == (("https", "app.example", 443), ("http", "[::1]", 3000),
                                      "*")


@pytest.mark.parametrize("raw", ["app.example", "ftp://app.example", "https://app.example/x",
                                 "null", "https://app.example:0"])
def test_a_malformed_allowed_origin_names_the_setting(raw):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load([], {"ALLOWED_ORIGINS": raw}, dotenv_path=None)
    assert info.value.setting == "ALLOWED_ORIGINS"


def test_connection_caps_count_and_release():
    caps = Connections(total=3, per_address=2)
    first = caps.acquire("a")
    caps.acquire("a")
    with pytest.raises(Refusal) as info:
        caps.acquire("a")
    assert info.value.status == 429
    caps.acquire("b")
    with pytest.raises(Refusal) as info:
        caps.acquire("c")
    assert info.value.status == 503
    first.release()
    caps.acquire("c")
    assert caps.total == 3 and dict(caps.by_address) == {"a": 1, "b": 1, "c": 1}


def test_a_slot_is_released_once_however_often_its_connection_ends():
    """A connection ends on several paths (a failed handshake, the socket closing, shutdown);
    a second release must not free a slot another connection holds."""
    caps = Connections(total=2, per_address=2)
    slot = caps.acquire("a")
    caps.acquire("a")
    assert slot.address == "a"
    slot.release()
    slot.release()
    assert caps.total == 1 and dict(caps.by_address) == {"a": 1}
    caps.acquire("a")
    with pytest.raises(Refusal):
        caps.acquire("a")


def test_no_caps_by_default():
    caps = Connections()
    for _ in range(10_000):
        caps.acquire("same")
    assert caps.total == 10_000


def query(**values):
    return {name: [value if isinstance(value, bytes) else value.encode()
                   for value in (items if isinstance(items, list) else [items])]
            for name, items in values.items()}


def test_query_values_are_one_text_value_per_known_parameter():
    assert admission.query_values(query(ns="shop.orders", ops="insert", filter='{"a": 1}',
                                        resume_after="82AB", access_token="t")) == {
        "ns": "shop.orders", "ops": "insert", "filter": '{"a": 1}', "resume_after": "82AB",
        "access_token": "t"}
    assert admission.query_values({}) == {}
    assert admission.query_values(query(ns="é")) == {"ns": "é"}


@pytest.mark.parametrize("arguments, code", [
    (query(colour="blue"), "unknown_parameter"),
    (query(ns="shop", since="yesterday"), "unknown_parameter"),
    (query(NS="shop"), "unknown_parameter"),                      # names are exact
    (query(ns=["shop", "shop.x"]), "repeated_parameter"),
    (query(access_token=["a", "a"]), "repeated_parameter"),
    (query(ns=b"\xff\xfe"), "invalid_encoding"),
    (query(colour=b"\xff"), "invalid_encoding"),
])
def test_query_refusals(arguments, code):
    with pytest.raises(Refusal) as info:
        admission.query_values(arguments)
    assert info.value.code == code and info.value.status == 400
    assert json.loads(info.value.body()) == {"error": code, "message": info.value.message}


def test_a_query_over_the_bound_is_refused_before_it_is_read():
    admission.check_query_size("a" * admission.MAX_QUERY_BYTES)
    with pytest.raises(Refusal) as info:
        admission.check_query_size("a" * (admission.MAX_QUERY_BYTES + 1))
    assert info.value.status == 414 and info.value.code == "query_too_large"
