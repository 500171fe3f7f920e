"""Resume tokens as the relay reads them: the id of a token, its order, time and type.

The tokens here are the test primary's, which encodes them as MongoDB's resume_token.cpp does
(KeyString V1, ``_typeBits`` only when not all zero); PyMongo hands them over as it would a real
server's, ``_typeBits`` as ``bytes``.
"""

from __future__ import annotations

import base64

import bson
import pytest
from bson import Decimal128, Int64, ObjectId, Timestamp
from bson.binary import Binary
from hypothesis import given
from hypothesis import strategies as st

from changerelay import tokens
from changerelay.primary.tokens import HWM_TOKEN, TokenData, parse_token

T = Timestamp(1_700_000_000, 7)
UUID = Binary(bytes(range(16)), 4)


def event_token(key, at=T, txn_op_index=0, fragment=None) -> dict:
    """An event's token as PyMongo decodes it off the wire."""
    data = TokenData(at, txn_op_index=txn_op_index, uuid=UUID, fragment=fragment,
                     event_id={"operationType": "insert", "documentKey": {"_id": key}})
    return bson.decode(bson.encode({"t": data.encode()}))["t"]


def hwm(at=T) -> str:
    return TokenData(at, token_type=HWM_TOKEN).encode()["_data"]


def test_a_token_without_type_bits_is_its_data():
    token = event_token(5)
    assert set(token) == {"_data"}
    assert tokens.token_id(token) == token["_data"]


@pytest.mark.parametrize("key", [Int64(2 ** 40 + 7), 1.5, Decimal128("2.5"), Int64(5),
                                 [1.5, "x"], {"a": Int64(-3)}])
def test_type_bits_follow_the_data_in_base64url_without_padding(key):
    token = event_token(key)
    bits = token["_typeBits"]
    assert isinstance(bits, bytes)
    expected = base64.urlsafe_b64encode(bits).rstrip(b"=").decode()
    assert tokens.token_id(token) == f"{token['_data']}.{expected}"


@pytest.mark.parametrize("key", [Int64(2 ** 40 + 7), 1.5, -0.25, Decimal128("2.5"), 7,
                                 "text", ObjectId(), Int64(-(2 ** 60))])
def test_an_id_round_trips_the_whole_token(key):
    token = event_token(key)
    text = tokens.token_id(token)
    assert tokens.parse_id(text) == text
    document = tokens.token_document(text)
    assert document["_data"] == token["_data"]
    assert bytes(document.get("_typeBits", b"")) == token.get("_typeBits", b"")
    # what MongoDB decodes from it is the event's key, with its type
    assert parse_token(dict(document)) == parse_token(
        {**token, **({"_typeBits": Binary(token["_typeBits"])} if "_typeBits" in token else {})})


def test_ids_are_url_and_header_safe():
    for bits in (bytes([0xFB, 0xFF]), bytes([0xFF, 0xFE, 0xFD]), bytes(range(40))):
        text = tokens.token_id({"_data": "82" + "00" * 8, "_typeBits": bits})
        suffix = text.split(".")[1]
        assert set(suffix) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                  "0123456789-_")


def test_parsing_upper_cases_the_data_and_keeps_the_suffix_as_it_is():
    token = event_token(Int64(2 ** 40 + 7))
    suffix = tokens.token_id(token).split(".")[1]
    assert suffix != suffix.upper()  # this token's bits have lower-case letters in base64
    assert tokens.parse_id(token["_data"].lower() + "." + suffix) == (
        token["_data"] + "." + suffix)


@pytest.mark.parametrize("text", [
    "", "xyz", "abc", "82" * 3000, "82 63", "8263A1B2C3000000012B0G", '{"_data": "82"}',
    "ABCDEF", "8263A1", "0163A1B2C3000000012B04",
    "8263A1B2C3000000012B04.",            # nothing after the dot
    "8263A1B2C3000000012B04.gA=",         # padding
    "8263A1B2C3000000012B04.g+A",         # base64, not base64url
    "8263A1B2C3000000012B04.gAB.gA",      # two suffixes
    "8263A1B2C3000000012B04.g",           # a length base64 cannot have
    ".gAE",
])
def test_what_is_not_an_id_is_refused(text):
    with pytest.raises(ValueError):
        tokens.parse_id(text)


def test_ids_order_by_their_data_alone():
    a, b = event_token(Int64(2 ** 40 + 7)), event_token(Int64(2 ** 40 + 8))
    ids = sorted([tokens.token_id(b), tokens.token_id(a)], key=tokens.order_key)
    assert ids == [tokens.token_id(a), tokens.token_id(b)]
    whole = tokens.token_id(a)
    assert tokens.order_key(whole) == tokens.order_key(a["_data"]) == a["_data"]


NUMBERS = st.one_of(
    st.integers(-(2 ** 63), 2 ** 63 - 1).map(Int64),
    st.integers(-(2 ** 31), 2 ** 31 - 1),
    st.floats(min_value=-(2.0 ** 62), max_value=2.0 ** 62).filter(lambda x: abs(x) > 2.0 ** -200))


@given(st.lists(NUMBERS, min_size=2, max_size=6))
def test_order_keys_sort_as_mongodb_sorts_the_events(keys):
    """Events at one cluster time sort by their key's value, whatever its numeric type (Python
    compares ints and floats exactly, as KeyString orders them)."""
    ids = [tokens.token_id(event_token(key)) for key in keys]
    expected = [ids[i] for i in sorted(range(len(keys)), key=lambda i: (keys[i], i))]
    assert sorted(ids, key=tokens.order_key) == expected


def test_cluster_time_and_seconds():
    token = event_token(1, at=Timestamp(0x63A1B2C3, 5))
    assert tokens.seconds(token["_data"]) == 0x63A1B2C3
    assert tokens.cluster_time(token["_data"]) == (0x63A1B2C3 << 32) | 5


def test_high_water_marks_are_told_apart_from_events():
    assert tokens.is_high_water_mark(hwm())
    for token in (event_token(1), event_token(Int64(2 ** 40)), event_token(1, txn_op_index=3)):
        assert not tokens.is_high_water_mark(tokens.token_id(token))
    assert not tokens.is_high_water_mark("8263A1B2C3000000012B04")  # too short to tell: no
    assert not tokens.is_high_water_mark("8263A1B2C300000001" + "29296E04")  # version 0: none


def test_a_high_water_mark_is_made_at_a_time_as_mongodb_spells_one():
    later = Timestamp(T.time + 100, 3)
    made = tokens.high_water_mark(tokens.token_id(event_token(Int64(2 ** 40), at=later)),
                                  like=hwm())
    assert made == hwm(later)
    assert parse_token({"_data": made}) == TokenData(later, token_type=HWM_TOKEN)
    assert tokens.high_water_mark(hwm(later), like=hwm()) == hwm(later)


START = event_token(0, at=Timestamp(T.time - 50, 1))  # where the stream was opened from
NEXT_TICK = Timestamp(T.time, T.inc + 1)


@pytest.mark.parametrize(("returned", "floor", "opened_from", "covered"), [
    # the event at T was the last one returned: every event at T is in (one oplog entry)
    (event_token(1), hwm(NEXT_TICK), START, True),
    (event_token(1), hwm(Timestamp(T.time + 1, 1)), START, False),  # a time between may hold some
    (event_token(1), hwm(T), START, True),                           # before the event: passed
    (event_token(Int64(2 ** 40)), tokens.token_id(event_token(9, txn_op_index=4)), START, True),
    (event_token(1), tokens.token_id(event_token(9, at=NEXT_TICK)), START, False),
    # a high-water mark read at T: its entry was read, like an event's
    ({"_data": hwm()}, hwm(NEXT_TICK), START, True),
    ({"_data": hwm()}, hwm(Timestamp(T.time, T.inc + 2)), START, False),
    # ...but the one the stream started from is a time still to be read
    ({"_data": hwm()}, hwm(NEXT_TICK), {"_data": hwm()}, False),
    ({"_data": hwm()}, hwm(), {"_data": hwm()}, True),
    # the tick after the last of a second: the next second's first increment
    (event_token(1, at=Timestamp(T.time, 0xFFFFFFFF)), hwm(Timestamp(T.time + 1, 0)), START, True),
])
def test_after_an_empty_batch_what_is_known_to_be_returned(returned, floor, opened_from, covered):
    assert tokens.returned_all_before(tokens.token_id(returned), floor,
                                      tokens.token_id(opened_from)) is covered
