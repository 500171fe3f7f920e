"""The WebSocket protocol without I/O: handshake key, extension negotiation, frames in and out.

Everything here works on bytes and strings, so it is tested on its own; ``connection.py`` moves
those bytes to and from a socket. Only what a relay needs is here: the server side of RFC 6455
and of permessage-deflate (RFC 7692) restricted so that a compressed event can be built once and
shared by every client, like an uncompressed one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import sys
import zlib

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)

# Close codes this module sends for a broken protocol; why else a connection is closed, and with
# which code, is disconnect.CLOSES.
NORMAL, PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1000, 1002, 1007, 1009
# Close codes an endpoint may send (RFC 6455 §7.4, IANA registry); 1005/1006/1015 never travel.
_SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}

MAX_CONTROL_PAYLOAD = 125  # bytes a control frame may carry (RFC 6455 §5.5)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


class ProtocolError(Exception):
    """The peer broke the protocol; close with ``code`` and say ``reason``."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str | None:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``, or None if the key is bad.

    A valid key is the base64 of 16 bytes (RFC 6455 §4.1).
    """
    try:
        if len(base64.b64decode(key.encode("ascii"), validate=True)) != 16:
            return None
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def negotiate_deflate(header: str | None) -> str | None:
    """The ``Sec-WebSocket-Extensions`` answer to a client's offers, or None to decline them all.

    We accept the first permessage-deflate offer we can honour with *no context takeover* in both
    directions: every message is then compressed on its own, so one compressed frame per event
    serves every client, and an inbound message needs no per-connection inflate state. An offer
    that limits our window below 15 bits is declined, since a shared frame has one window size.
    RFC 7692 §7.1.1 lets the server ask for both no-context-takeover parameters unasked; an
    accepted server_max_window_bits must be answered (§7.1.2.1).
    """
    for offer in (header or "").split(","):
        name, *params = [part.strip() for part in offer.split(";")]
        if name.lower() != "permessage-deflate":
            continue
        keys = _acceptable(params)
        if keys is not None:
            if "server_max_window_bits" in keys:
                return DEFLATE_RESPONSE + "; server_max_window_bits=15"
            return DEFLATE_RESPONSE
    return None


def _acceptable(params: list[str]) -> set[str] | None:
    """The parameter names of an offer we can honour, or None."""
    seen = set()
    for param in params:
        key, _, value = param.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"')
        if key in seen:
            return None
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value:
                return None
        elif key == "server_max_window_bits":
            if value != "15":
                return None
        elif key == "client_max_window_bits":
            if value and not (value.isdigit() and 8 <= int(value) <= 15):
                return None
        else:
            return None
    return seen


def ws_frame(payload: bytes, opcode: int = TEXT, compressed: bool = False) -> bytes:
    """An unmasked, final frame (RFC 6455 §5.2) as a server sends it."""
    length = len(payload)
    first = 0x80 | opcode | (0x40 if compressed else 0)
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def deflate(data: bytes) -> bytes:
    """A message body compressed on its own, as permessage-deflate carries it (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    body = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return body[:-4] if body.endswith(_DEFLATE_TAIL) else body


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125 bytes a control frame may carry."""
    # After the two bytes of the code; whole characters, since it must be UTF-8.
    cut = reason.encode()[:MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
    payload = struct.pack("!H", code) + cut.encode()
    return ws_frame(payload, CLOSE)


def close_code(payload: bytes) -> int | None:
    """The code of a received close frame's payload (validated by the reader), None if empty."""
    return struct.unpack("!H", payload[:2])[0] if payload else None


def _unmask(mask: bytes, data: bytes) -> bytes:
    if not data:
        return data
    repeated = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        len(data), "little")


class FrameReader:
    """Turns the bytes a client sends into messages and control frames.

    ``feed`` returns ``(opcode, payload)`` pairs: whole, unmasked, inflated, UTF-8-checked text
    or binary messages and control frames, in arrival order. Messages are limited to
    ``max_size`` bytes (after inflation): a relay's clients have little to say, and a limit
    keeps a hostile one from making us buffer.

    Anything RFC 6455 says to fail the connection on ends the stream: ``feed`` still returns the
    frames that came before it (a ping among them is owed its pong, §5.5.2), keeps the
    ``ProtocolError`` in ``error``, and reads nothing after it, since a broken stream has no
    frame boundaries left to find.

    ``frames`` counts every frame read, fragments that complete no message included: what a
    peer's frames cost us is per frame, whatever they carry.
    """

    __slots__ = ("_buffer", "_deflate", "_message", "_size", "error", "frames", "max_size")

    def __init__(self, max_size: int, deflate: bool = False):
        self.max_size = max_size
        self._deflate = deflate
        self._buffer = b""
        self._message: tuple[int, bool, list[bytes]] | None = None  # a fragmented message
        self._size = 0
        self.error: ProtocolError | None = None
        self.frames = 0

    def feed(self, data: bytes, most: int = sys.maxsize) -> list[tuple[int, bytes]]:
        """The messages and control frames ``data`` completes, reading at most ``most`` frames
        (the rest stays buffered, unread)."""
        if self.error is not None:
            return []
        buffer = self._buffer + data if self._buffer else data
        out: list[tuple[int, bytes]] = []
        offset = 0
        last = self.frames + most
        try:
            while self.frames < last and (frame := self._frame(buffer, offset)) is not None:
                self.frames += 1
                offset = frame[0]
                message = self._message_of(*frame[1:])
                if message is not None:
                    out.append(message)
        except ProtocolError as exc:
            self.error = exc
            buffer, offset = b"", 0
        self._buffer = buffer[offset:]
        return out

    @property
    def pending(self) -> int:
        """Bytes read and not yet a whole frame, or whole frames not yet read (see ``most``)."""
        return len(self._buffer)

    def _message_of(self, fin: int, rsv1: bool, opcode: int,
                    payload: bytes) -> tuple[int, bytes] | None:
        """A frame's control message, or the message it completes; None if it completes none."""
        if opcode in _CONTROL:
            return opcode, _check_control(opcode, payload)
        if opcode == CONTINUATION:
            if self._message is None:
                raise ProtocolError(PROTOCOL_ERROR, "continuation frame outside a message")
            if payload:  # empty fragments weigh nothing against max_size: keep none
                self._message[2].append(payload)
        else:
            if self._message is not None:
                raise ProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
            self._message = (opcode, rsv1, [payload])
        if not fin:
            return None
        opcode, compressed, parts = self._message
        self._message, self._size = None, 0
        return opcode, self._complete(opcode, compressed, b"".join(parts))

    def _frame(self, buffer: bytes,
               offset: int) -> tuple[int, int, bool, int, bytes] | None:
        """The next whole frame at ``offset``, or None if it has not all arrived."""
        available = len(buffer) - offset
        if available < 2:
            return None
        first, second = buffer[offset], buffer[offset + 1]
        fin, rsv, opcode = first & 0x80, first & 0x70, first & 0x0F
        if opcode not in _DATA and opcode not in _CONTROL and opcode != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        rsv1 = bool(rsv & 0x40)
        if rsv & 0x30 or (rsv1 and not (self._deflate and opcode in _DATA)):
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set without an extension")
        if not second & 0x80:
            raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
        length, header = second & 0x7F, 2
        if opcode in _CONTROL:
            if not fin:
                raise ProtocolError(PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError(PROTOCOL_ERROR, "control frame longer than 125 bytes")
        elif length == 126:
            if available < 4:
                return None
            length, header = struct.unpack_from("!H", buffer, offset + 2)[0], 4
        elif length == 127:
            if available < 10:
                return None
            length, header = struct.unpack_from("!Q", buffer, offset + 2)[0], 10
        data = opcode not in _CONTROL
        if data and self._size + length > self.max_size:
            raise ProtocolError(MESSAGE_TOO_BIG, f"messages are limited to {self.max_size} "
                                "bytes; this relay only sends")
        end = offset + header + 4 + length
        if len(buffer) < end:
            return None
        if data:
            self._size += length
        mask = buffer[offset + header:offset + header + 4]
        payload = _unmask(mask, buffer[offset + header + 4:end])
        return end, fin, rsv1, opcode, payload

    def _complete(self, opcode: int, compressed: bool, payload: bytes) -> bytes:
        if compressed:
            inflater = zlib.decompressobj(-15)
            try:
                payload = inflater.decompress(payload + _DEFLATE_TAIL, self.max_size + 1)
            except zlib.error:
                raise ProtocolError(INVALID_DATA, "compressed message does not inflate") from None
            if len(payload) > self.max_size:
                raise ProtocolError(MESSAGE_TOO_BIG,
                                    f"messages are limited to {self.max_size} bytes")
        if opcode == TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(INVALID_DATA, "text message is not UTF-8") from None
        return payload


def _check_control(opcode: int, payload: bytes) -> bytes:
    if opcode != CLOSE or not payload:
        return payload
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = close_code(payload)
    if code is None or (code not in _SENDABLE and not 3000 <= code <= 4999):
        raise ProtocolError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_DATA, "close reason is not UTF-8") from None
    return payload
