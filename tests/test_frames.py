"""The WebSocket protocol without I/O (``changerelay/frames.py``): what a client may send us."""

from __future__ import annotations

import struct
import zlib

import pytest

from changerelay import frames
from changerelay.frames import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, ProtocolError
from tests.support import masked


def failure(reader: frames.FrameReader, data: bytes) -> int:
    """The close code ``data`` fails the connection with (no frame comes out of it)."""
    assert reader.feed(data) == []
    assert isinstance(reader.error, ProtocolError)
    return reader.error.code


def compress(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_accept_key_is_the_rfc_example_and_refuses_bad_keys():
    assert frames.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    for bad in ["", "abc", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ==x",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAA", "dGhlIHNhbXBsZSBub25jZ€=="]:
        assert frames.accept_key(bad) is None, bad


@pytest.mark.parametrize("offer, accepted", [
    (None, False),
    ("", False),
    ("permessage-deflate", True),
    ("permessage-deflate; client_max_window_bits", True),  # what browsers send
    ("Permessage-Deflate; Client_Max_Window_Bits=10", True),
    ('permessage-deflate; client_max_window_bits="12"', True),
    ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", True),
    ("permessage-deflate; server_max_window_bits=15", True),
    ("permessage-deflate; server_max_window_bits=10", False),  # one window size per shared frame
    ("permessage-deflate; server_max_window_bits=10, permessage-deflate", True),  # the fallback
    ("permessage-deflate; client_max_window_bits=7", False),
    ("permessage-deflate; client_max_window_bits=16", False),
    ("permessage-deflate; server_no_context_takeover=1", False),
    ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", False),
    ("permessage-deflate; unknown_param", False),
    ("x-webkit-deflate-frame", False),
    ("x-webkit-deflate-frame, permessage-deflate", True),
])
def test_deflate_negotiation(offer, accepted):
    answer = frames.negotiate_deflate(offer)
    assert (answer is not None and answer.startswith(frames.DEFLATE_RESPONSE)) is accepted


def test_an_accepted_server_max_window_bits_is_answered():
    """RFC 7692 §7.1.2.1: a server accepts an offer with server_max_window_bits by including
    the parameter in its response; a client may fail the handshake otherwise."""
    answer = frames.negotiate_deflate("permessage-deflate; Server_Max_Window_Bits=15")
    assert answer == frames.DEFLATE_RESPONSE + "; server_max_window_bits=15"
    assert frames.negotiate_deflate("permessage-deflate") == frames.DEFLATE_RESPONSE


def test_server_frames_have_minimal_length_encodings():
    assert frames.ws_frame(b"a" * 125)[:2] == b"\x81\x7d"
    assert frames.ws_frame(b"a" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert frames.ws_frame(b"a" * 65535)[:4] == b"\x81\x7e\xff\xff"
    assert frames.ws_frame(b"a" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
    assert frames.ws_frame(b"", PING) == b"\x89\x00"
    assert frames.ws_frame(b"z", compressed=True)[0] == 0xC1


def test_deflated_message_inflates_back_and_is_shared_bytes():
    data = b'{"operationType":"insert","fullDocument":{"text":"' + b"x" * 3000 + b'"}}'
    body = frames.deflate(data)
    assert len(body) < len(data) // 10
    assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == data
    assert frames.deflate(data) == body  # no context: the same bytes for every client


def test_close_frame_cuts_long_reasons_to_a_control_frame():
    frame = frames.close_frame(1013, "é" * 200)
    assert frame[0] == 0x88 and frame[1] <= 125
    assert frames.close_code(frame[2:]) == 1013
    assert frame[4:].decode("utf-8") == "é" * 61  # cut between characters (RFC 6455 §5.5.1)


def test_reader_unmasks_and_splits_frames_however_bytes_arrive():
    stream = (masked(b"hello") + masked(b"", PING) + masked(b"\x00\x01", BINARY)
              + masked(b"p" * 300, TEXT) + masked(b"bye", PONG))
    expected = [(TEXT, b"hello"), (PING, b""), (BINARY, b"\x00\x01"), (TEXT, b"p" * 300),
                (PONG, b"bye")]
    assert frames.FrameReader(4096).feed(stream) == expected
    reader, got = frames.FrameReader(4096), []
    for i in range(len(stream)):  # one byte at a time
        got += reader.feed(stream[i:i + 1])
    assert got == expected


def test_fragmented_message_with_a_ping_in_between():
    reader = frames.FrameReader(4096)
    out = reader.feed(masked(b"he", TEXT, fin=False) + masked(b"!", PING)
                      + masked(b"ll", CONTINUATION, fin=False) + masked(b"o", CONTINUATION))
    assert out == [(PING, b"!"), (TEXT, b"hello")]


def test_empty_fragments_do_not_pile_up():
    """The size limit counts payload bytes; a message of endless empty fragments (6 bytes on
    the wire each) must not grow a list of them."""
    import tracemalloc

    reader = frames.FrameReader(4096)
    reader.feed(masked(b"he", TEXT, fin=False))
    empty = masked(b"", CONTINUATION, fin=False) * 1000
    tracemalloc.start()
    try:
        for _ in range(50):
            assert reader.feed(empty) == []
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 100_000
    assert reader.feed(masked(b"llo", CONTINUATION)) == [(TEXT, b"hello")]


def test_close_frames_are_checked():
    reader = frames.FrameReader(4096)
    assert reader.feed(masked(b"", CLOSE)) == [(CLOSE, b"")]
    payload = struct.pack("!H", 4000) + b"fin"
    assert frames.FrameReader(4096).feed(masked(payload, CLOSE)) == [(CLOSE, payload)]


@pytest.mark.parametrize("data, code", [
    (masked(b"x")[:1] + bytes([masked(b"x")[1] & 0x7F]) + b"x", 1002),  # unmasked
    (bytes([0x83, 0x80]) + b"\0\0\0\0", 1002),                            # opcode 3
    (bytes([0x8B, 0x80]) + b"\0\0\0\0", 1002),                            # opcode 0xB
    (masked(b"x", rsv1=True), 1002),                                      # no extension
    (bytes([0xA1, 0x80]) + b"\0\0\0\0", 1002),                            # RSV2
    (masked(b"x", PING, fin=False), 1002),                                # fragmented control
    (masked(b"x" * 126, PING), 1002),                                     # control too long
    (masked(b"x", CONTINUATION), 1002),                                   # nothing to continue
    (masked(b"a", TEXT, fin=False) + masked(b"b", TEXT), 1002),           # message in message
    (masked(b"x" * 4097), 1009),
    (masked(b"x" * 3000, fin=False) + masked(b"x" * 3000, CONTINUATION), 1009),
    (masked(b"", length_as=1 << 40)[:10], 1009),                          # declared, not sent
    (masked(b"\xff\xfe"), 1007),                                          # text not UTF-8
    (masked(b"\x03", CLOSE), 1002),                                       # one-byte close
    (masked(struct.pack("!H", 1005), CLOSE), 1002),                       # never sent on wire
    (masked(struct.pack("!H", 999), CLOSE), 1002),
    (masked(struct.pack("!H", 2000), CLOSE), 1002),
    (masked(struct.pack("!H", 1000) + b"\xff", CLOSE), 1007),             # reason not UTF-8
])
def test_reader_fails_the_connection_with_the_right_code(data, code):
    assert failure(frames.FrameReader(4096), data) == code


def test_frames_before_a_protocol_error_are_returned_and_the_error_is_kept():
    """RFC 6455 §5.5.2: a ping read in the same batch as a bad frame still gets its pong, so
    the reader hands over what it parsed before the error; after it, nothing more is read."""
    reader = frames.FrameReader(4096)
    unmasked = bytes([0x81, 0x01]) + b"x"
    assert reader.feed(masked(b"hi", PING) + masked(b"ok") + unmasked + masked(b"", PING)) == [
        (PING, b"hi"), (TEXT, b"ok")]
    assert reader.error.code == 1002
    assert reader.feed(masked(b"later", PING)) == []  # a broken stream cannot be resynchronised


def test_valid_utf8_split_across_fragments_is_accepted():
    text = "é".encode()
    out = frames.FrameReader(4096).feed(masked(text[:1], TEXT, fin=False)
                                        + masked(text[1:], CONTINUATION))
    assert out == [(TEXT, text)]


def test_compressed_messages_only_when_negotiated_and_within_the_limit():
    data = "ünïcode ".encode() * 100
    frame = masked(compress(data), rsv1=True)
    assert frames.FrameReader(4096, deflate=True).feed(frame) == [(TEXT, data)]
    assert failure(frames.FrameReader(4096), frame) == 1002
    bomb = masked(compress(b"a" * 100_000), rsv1=True)  # 100 KB from a few hundred bytes
    assert failure(frames.FrameReader(4096, deflate=True), bomb) == 1009
    not_deflate = masked(b"\xff\xff\xff", rsv1=True)
    assert failure(frames.FrameReader(4096, deflate=True), not_deflate) == 1007
    compressed_ping = masked(b"", PING, rsv1=True)  # RSV1 on a control frame: never allowed
    assert failure(frames.FrameReader(4096, deflate=True), compressed_ping) == 1002
