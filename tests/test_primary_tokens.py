"""The test primary's resume tokens against MongoDB's KeyString V1 and its type bits.

Expected bytes are worked out from storage/key_string.cpp and key_string.h (TypeBits: two bits
per number - int 00, long 01, double 10, decimal 11 and six exponent bits - one per string,
packed from the low bit; written as one byte when it fits in seven bits, else a size byte with the
high bit set) and pipeline/resume_token.cpp (the key is clusterTime, version, tokenType,
txnOpIndex, fromInvalidate, uuid, eventIdentifier; ``_typeBits`` only when a bit is 1).
"""

from __future__ import annotations

import datetime
import uuid

import bson
import pytest
from bson import ObjectId, Timestamp
from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.int64 import Int64

from changerelay.primary.errors import CommandError
from changerelay.primary.tokens import HWM_TOKEN, TokenData, high_water_mark, parse_token

TS = Timestamp(1_700_000_000, 3)
UUID = Binary.from_uuid(uuid.UUID(int=7))


def event_token(key, *, txn_op_index: int = 0) -> dict:
    return TokenData(TS, txn_op_index=txn_op_index, uuid=UUID,
                     event_id={"operationType": "insert", "documentKey": {"_id": key}}).encode()


@pytest.mark.parametrize(("key", "type_bits"), [
    (1, None), (2 ** 31 - 1, None), ("a", None), (ObjectId("65a1b2c3d4e5f60718293a4b"), None),
    ({"a": 1, "b": "x"}, None), (True, None), (None, None),
    # version 00, tokenType 00, txnOpIndex 00, "insert" 0 (bits 0-6), then long 01: bit 8 set,
    # nine bits in two bytes, after a size byte
    (Int64(5), b"\x82\x00\x01"), (2 ** 31, b"\x82\x00\x01"), (-(2 ** 40), b"\x82\x00\x01"),
    # double 10: bit 7 set, bit 8 clear - nine bits again
    (1.5, b"\x82\x80\x00"), (2.0, b"\x82\x80\x00"), (-0.25, b"\x82\x80\x00"),
    # decimal 11 then exponent 6176 & 63 = 32 (100000): bits 7, 8 and 9
    (Decimal128("5"), b"\x82\x80\x03"),
    ({"n": Int64(1)}, b"\x82\x00\x01"),
])
def test_type_bits_exactly_when_mongodb_writes_them(key, type_bits):
    token = event_token(key)
    assert token.get("_typeBits") == (None if type_bits is None else Binary(type_bits, 0))


def test_high_water_marks_have_no_type_bits():
    assert set(high_water_mark(TS)) == {"_data"}
    assert parse_token(high_water_mark(TS)) == TokenData(TS, token_type=HWM_TOKEN)


KEYS_IN_ORDER = [-(2 ** 40), -5, -1.5, -1, -0.5, 0, 0.25, 1, 1.5, Int64(2), 2.5, 2 ** 31, 2 ** 40,
                 "a", "b", {"a": 1}, ObjectId("65a1b2c3d4e5f60718293a4b"), True,
                 datetime.datetime(2024, 1, 1)]


def test_data_sorts_as_mongodb_orders_the_keys():
    data = [event_token(key)["_data"] for key in KEYS_IN_ORDER]
    assert data == sorted(data) and len(set(data)) == len(data)


def test_txn_op_index_sorts_before_the_key():
    assert event_token(9, txn_op_index=0)["_data"] < event_token(1, txn_op_index=1)["_data"]


@pytest.mark.parametrize("key", [*KEYS_IN_ORDER, Decimal128("5.0"), Decimal128("-0.5")])
def test_whole_tokens_round_trip(key):
    parsed = parse_token(event_token(key))
    expected = {"operationType": "insert", "documentKey": {"_id": key}}
    assert bson.encode(parsed.event_id) == bson.encode(expected)  # the same BSON types too
    assert parsed.encode() == event_token(key)


@pytest.mark.parametrize(("key", "decoded"), [
    (Int64(5), 5), (2 ** 40 + 7, 7), (2 ** 31, -(2 ** 31)), (2.0, 2)])
def test_data_alone_decodes_numbers_as_int32(key, decoded):
    """toBsonValue with zero type bits: kInt, and the C++ int() cast keeps the low 32 bits."""
    parsed = parse_token({"_data": event_token(key)["_data"]})
    found = parsed.event_id["documentKey"]["_id"]
    assert found == decoded and type(found) is int


@pytest.mark.parametrize("key", [1.5, -0.25, 2 ** 40 + 0.5])
def test_data_alone_of_a_fractional_double_is_a_keystring_error(key):
    with pytest.raises(CommandError) as caught:
        parse_token({"_data": event_token(key)["_data"]})
    assert caught.value.code in (50810, 50825)  # fraction / small magnitude: "expected decimal"
    assert caught.value.errmsg.startswith("KeyString format error: ")


def test_type_bits_of_the_wrong_binary_subtype_are_refused():
    token = {**event_token(Int64(5)), "_typeBits": Binary(b"\x81\x80", 4)}
    with pytest.raises(CommandError) as caught:
        parse_token(token)
    assert caught.value.code == 40648
