"""Resume tokens: KeyString V1 encodings of a change event's position, with their type bits.

MongoDB builds a token (pipeline/resume_token.cpp, ``ResumeToken(const ResumeTokenData&)``) as the
KeyString V1 encoding (storage/key_string.cpp) of (clusterTime, version, tokenType, txnOpIndex,
fromInvalidate, uuid, eventIdentifier[, fragmentNum]); ``_data`` is its hex, so tokens sort as
events do: by cluster time, a high-water mark before any event at that time, then txnOpIndex,
an event before the invalidate it causes, then the event identifier. KeyString orders values, not
types (1, 1.0 and NumberLong(1) encode alike), so the types go in separate *type bits*, written as
``_typeBits`` only when one of them is 1 - when the key holds a NumberLong, a double or a
Decimal128. ``getData()`` decodes ``_data`` with the type bits it is given: without them a
NumberLong comes back as a (truncated) int32 and a fractional double fails with 50810.
"""

from __future__ import annotations

import datetime
import math
import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bson import ObjectId, Timestamp
from bson.binary import Binary
from bson.datetime_ms import DatetimeMS
from bson.decimal128 import Decimal128
from bson.int64 import Int64

from changerelay.primary.errors import CommandError, not_implemented

TOKEN_VERSION = 2
EVENT_TOKEN, HWM_TOKEN = 128, 0

# key_string.cpp CType, and the end marker that closes every key.
NULL, NUMERIC, STRING, OBJECT, ARRAY, BINDATA, OID, BOOL, DATE, TIMESTAMP = (
    20, 30, 60, 70, 80, 90, 100, 110, 120, 130)
NAN, NEGATIVE_8_BYTE_INT, NEGATIVE_1_BYTE_INT, NEGATIVE_SMALL, ZERO, POSITIVE_SMALL = (
    30, 32, 39, 40, 41, 42)
POSITIVE_1_BYTE_INT, POSITIVE_8_BYTE_INT = 43, 50
FALSE, TRUE = 110, 111
END = 4
# key_string.h TypeBits: two bits per number, one per string.
INT, LONG, DOUBLE, DECIMAL = 0, 1, 2, 3
DECIMAL_EXPONENT_BITS = 6
INT32 = range(-(2 ** 31), 2 ** 31)


def format_error(code: int, message: str) -> CommandError:
    return CommandError(code, f"KeyString format error: {message}")


class _Encoder:
    """KeyString V1 with its type bits (key_string.cpp BuilderBase::_appendBsonValue)."""

    def __init__(self):
        self.out = bytearray()
        self.bits: list[int] = []

    def number_type(self, kind: int) -> None:
        self.bits += [kind >> 1, kind & 1]

    def value(self, value: Any) -> None:
        encode = _ENCODERS.get(type(value))
        if encode is None:  # a subclass (SON, RawBSONDocument...): by the first base known
            base = next((kind for kind in _ENCODERS if isinstance(value, kind)), None)
            if base is None:
                raise not_implemented(f"{type(value).__name__} values in a resume token's key")
            encode = _ENCODERS[base]
        encode(self, value)

    def null(self, _value: None) -> None:
        self.out.append(NULL)

    def boolean(self, value: bool) -> None:
        self.out.append(TRUE if value else FALSE)

    def int64(self, value: Int64) -> None:
        self.number_type(LONG)
        self.integer(int(value))

    def int_or_long(self, value: int) -> None:
        self.number_type(INT if value in INT32 else LONG)
        self.integer(value)

    def float(self, value: float) -> None:
        if value == 0 and math.copysign(1, value) < 0:
            raise not_implemented("-0.0 in a resume token's key")
        self.number_type(DOUBLE)
        self.double(value)

    def string(self, value: str) -> None:
        self.bits.append(0)  # a string, not a symbol
        self.out.append(STRING)
        self.cstring(value)

    def object(self, value: dict) -> None:
        self.out.append(OBJECT)
        for name, item in value.items():
            self.out.append(_generic_type(item))
            self.cstring(name)
            self.value(item)
        self.out.append(0)

    def array(self, value: list) -> None:
        self.out.append(ARRAY)
        for item in value:
            self.value(item)
        self.out.append(0)

    def object_id(self, value: ObjectId) -> None:
        self.out += bytes([OID]) + value.binary

    def timestamp(self, value: Timestamp) -> None:
        self.out += bytes([TIMESTAMP]) + struct.pack(">II", value.time, value.inc)

    def date(self, value: datetime.datetime) -> None:
        millis = int(DatetimeMS(value))
        self.out += bytes([DATE]) + struct.pack(">Q", (millis ^ (1 << 63)) & (2 ** 64 - 1))

    def binary(self, value: Binary) -> None:
        if len(value) >= 0xFF:
            raise not_implemented("binData of 255 bytes or more in a resume token's key")
        self.out += bytes([BINDATA, len(value), value.subtype]) + bytes(value)

    def cstring(self, text: str) -> None:
        self.out += text.encode().replace(b"\x00", b"\x00\xff") + b"\x00"

    def integer(self, n: int) -> None:
        """_appendInteger: zero, or the magnitude shifted left one (no fraction) in 1-8 bytes."""
        if n == 0:
            self.out.append(ZERO)
        else:
            self.preshifted(abs(n) << 1, n < 0)

    def preshifted(self, value: int, negative: bool) -> None:
        size = (value.bit_length() + 7) // 8
        body = value.to_bytes(size, "big")
        if negative:
            self.out += bytes([NEGATIVE_1_BYTE_INT - (size - 1)]) + _inverted(body)
        else:
            self.out += bytes([POSITIVE_1_BYTE_INT + (size - 1)]) + body

    def double(self, value: float, dcm: int = 0) -> None:
        """_appendDoubleWithoutTypeBits for NaN, zero, 2**-255 <= |x| < 1 and 1 <= |x| < 2**63."""
        negative, magnitude = value < 0, abs(value)
        if math.isnan(value):
            self.out.append(NAN)
        elif magnitude == 0:
            self.out.append(ZERO)
        elif magnitude < 1:
            if magnitude < 2.0 ** -255:
                raise not_implemented("doubles under 2**-255 in a resume token's key")
            bits = struct.unpack(">Q", struct.pack(">d", magnitude))[0]
            encoded = ((bits << 2) | dcm).to_bytes(8, "big")
            self.out += bytes([NEGATIVE_SMALL if negative else POSITIVE_SMALL])
            self.out += _inverted(encoded) if negative else encoded
        elif magnitude >= 2.0 ** 63:
            raise not_implemented("doubles of 2**63 or more in a resume token's key")
        elif magnitude.is_integer() and dcm == 0:
            self.preshifted(int(magnitude) << 1, negative)
        else:  # V1: integer part and binary fraction in 8 bytes, the DCM in the low 2 bits
            integer_part = int(magnitude)
            fraction_bytes = (64 - (integer_part << 1).bit_length()) // 8
            encoding = int(magnitude * 256 ** fraction_bytes)
            encoding += (integer_part + 1) << (fraction_bytes * 8)
            encoded = (encoding | dcm).to_bytes(8, "big")
            ctype = (NEGATIVE_8_BYTE_INT + fraction_bytes if negative
                     else POSITIVE_8_BYTE_INT - fraction_bytes)
            self.out.append(ctype)
            self.out += _inverted(encoded) if negative else encoded

    def decimal(self, value: Decimal128) -> None:
        """_appendNumberDecimal's common case: a non-zero decimal that is exactly a double."""
        number = value.to_decimal()
        if not number.is_finite() or number == 0 or Decimal(float(number)) != number:
            raise not_implemented("Decimal128 values other than exact doubles in a resume "
                                  "token's key")
        self.number_type(DECIMAL)
        biased_exponent = number.as_tuple().exponent + 6176  # Decimal128::kExponentBias
        stored = biased_exponent & ((1 << DECIMAL_EXPONENT_BITS) - 1)
        self.bits += [(stored >> i) & 1 for i in reversed(range(DECIMAL_EXPONENT_BITS))]
        self.double(float(number))

    def type_bits(self) -> bytes:
        """TypeBits::getBuffer(): nothing when all zero, one byte when it fits in seven bits
        (or eight with the high one clear), else a size byte with the high bit set, then data."""
        if not any(self.bits):
            return b""
        data = bytearray((len(self.bits) + 7) // 8)
        for i, bit in enumerate(self.bits):  # packed from low to high
            data[i // 8] |= bit << (i % 8)
        if len(data) == 1 and not data[0] & 0x80:
            return bytes(data)
        return bytes([0x80 | len(data)]) + bytes(data)


# By exact type first (bool before int, Int64 before int when searching by base).
_ENCODERS: dict[type, Any] = {
    type(None): _Encoder.null, bool: _Encoder.boolean, Int64: _Encoder.int64,
    int: _Encoder.int_or_long, float: _Encoder.float, Decimal128: _Encoder.decimal,
    str: _Encoder.string, dict: _Encoder.object, list: _Encoder.array,
    ObjectId: _Encoder.object_id, Timestamp: _Encoder.timestamp,
    datetime.datetime: _Encoder.date, Binary: _Encoder.binary,
}


def _inverted(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


_GENERIC_TYPES = {type(None): NULL, bool: BOOL, Int64: NUMERIC, int: NUMERIC, float: NUMERIC,
                  Decimal128: NUMERIC, str: STRING, dict: OBJECT, list: ARRAY, Binary: BINDATA,
                  ObjectId: OID, datetime.datetime: DATE, Timestamp: TIMESTAMP}


def _generic_type(value: Any) -> int:
    """bsonTypeToGenericKeyStringType: what precedes a field's name inside an object."""
    generic = _GENERIC_TYPES.get(type(value))
    if generic is None:
        generic = next((code for kind, code in _GENERIC_TYPES.items() if isinstance(value, kind)),
                       STRING)
    return generic


def encode_key(values: list[Any]) -> tuple[bytes, bytes]:
    """The KeyString of a key made of ``values`` and its type bits (b"" when all zero)."""
    encoder = _Encoder()
    for value in values:
        encoder.value(value)
    return bytes(encoder.out) + bytes([END]), encoder.type_bits()


@dataclass(frozen=True)
class TokenData:
    """ResumeTokenData: what a token says, in the order it sorts by."""

    cluster_time: Timestamp
    version: int = TOKEN_VERSION
    token_type: int = EVENT_TOKEN
    txn_op_index: int = 0
    from_invalidate: bool = False
    uuid: Binary | None = None
    event_id: dict | None = None
    fragment: int | None = None

    def encode(self) -> dict:
        """The token document: ``{_data: <hex>}``, with ``_typeBits`` when they are not zero."""
        values: list[Any] = [self.cluster_time, self.version, self.token_type, self.txn_op_index,
                             self.from_invalidate, self.uuid]
        if self.event_id is not None:
            values.append(self.event_id)
        if self.fragment is not None:
            values.append(self.fragment)
        data, type_bits = encode_key(values)
        document: dict[str, Any] = {"_data": data.hex().upper()}
        if type_bits:
            document["_typeBits"] = Binary(type_bits, 0)
        return document

    def event_key(self) -> bytes:
        """The event identifier's KeyString: equal exactly when MongoDB's Value comparison says
        so, and in the same order."""
        return encode_key([self.event_id])[0] if self.event_id is not None else b""


def high_water_mark(ts: Timestamp) -> dict:
    return TokenData(ts, token_type=HWM_TOKEN).encode()


def parse_token(token: Any) -> TokenData:
    """ResumeToken::getData(): decode a token document with its type bits, failing with the
    errors mongod gives for bad ones."""
    if not isinstance(token, dict):
        raise CommandError(14, "BSON field '$changeStream.resumeAfter' is the wrong type "
                               f"'{type(token).__name__}', expected type 'object'")
    data = token.get("_data")
    if not isinstance(data, str):
        raise CommandError(40647, "Bad resume token: _data of missing or of wrong type. "
                                  f"Expected string, got {token}")
    type_bits = token.get("_typeBits")
    if type_bits is not None and not (isinstance(type_bits, bytes) and
                                      getattr(type_bits, "subtype", 0) == 0):
        raise CommandError(40648, f"Bad resume token: _typeBits of wrong type {token}")
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        raise CommandError(9, "resume token string was not a valid hex string") from None
    values = _Decoder(raw, bytes(type_bits or b"")).key()
    return _token_data(values)


def _token_data(values: list[Any]) -> TokenData:
    if not values:
        raise CommandError(40649, "invalid empty resume token")
    if len(values) < 2:
        raise CommandError(50796, "Resume Token does not contain version")
    cluster_time, version, rest = values[0], values[1], values[2:]
    if not isinstance(version, int) or isinstance(version, Int64 | bool):
        raise CommandError(50854, "Invalid resume token: wrong type for version")
    if version not in (1, 2):
        raise CommandError(50795, "Invalid Resume Token: only supports version 0, 1 and 2")
    if not rest:
        raise CommandError(51055, "Resume Token does not contain tokenType")
    token_type = rest.pop(0)
    if token_type not in (EVENT_TOKEN, HWM_TOKEN):
        raise CommandError(51057, f"Token type {token_type} not recognized")
    if not rest:
        raise CommandError(50793, "Resume Token does not contain txnOpIndex")
    txn_op_index = rest.pop(0)
    if not isinstance(txn_op_index, int) or isinstance(txn_op_index, Int64 | bool):
        raise CommandError(50855, "Resume Token txnOpIndex is not an integer")
    if not rest:
        raise CommandError(50872, "Resume Token does not contain fromInvalidate")
    from_invalidate = rest.pop(0)
    if not isinstance(from_invalidate, bool):
        raise CommandError(50870, "Resume Token fromInvalidate is not a boolean.")
    uuid = rest.pop(0) if rest else None
    event_id = rest.pop(0) if rest else None
    fragment = rest.pop(0) if rest else None
    return TokenData(cluster_time, version, token_type, txn_op_index, from_invalidate, uuid,
                     event_id, fragment)


class _Decoder:
    """KeyString::toBsonSafe for the types :class:`_Encoder` writes."""

    def __init__(self, raw: bytes, type_bits: bytes):
        self.raw, self.pos = raw, 0
        self.bits = _type_bits(type_bits)
        self.bit = 0

    def key(self) -> list[Any]:
        values = []
        while self.pos < len(self.raw):
            ctype = self.byte()
            if ctype == END:
                break
            values.append(self.value(ctype))
        return values

    def byte(self) -> int:
        return self.take(1)[0]

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.raw):
            raise format_error(50811, "unexpected end of buffer")
        self.pos += n
        return self.raw[self.pos - n:self.pos]

    def read_bit(self) -> int:
        bit = self.bits[self.bit] if self.bit < len(self.bits) else 0
        self.bit += 1
        return bit

    def numeric_type(self) -> int:
        high = self.read_bit()
        return (high << 1) | self.read_bit()

    def cstring(self) -> str:
        end = self.raw.find(b"\x00", self.pos)
        while end != -1 and self.raw[end + 1:end + 2] == b"\xff":
            end = self.raw.find(b"\x00", end + 2)
        if end == -1:
            raise format_error(50816, "Failed to find null terminator in string.")
        text = self.raw[self.pos:end].replace(b"\x00\xff", b"\x00")
        self.pos = end + 1
        return text.decode()

    def value(self, ctype: int) -> Any:
        if ctype == NULL:
            return None
        if ctype in (FALSE, TRUE):
            return ctype == TRUE
        if ctype == STRING:
            self.read_bit()
            return self.cstring()
        if ctype == OBJECT:
            out = {}
            while self.byte() != 0:  # each field's generic type, then its name and value
                name = self.cstring()
                out[name] = self.value(self.byte())
            return out
        if ctype == ARRAY:
            items = []
            while (item := self.byte()) != 0:
                items.append(self.value(item))
            return items
        if ctype == OID:
            return ObjectId(self.take(12))
        if ctype == TIMESTAMP:
            return Timestamp(*struct.unpack(">II", self.take(8)))
        if ctype == DATE:
            millis = struct.unpack(">Q", self.take(8))[0] ^ (1 << 63)
            millis -= (1 << 64) if millis >= (1 << 63) else 0
            return DatetimeMS(millis).as_datetime()
        if ctype == BINDATA:
            size, subtype = self.take(2)
            return Binary(self.take(size), subtype)
        if NAN <= ctype <= POSITIVE_8_BYTE_INT:
            return self.number(ctype)
        raise format_error(50811, f"Unknown type: {ctype}")

    def number(self, ctype: int) -> Any:
        """toBsonValue's numeric cases: the bytes give the value, the type bits its type."""
        kind = self.numeric_type()
        if ctype == ZERO:
            if kind == DECIMAL:
                raise not_implemented("decimal and negative zeros in a resume token's key")
            return {INT: 0, LONG: Int64(0), DOUBLE: 0.0}[kind]
        exponent = self.decimal_exponent() if kind == DECIMAL else None
        if ctype == NAN:
            if kind != DOUBLE:
                raise not_implemented("decimal NaN in a resume token's key")
            return math.nan
        negative = ctype < ZERO
        if ctype in (NEGATIVE_SMALL, POSITIVE_SMALL):
            encoded = int.from_bytes(self.take_number_bytes(8, negative), "big")
            magnitude = struct.unpack(">d", (encoded >> 2).to_bytes(8, "big"))[0]
            if kind not in (DOUBLE, DECIMAL):
                raise format_error(50825, "Unexpected type for small number, expected decimal.")
            return self.typed(-magnitude if negative else magnitude, kind, exponent, encoded & 3)
        size = (NEGATIVE_1_BYTE_INT - ctype + 1) if negative else (ctype - POSITIVE_1_BYTE_INT + 1)
        encoded = int.from_bytes(self.take_number_bytes(size, negative), "big")
        integer_part = encoded >> 1
        if not encoded & 1:  # no fractional part: the type bits say what it was
            n = -integer_part if negative else integer_part
            if kind == INT:  # the C++ int(integerPart) cast: the low 32 bits, signed
                return (n + 2 ** 31) % 2 ** 32 - 2 ** 31
            return Int64(n) if kind == LONG else self.typed(n, kind, exponent, 0)
        fraction_bytes = 8 - size
        fraction = integer_part
        for byte in self.take_number_bytes(fraction_bytes, negative):
            fraction = (fraction << 8) | byte
        magnitude = (fraction & ~3) / 256 ** fraction_bytes
        if kind not in (DOUBLE, DECIMAL):
            raise format_error(50810, "Expected type Decimal.")
        dcm = fraction & 3 if fraction_bytes else 3
        return self.typed(-magnitude if negative else magnitude, kind, exponent, dcm)

    def decimal_exponent(self) -> int:
        return sum(self.read_bit() << i for i in reversed(range(DECIMAL_EXPONENT_BITS)))

    @staticmethod
    def typed(number: float, kind: int, exponent: int | None, dcm: int) -> Any:
        """A double, or a Decimal128 equal to one with the exponent whose low bits the type bits
        kept (adjustDecimalExponent)."""
        if kind == DOUBLE:
            return float(number)
        if dcm != 0:
            raise not_implemented("Decimal128 values other than exact doubles in a resume "
                                  "token's key")
        exact = Decimal(number)
        natural = exact.normalize().as_tuple().exponent
        biased = natural + 6176
        biased -= (biased - exponent) % (1 << DECIMAL_EXPONENT_BITS)
        return Decimal128(exact.quantize(Decimal(1).scaleb(biased - 6176)))

    def take_number_bytes(self, n: int, negative: bool) -> bytes:
        data = self.take(n)
        return _inverted(data) if negative else data


def _type_bits(encoded: bytes) -> list[int]:
    """TypeBits::resetFromBuffer, as a list of bits (empty: all zero)."""
    if not encoded or encoded[0] == 0:
        return []
    if not encoded[0] & 0x80:
        data = encoded[:1]
    else:
        size = encoded[0] & 0x7F
        data = encoded[1:1 + size]
        if len(data) < size:
            raise format_error(50615, "Invalid size byte(s).")
    return [(byte >> i) & 1 for byte in data for i in range(8)]
