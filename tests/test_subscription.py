"""Subscriptions from query strings, and access rules from token claims."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import jwt
import pytest

from changerelay import events as ev
from changerelay.admission import Refusal
from changerelay.auth import Authenticator
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription, parse

SCOPE = ("shop", None)


def args(**values):
    return values


def event(op="insert", db="shop", coll="orders", **fields):
    return ev.encode_change({"_id": {"_data": "82AA"}, "operationType": op,
                             "ns": {"db": db, "coll": coll} if db else None, **fields})


def sees(subscription, change) -> bool:
    return subscription.select([change]) == [change]


def test_empty_query_matches_everything_and_groups_together():
    a, resume = parse({}, SCOPE)
    b, _ = parse({}, SCOPE)
    assert resume is None and a == b == Subscription()
    batch = [event(), event("drop")]
    assert a.select(batch) is batch  # nothing to decide: the batch as it is


def test_same_subscription_same_key_regardless_of_order():
    a, _ = parse(args(ns="shop.a,shop.b", ops="insert,update"), SCOPE)
    b, _ = parse(args(ns="shop.b, shop.a", ops="update,insert"), SCOPE)
    assert a.key == b.key


def test_a_collection_named_star_is_not_the_whole_database():
    # MongoDB allows a collection named "*"; the hub shares one compiled subscription per key,
    # so equal keys for ns=shop and ns=shop.* would hand one client the other's namespaces.
    database, _ = parse(args(ns="shop"), SCOPE)
    star, _ = parse(args(ns="shop.*"), SCOPE)
    assert sees(database, event(coll="orders")) and not sees(star, event(coll="orders"))
    assert database.key != star.key


@pytest.mark.parametrize("query, code", [
    (args(ns="other"), "ns_outside_scope"),
    (args(ns="shop."), "invalid_ns"),
    (args(ns=""), "invalid_ns"),
    (args(ns="sh$op"), "invalid_ns"),
    (args(ops="insert,explode"), "unknown_operation_type"),
    (args(ops=","), "invalid_ops"),
    (args(filter="[1]"), "invalid_filter"),
    (args(resume_after="12345"), "invalid_resume_after"),
])
def test_refusals(query, code):
    with pytest.raises(Refusal) as info:
        parse(query, SCOPE)
    assert info.value.code == code and info.value.status == 400
    assert code in info.value.body()


def test_collection_scope_refuses_the_whole_database():
    with pytest.raises(Refusal):
        parse(args(ns="shop"), ("shop", "orders"))
    sub, _ = parse(args(ns="shop.orders"), ("shop", "orders"))
    assert sees(sub, event())


def test_namespace_matching_covers_database_level_events():
    sub, _ = parse(args(ns="shop.orders"), SCOPE)
    assert sees(sub, event())
    assert not sees(sub, event(coll="users"))
    assert sees(sub, event("dropDatabase", coll=None))   # the collection is gone too
    assert sees(sub, event("invalidate", db=None))       # the stream itself ended
    whole, _ = parse(args(ns="shop"), SCOPE)
    assert sees(whole, event(coll="users"))


def test_ops_and_filter_combine():
    sub, resume = parse(args(ops="insert", filter='{"fullDocument.total": {"$gte": 10}}',
                             resume_after="8263a1b2c3000000012b04"), SCOPE)
    assert resume == "8263A1B2C3000000012B04"
    assert sees(sub, event(fullDocument={"total": 12}))
    assert not sees(sub, event(fullDocument={"total": 2}))
    assert not sees(sub, event("update", fullDocument={"total": 12}))


def test_access_rule_and_client_filter_are_anded():
    claims_rule = AccessRule({"fullDocument.owner": "alice"}, post_images=True)
    sub, _ = parse(args(filter='{"fullDocument.n": 1}'), SCOPE)
    restricted = Subscription(sub.namespaces, sub.ops, sub.filter, claims_rule)
    assert sees(restricted, event(documentKey={"_id": 1}, fullDocument={"owner": "alice",
                                                                            "n": 1}))
    assert not sees(restricted, event(documentKey={"_id": 1}, fullDocument={"owner": "bob",
                                                                                "n": 1}))
    assert restricted.key != sub.key


SECRET = "s" * 40


def authenticate(token=None, query_token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    query = {"access_token": [query_token.encode()]} if query_token else {}
    request = SimpleNamespace(headers=headers, query_arguments=query)
    return Authenticator(SECRET, ["HS256"]).authenticate(request)


def make(claims, key=SECRET, algorithm="HS256"):
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, key, algorithm=algorithm)


def test_token_claims_restrict_namespaces():
    auth = Authenticator(SECRET, ["HS256"])
    claims = authenticate(make({"ns": ["shop.orders"]}))
    sub, _ = parse({}, SCOPE)
    assert auth.restrict(sub, claims).namespaces == frozenset({("shop", "orders")})
    inside, _ = parse(args(ns="shop.orders"), SCOPE)
    assert auth.restrict(inside, claims).namespaces == frozenset({("shop", "orders")})
    outside, _ = parse(args(ns="shop.users"), SCOPE)
    with pytest.raises(Refusal) as info:
        auth.restrict(outside, claims)
    assert info.value.status == 403
    assert authenticate(query_token=make({})).namespaces is None


def assert_rule_refused(auth, spec, refused, code, hint):
    """A token whose filter claim is ``spec``: refused 403 ``code`` with ``hint`` in its message,
    or admitted with a row rule."""
    request = SimpleNamespace(headers={"Authorization": f"Bearer {make({'filter': spec})}"},
                              query_arguments={})
    if refused:
        with pytest.raises(Refusal) as info:
            auth.authenticate(request)
        assert (info.value.code, info.value.status) == (code, 403)
        assert hint in info.value.message
    else:
        assert auth.authenticate(request).rule is not None


@pytest.mark.parametrize("claims, code", [
    ({"filter": {"$where": "1"}}, "invalid_token"),
    ({"filter": "fullDocument.owner"}, "invalid_token"),
    ({"ns": 5}, "invalid_token"),
])
def test_bad_claims_are_refused(claims, code):
    with pytest.raises(Refusal) as info:
        authenticate(make(claims))
    assert info.value.code == code and info.value.status == 401


@pytest.mark.parametrize("ns", [
    "shop.", [""], ["shop."], "", ["shop", ".x"], ["sh op"], ["shop.a$b"], "shop,,x",
    ["shop.system.users"], [5], [["shop"]],
])
def test_a_malformed_ns_claim_is_an_invalid_token_never_a_wider_grant(ns):
    with pytest.raises(Refusal) as info:
        authenticate(make({"ns": ns}))
    assert (info.value.code, info.value.status) == ("invalid_token", 401)
    assert "ns" in info.value.message


@pytest.mark.parametrize("mode, spec, refused", [
    ("updateLookup", {"fullDocument.owner": "alice"}, True),
    ("updateLookup", {"$or": [{"documentKey._id": 1}, {"fullDocument.public": True}]}, True),
    ("updateLookup", {"documentKey._id": 1}, False),
    ("default", {"fullDocument.owner": "alice"}, False),       # updates carry none: withheld
    ("whenAvailable", {"fullDocument.owner": "alice"}, False),
    ("required", {"fullDocument.owner": "alice"}, False),
])
def test_a_rule_on_the_document_needs_post_images(mode, spec, refused):
    assert_rule_refused(Authenticator(SECRET, ["HS256"], mode), spec, refused,
                        "row_rules_need_post_images", "FULL_DOCUMENT=whenAvailable")


def test_an_empty_ns_claim_grants_nothing():
    with pytest.raises(Refusal) as info:
        authenticate(make({"ns": []}))
    assert (info.value.code, info.value.status) == ("ns_forbidden", 403)


def test_the_ns_claim_and_the_query_parse_namespaces_alike():
    auth = Authenticator(SECRET, ["HS256"])
    for text in ("shop.orders.2024", "shop.my orders", "shop.*"):
        claims = authenticate(make({"ns": [text]}))
        query, _ = parse(args(ns=text), SCOPE)
        assert auth.restrict(parse({}, SCOPE)[0], claims).namespaces == query.namespaces
        assert auth.restrict(query, claims).namespaces == query.namespaces


def signed(payload_text: str) -> str:
    """An HS256 token over exactly this payload text (PyJWT's encoder would refuse some)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload_text.encode())
    signature = b64(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


SOON = int(time.time()) + 86_400  # set at collection: a day, so no run of the suite outlives it


@pytest.mark.parametrize("claims, named", [
    ({"exp": str(SOON)}, "exp"),                # PyJWT takes numeric strings; the expiry pass can't
    ({"exp": SOON, "nbf": "100"}, "nbf"),
    ({"exp": SOON, "nbf": True}, "nbf"),
    ({"exp": SOON, "iat": "100"}, "iat"),
    ({"exp": SOON, "iat": False}, "iat"),
    ({"exp": SOON, "ns": None}, "ns"),          # present but null: not a list, and not "absent"
    ({"exp": SOON, "filter": None}, "filter"),
    ({"exp": SOON, "filter": []}, "filter"),
    ({"exp": SOON, "ns": {"shop": 1}}, "ns"),
])
def test_every_claim_the_relay_reads_is_type_checked_at_the_handshake(claims, named):
    with pytest.raises(Refusal) as info:
        authenticate(signed(json.dumps(claims)))
    assert (info.value.code, info.value.status) == ("invalid_token", 401)
    assert f"{named} claim" in info.value.message


@pytest.mark.parametrize("payload", ['{"exp": 1e999}', '{"exp": NaN}', '{"exp": true}'])
def test_non_finite_or_boolean_exp_is_refused(payload):
    with pytest.raises(Refusal) as info:
        authenticate(signed(payload))
    assert info.value.status == 401


def test_fractional_and_huge_exp_are_numbers_of_seconds():
    claims = authenticate(signed(json.dumps({"exp": SOON + 0.5, "iat": time.time() - 0.25})))
    assert claims.expires == SOON + 0.5
    assert authenticate(signed(json.dumps({"exp": 10**400}))).expires == 10**400


class Ending:
    def __init__(self, claims=None):
        self._claims = claims
        self.ended = False
        self.peer = "203.0.113.9"

    @property
    def claims(self):
        return self._claims

    def expire(self):
        self.ended = True


class BrokenState(Ending):
    @property
    def claims(self):
        raise TypeError("unsupported operand type(s) for +: 'str' and 'int'")


class BrokenTransport(Ending):
    def expire(self):
        self.ended = True
        raise OSError("the socket is gone")


def test_one_clients_bad_state_never_stops_the_expiry_pass(monkeypatch):
    from changerelay import auth

    auth_ = Authenticator(SECRET, ["HS256"])
    expired = [Ending(authenticate(make({}))) for _ in range(5)]  # exp: in 60 s
    fresh = Ending(authenticate(make({"exp": int(time.time()) + 7200})))
    broken, dying = BrokenState(), BrokenTransport(authenticate(make({})))
    anonymous = Ending(None)
    later = time.time() + 3600
    monkeypatch.setattr(auth.time, "time", lambda: later)
    auth_.expire([broken, dying, *expired[:2], fresh, anonymous, *expired[2:]])
    assert all(client.ended for client in expired)
    assert dying.ended
    assert broken.ended  # a client whose expiry cannot be read is closed, not kept
    assert not fresh.ended and not anonymous.ended


def test_the_leeway_is_the_setting_both_at_the_handshake_and_on_the_connection(monkeypatch):
    from changerelay import auth, config

    strict = Authenticator.from_config(config.load([], {"AUTH_JWT_SECRET": SECRET,
                                                       "AUTH_LEEWAY_SECONDS": "0"}))
    loose = Authenticator.from_config(config.load([], {"AUTH_JWT_SECRET": SECRET}))
    assert (strict.leeway_seconds, loose.leeway_seconds) == (0, 5)
    lapsed = make({"exp": int(time.time()) - 2})
    request = SimpleNamespace(headers={"Authorization": f"Bearer {lapsed}"}, query_arguments={})
    with pytest.raises(Refusal) as refused:
        strict.authenticate(request)
    assert refused.value.code == "token_expired"
    claims = loose.authenticate(request)  # two seconds past exp: within the default leeway
    clients = [Ending(claims), Ending(claims)]
    loose.expire(clients[:1])
    strict.expire(clients[1:])
    assert [client.ended for client in clients] == [False, True]
    later = time.time() + 5
    monkeypatch.setattr(auth.time, "time", lambda: later)
    loose.expire(clients[:1])
    assert clients[0].ended


def test_public_key_tokens_rs256_and_es256_only(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    auth = Authenticator.from_config(SimpleNamespace(
        auth_jwt_secret=None, auth_jwt_public_key=str(path), full_document="whenAvailable",
        redact=(), auth_leeway_seconds=5))
    good = make({"ns": ["shop"]}, key=private, algorithm="ES256")
    request = SimpleNamespace(headers={"Authorization": f"Bearer {good}"}, query_arguments={})
    assert auth.authenticate(request).namespaces == frozenset({("shop", None)})
    for token in (_hs256_with(pem), make({}, key=SECRET)):
        request = SimpleNamespace(headers={"Authorization": f"Bearer {token}"},
                                  query_arguments={})
        with pytest.raises(Refusal) as info:
            auth.authenticate(request)
        assert info.value.status == 401


def _hs256_with(key: bytes) -> str:
    """HS256 keyed with the public key's PEM text: the classic algorithm-confusion forgery."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(
        json.dumps({"exp": int(time.time()) + 60, "ns": ["shop"]}).encode())
    signature = b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


@pytest.mark.parametrize("spec, refused", [
    ({"fullDocument.owner": {"$ne": "bob"}}, True),            # the field is always gone
    ({"fullDocumentBeforeChange.owner": "alice"}, True),        # REDACT covers both images
    ({"fullDocument.owner.name": "alice"}, True),               # inside a redacted field
    ({"fullDocument.profile": {"$exists": True}}, True),        # above one: part of it is gone
    ({"fullDocument.cards.0.cvv": "123"}, True),                # array positions don't matter
    ({"updateDescription.updatedFields.owner": "x"}, True),
    ({"$or": [{"documentKey._id": 1}, {"fullDocument.owner": "a"}]}, True),
    ({"fullDocument.team": "red"}, False),
    ({"fullDocument.profiles": "x"}, False),                    # a name that only starts alike
    ({"documentKey._id": 1}, False),
])
def test_a_rule_that_reads_a_redacted_field_is_refused(spec, refused):
    """A redacted field is missing from every event, so a rule on it cannot decide anything:
    {"$ne": "bob"} would let every event through. Such a token is refused, not obeyed."""
    redact = ("fullDocument.owner", "fullDocument.profile.password", "fullDocument.cards.cvv")
    assert_rule_refused(Authenticator(SECRET, ["HS256"], "whenAvailable", redact), spec, refused,
                        "row_rule_reads_redacted_field", "REDACT")


def test_a_rename_out_of_the_tokens_grant_is_withheld():
    """A rename's ``to`` names another namespace: one outside the token's ns claim is a name the
    bearer may not learn. Within the grant, or without a token, renames arrive as before."""
    auth = Authenticator(SECRET, ["HS256"])
    claims = authenticate(make({"ns": ["shop.orders", "shop.archive"]}))
    granted = auth.restrict(parse({}, SCOPE)[0], claims)
    out = event("rename", to={"db": "shop", "coll": "secret_plans"})
    within = event("rename", to={"db": "shop", "coll": "archive"})
    assert not sees(granted, out)
    assert sees(granted, within)
    assert sees(granted, event("insert"))
    # The same namespaces asked for in the query, with no token: the client may know any name.
    asked, _ = parse(args(ns="shop.orders,shop.archive"), SCOPE)
    assert sees(asked, out) and asked != granted
