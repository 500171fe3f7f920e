"""Resume tokens as the relay reads them: the id a client holds, and what a token says.

MongoDB's resume token is ``{_data: <hex>, _typeBits: <binary>}`` (pipeline/resume_token.cpp): the
hex of a KeyString V1 of (clusterTime, version, tokenType, txnOpIndex, fromInvalidate, uuid,
eventIdentifier[, fragmentNum]), and — only when the key holds a NumberLong, a double or a
Decimal128 — the KeyString's type bits, without which MongoDB decodes the key as int32 and the
resume fails (280, or 50810 for a fraction). So the id a client holds is the whole token, in one
URL- and header-safe string: ``<_data>``, or ``<_data>.<_typeBits in base64url, no padding>``.

Ids order as their ``_data`` alone: KeyStrings compare bytewise in the order of the values they
encode, so the hex orders events in a deployment; two tokens with one ``_data`` are one event
(resume_token.cpp: "'_hexKeyString' is enough to determine equality").

The KeyString begins with the cluster time — 0x82 (Timestamp), then its eight big-endian bytes —
and a token's type can be read right after it: the version as a one-byte int (0x2B, then value
shifted left one: 0x2B02 v1, 0x2B04 v2), then tokenType 0 — a high-water mark — as the
zero byte 0x29 (key_string.cpp CType: kNumericZero 41, kNumericPositive1ByteInt 43), or 128, an
event. A high-water mark holds nothing but that time ("High water mark tokens only populate the
clusterTime, version, and tokenType fields"), so it says nothing about any event.
"""

from __future__ import annotations

import base64
import binascii
import string
from collections.abc import Mapping
from typing import Any

from bson.binary import Binary

MAX_ID_LENGTH = 4096
SEPARATOR = "."  # below every hex digit, so an id's string order is still its _data's
TIMESTAMP_TYPE = "82"
CLUSTER_TIME = slice(2, 18)
SECONDS = slice(2, 10)
CLUSTER_TIME_DIGITS = 18
# After the cluster time: a small version (0x2B and one byte), then tokenType 0 (0x29).
VERSION_TYPE = "2B"
HIGH_WATER_MARK_TYPE = "29"
_HEX = frozenset(string.hexdigits)
_BASE64URL = frozenset(string.ascii_letters + string.digits + "-_")


def token_id(token: Mapping[str, Any]) -> str:
    """The id of a resume token document as the driver decodes it; ValueError if it is none."""
    try:
        data = token["_data"]
    except (KeyError, TypeError):
        raise ValueError(f"not a resume token: {token!r}") from None
    if not isinstance(data, str):
        raise ValueError(f"resume token _data is not a string: {token!r}")
    bits = token.get("_typeBits")
    if not bits:
        return data
    if not isinstance(bits, bytes):
        raise ValueError(f"resume token _typeBits is not binary: {token!r}")
    return data + SEPARATOR + base64.urlsafe_b64encode(bits).rstrip(b"=").decode()


def token_document(text: str) -> dict[str, Any]:
    """The resume token an id stands for, to resume a change stream with."""
    data, _, suffix = text.partition(SEPARATOR)
    if not suffix:
        return {"_data": data}
    return {"_data": data, "_typeBits": Binary(_unpadded(suffix), 0)}


def parse_id(text: str) -> str:
    """Validate an id a client sent (``resume_after``, ``Last-Event-ID``): the hex in MongoDB's
    case, the type bits exactly as given. Raises ValueError with a message for the client."""
    if not text:
        raise ValueError("resume_after is empty; give the id of your newest event")
    if len(text) > MAX_ID_LENGTH:
        raise ValueError(f"resume_after is longer than {MAX_ID_LENGTH} characters")
    data, dot, suffix = text.partition(SEPARATOR)
    if len(data) % 2 or not _HEX.issuperset(data):
        raise ValueError(
            "resume_after must be an event's id — its _id._data, then '.' and its _id._typeBits "
            "in base64url if it has them — or a position message's resume_after, e.g. "
            "8263A1B2C3000000012B0229296E04")
    if len(data) < CLUSTER_TIME_DIGITS or data[:2] != TIMESTAMP_TYPE:
        raise ValueError(
            "resume_after is not a MongoDB resume token (those start with 82 and a cluster "
            "time); give the id of an event this relay sent")
    if dot:
        if not suffix or not _BASE64URL.issuperset(suffix) or len(suffix) % 4 == 1:
            raise ValueError("the part of resume_after after '.' must be the token's _typeBits "
                             "in base64url without padding, as the relay wrote it")
        _unpadded(suffix)
    return data.upper() + dot + suffix


def _unpadded(suffix: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(suffix + "=" * (-len(suffix) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("the type bits of resume_after are not base64url") from None


def order_key(text: str) -> str:
    """What ids are ordered by: the ``_data`` hex."""
    return text.partition(SEPARATOR)[0]


def seconds(text: str) -> int:
    """The cluster time's seconds."""
    return int(text[SECONDS], 16)


def cluster_time(text: str) -> int:
    """The cluster time as one number, seconds then increment: MongoDB's LogicalTime, in which
    ``+ 1`` is the next tick (LogicalTime::addTicks)."""
    return int(text[CLUSTER_TIME], 16)


def is_high_water_mark(text: str) -> bool:
    """A high-water mark token (tokenType 0); False for events, and for what cannot be told
    (version 0 tokens have no type and no high-water marks)."""
    after = text[CLUSTER_TIME_DIGITS:]
    return after[:2] == VERSION_TYPE and after[4:6] == HIGH_WATER_MARK_TYPE


def high_water_mark(at: str, like: str) -> str:
    """The high-water mark at ``at``'s cluster time, as MongoDB spelled the high-water mark
    ``like``: all of a high-water mark but its time is its version and constant fields
    (resume_token.cpp makeHighWaterMarkToken), and a timestamp's KeyString is its eight bytes."""
    return TIMESTAMP_TYPE + at[CLUSTER_TIME] + order_key(like)[CLUSTER_TIME_DIGITS:]


def returned_all_before(returned: str, floor: str, opened_from: str) -> bool:
    """A change stream opened from ``opened_from`` just came back empty with ``returned`` as its
    postBatchResumeToken: has it returned every event before ``floor``?

    Every event up to ``returned``, by its definition; and every event of ``returned``'s own
    cluster time, unless ``returned`` is the high-water mark the stream was opened from. The
    events that share a cluster time are one oplog entry (a transaction's commit, a batched
    delete), read whole; ``returned`` is the last event read, or a high-water mark at the newest
    entry read (query/collection_scan.cpp setLatestOplogEntryTimestamp, which
    plan_executor_pipeline.cpp reports at the end of a batch) — but the one a stream starts from
    is a time not read yet, e.g. a fresh stream's one tick past the newest entry. And no time lies
    between a cluster time and its next tick, where a high-water mark sorts before every event.
    """
    if order_key(returned) >= order_key(floor):
        return True
    if is_high_water_mark(returned) and order_key(returned) == order_key(opened_from):
        return False
    time, bound = cluster_time(returned), cluster_time(floor)
    return bound <= time or (bound == time + 1 and is_high_water_mark(floor))
