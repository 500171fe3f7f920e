"""Resume tokens: KeyString V1 encodings of a change event's position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bson
from bson import ObjectId, Timestamp
from bson.binary import Binary

from changerelay.primary.errors import CommandError

# MongoDB resume tokens are KeyString V1 encodings of (clusterTime, version, tokenType, txnOpIndex,
# fromInvalidate, uuid, eventIdentifier), hex-encoded. Those parts are encoded the same way here,
# so tokens look like the real thing and sort the same way: by cluster time, then a high-water
# mark before any event at the same time, then an event before the invalidate it causes.

TOKEN_VERSION = 2
EVENT_TOKEN, HWM_TOKEN = 128, 0


def _ks_int(n: int) -> bytes:
    if n == 0:
        return b"\x29"
    magnitude = abs(n) << 1
    size = (magnitude.bit_length() + 7) // 8
    body = magnitude.to_bytes(size, "big")
    if n > 0:
        return bytes([0x2A + size]) + body
    return bytes([0x29 - size]) + bytes(b ^ 0xFF for b in body)


def _ks_cstring(s: str) -> bytes:
    return s.encode().replace(b"\x00", b"\x00\xff") + b"\x00"


def _ks_value(value: Any) -> bytes:
    if value is None:
        return b"\x14"
    if isinstance(value, bool):
        return b"\x6f" if value else b"\x6e"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return _ks_int(value)
    if isinstance(value, str):
        return b"\x3c" + _ks_cstring(value)
    if isinstance(value, ObjectId):
        return b"\x64" + value.binary
    if isinstance(value, Timestamp):
        return b"\x82" + value.time.to_bytes(4, "big") + value.inc.to_bytes(4, "big")
    if isinstance(value, Binary):
        return b"\x5a" + bytes([len(value), value.subtype]) + bytes(value)
    if isinstance(value, dict):
        out = b"\x46"
        for key, item in value.items():
            encoded = _ks_value(item)
            out += encoded[:1] + _ks_cstring(key) + encoded
        return out + b"\x00"
    # Types no test needs sorted (doubles, dates, arrays...): opaque but unique per value.
    return b"\x3c" + _ks_cstring(bson.encode({"": value}).hex())


def make_token(ts: Timestamp, *, coll_uuid: Binary | None = None, event_id: dict | None = None,
               from_invalidate: bool = False) -> str:
    """The ``_data`` of an event token, or of a high-water mark when ``event_id`` is None."""
    parts = [_ks_value(ts), _ks_int(TOKEN_VERSION)]
    if event_id is None:
        parts += [_ks_int(HWM_TOKEN), _ks_int(0), _ks_value(False), _ks_value(None)]
    else:
        parts += [_ks_int(EVENT_TOKEN), _ks_int(0), _ks_value(from_invalidate),
                  _ks_value(coll_uuid), _ks_value(event_id)]
    return (b"".join(parts) + b"\x04").hex().upper()


@dataclass(frozen=True)
class TokenData:
    data: str  # normalised (upper-case) hex
    cluster_time: Timestamp
    version: int
    token_type: int
    from_invalidate: bool


def parse_token(token: Any) -> TokenData:
    """Decode a resume token document, failing with the errors mongod gives for bad ones."""
    if not isinstance(token, dict):
        raise CommandError(14, "BSON field '$changeStream.resumeAfter' is the wrong type "
                               f"'{type(token).__name__}', expected type 'object'")
    data = token.get("_data")
    if not isinstance(data, str):
        raise CommandError(40647, "Bad resume token: _data of missing or of wrong type. "
                                  f"Expected string, got {token}")
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        raise CommandError(9, "resume token string was not a valid hex string") from None
    if not raw:
        raise CommandError(40649, "invalid empty resume token")
    reader = _KeyStringReader(raw)
    if raw[0] != 0x82:
        raise CommandError(50811, f"KeyString format error: Unknown type: {raw[0]}")
    reader.pos = 1
    ts = Timestamp(reader.take_uint(4), reader.take_uint(4))
    version = reader.take_int("Resume Token does not contain version", 50796)
    if version not in (1, 2):
        raise CommandError(50795, "Invalid Resume Token: only supports version 0, 1 and 2")
    token_type = reader.take_int("Resume Token does not contain tokenType", 51055)
    if token_type not in (EVENT_TOKEN, HWM_TOKEN):
        raise CommandError(51057, f"Token type {token_type} not recognized")
    reader.take_int("Resume Token does not contain txnOpIndex", 50793)
    flag = reader.take_byte("Resume Token does not contain fromInvalidate", 50872)
    if flag not in (0x6E, 0x6F):
        raise CommandError(50870, "Resume Token fromInvalidate is not a boolean.")
    return TokenData(data.upper(), ts, version, token_type, flag == 0x6F)


class _KeyStringReader:
    def __init__(self, raw: bytes):
        self.raw = raw
        self.pos = 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.raw):
            raise CommandError(50811, "KeyString format error: unexpected end of buffer")

    def take_uint(self, n: int) -> int:
        self._need(n)
        value = int.from_bytes(self.raw[self.pos:self.pos + n], "big")
        self.pos += n
        return value

    def take_byte(self, missing: str, code: int) -> int:
        if self.pos >= len(self.raw) or self.raw[self.pos] == 0x04:
            raise CommandError(code, missing)
        self.pos += 1
        return self.raw[self.pos - 1]

    def take_int(self, missing: str, code: int) -> int:
        ctype = self.take_byte(missing, code)
        if ctype == 0x29:
            return 0
        if 0x2B <= ctype <= 0x32:
            return self.take_uint(ctype - 0x2A) >> 1
        raise CommandError(50811, f"KeyString format error: Unknown type: {ctype}")
