"""The WebSocket state machine (``changerelay/protocol.py``): bytes in, bytes and state out."""

from __future__ import annotations

import struct

import pytest

from changerelay import frames
from changerelay.frames import CLOSE, PING, PONG, TEXT, ws_frame
from changerelay.protocol import (
    CLOSED,
    CLOSING,
    FAILED,
    OPEN,
    PONG_BACKLOG,
    WebSocketProtocol,
)
from tests.support import masked

LONG = PONG_BACKLOG  # queued bytes behind which a pong waits
UNMASKED = bytes([0x81, 0x01]) + b"x"


def close(code: int, reason: bytes = b"") -> bytes:
    return masked(struct.pack("!H", code) + reason, CLOSE)


def pong(payload: bytes) -> bytes:
    return ws_frame(payload, PONG)


def closing(code: int, reason: str = "") -> bytes:
    return frames.close_frame(code, reason)


def test_pings_are_answered_with_their_payloads_and_pongs_are_reported():
    protocol = WebSocketProtocol(4096)
    assert protocol.receive(masked(b"a", PING) + masked(b"b", PING), 0) == (
        pong(b"a") + pong(b"b"), False)
    assert protocol.receive(masked(b"", PONG), 0) == (b"", True)
    assert protocol.receive(masked(b"hello") + masked(b"\x00", frames.BINARY), 0) == (b"", False)
    assert protocol.state is OPEN


def test_a_ping_split_across_reads_is_answered_once_whole():
    protocol, frame = WebSocketProtocol(4096), masked(b"split", PING)
    replies = [protocol.receive(frame[i:i + 1], 0)[0] for i in range(len(frame))]
    assert replies == [b""] * (len(frame) - 1) + [pong(b"split")]


def test_behind_a_long_queue_only_the_latest_ping_is_answered_once_the_queue_is_short():
    protocol = WebSocketProtocol(4096)
    assert protocol.receive(masked(b"one", PING) + masked(b"two", PING), LONG) == (b"", False)
    assert protocol.receive(masked(b"three", PING), LONG + 1) == (b"", False)
    assert protocol.owed_pong(LONG) == b""  # still long
    assert protocol.owed_pong(LONG - 1) == pong(b"three")
    assert protocol.owed_pong(0) == b""  # owed once, paid once


def test_pongs_of_one_read_count_toward_the_queue():
    """A flood of pings in one read gets pongs up to the backlog, then owes only the latest."""
    protocol = WebSocketProtocol(4096)
    payload = b"p" * 125
    reply, _ = protocol.receive(masked(payload, PING) * 1000 + masked(b"last", PING), 0)
    assert len(reply) < PONG_BACKLOG + len(pong(payload))
    assert reply == pong(payload) * (len(reply) // len(pong(payload)))
    assert protocol.owed_pong(0) == pong(b"last")


def test_a_short_queue_pong_answers_an_owed_one_too():
    protocol = WebSocketProtocol(4096)
    protocol.receive(masked(b"old", PING), LONG)
    assert protocol.receive(masked(b"new", PING), 0) == (pong(b"new"), False)
    assert protocol.owed_pong(0) == b""


def test_a_ping_read_with_a_bad_frame_gets_its_pong_before_the_close():
    """RFC 6455 §5.5.2: the pong is owed for a ping that came before the protocol error."""
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(masked(b"first", PING) + UNMASKED + masked(b"later", PING), 0)
    assert reply == pong(b"first") + closing(1002, "client frames must be masked")
    assert protocol.state is FAILED
    assert protocol.receive(masked(b"more", PING), 0) == (b"", False)  # nothing is read now
    assert protocol.close() == b""


def test_a_pong_owed_behind_a_long_queue_goes_before_the_close_of_a_failure():
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(masked(b"owed", PING) + masked(b"\xff\xfe"), LONG)
    assert reply == pong(b"owed") + closing(1007, "text message is not UTF-8")
    assert protocol.owed_pong(0) == b""


@pytest.mark.parametrize("junk", [
    UNMASKED,
    masked(b"", length_as=1 << 40)[:10],      # a message far over the limit
    masked(b"x", PING, fin=False),            # a fragmented control frame
    masked(b"ping after close", PING),        # valid, but nothing follows a Close
    b"\x00",                                  # the start of some frame
])
def test_a_close_read_with_anything_behind_it_completes_the_closing_handshake(junk):
    """RFC 6455 §5.5.1: the peer's Close is answered with its code; what follows is not read."""
    protocol = WebSocketProtocol(4096)
    assert protocol.receive(close(1001, b"bye") + junk, 0) == (
        ws_frame(struct.pack("!H", 1001), CLOSE), False)
    assert protocol.state is CLOSED
    assert protocol.receive(masked(b"x", PING), 0) == (b"", False)


def test_a_ping_then_a_close_in_one_read_get_a_pong_then_the_answer():
    protocol = WebSocketProtocol(4096)
    assert protocol.receive(masked(b"p", PING) + close(1000), 0)[0] == (
        pong(b"p") + ws_frame(struct.pack("!H", 1000), CLOSE))


def test_an_owed_pong_is_not_sent_once_the_peer_has_closed():
    """§5.5.2: a pong is owed unless a Close frame was received."""
    protocol = WebSocketProtocol(4096)
    protocol.receive(masked(b"owed", PING), LONG)
    assert protocol.receive(masked(b"", CLOSE), LONG) == (ws_frame(b"", CLOSE), False)
    assert protocol.owed_pong(0) == b""


def test_our_close_waits_for_the_answer_and_sends_nothing_after_it():
    protocol = WebSocketProtocol(4096)
    assert protocol.close(1013, "slow consumer") == closing(1013, "slow consumer")
    assert protocol.state is CLOSING
    assert protocol.close(1000) == b""
    assert protocol.receive(masked(b"late", PING) + masked(b"", PONG), 0) == (b"", True)
    assert protocol.receive(close(1013), 0) == (b"", False)  # the handshake is complete
    assert protocol.state is CLOSED


def test_our_close_pays_an_owed_pong_first():
    protocol = WebSocketProtocol(4096)
    protocol.receive(masked(b"owed", PING), LONG)
    assert protocol.close(1001, "bye") == pong(b"owed") + closing(1001, "bye")
    assert protocol.owed_pong(0) == b""


def test_a_bad_frame_while_we_wait_for_the_answer_fails_without_a_second_close():
    protocol = WebSocketProtocol(4096)
    protocol.close()
    assert protocol.receive(UNMASKED, 0) == (b"", False)
    assert protocol.state is FAILED


@pytest.mark.parametrize("data, code", [
    (masked(b"x" * 4097), 1009),
    (masked(b"\xc3\x28"), 1007),
    (masked(struct.pack("!H", 1005), CLOSE), 1002),
])
def test_protocol_errors_fail_with_their_code(data, code):
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(masked(b"", TEXT) + data, 0)
    assert frames.close_code(reply[2:]) == code and reply[0] == 0x88
    assert protocol.state is FAILED
