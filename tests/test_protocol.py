"""The WebSocket state machine (``changerelay/protocol.py``): bytes in, bytes and state out."""

from __future__ import annotations

import struct

import pytest

from changerelay import frames
from changerelay.disconnect import CLOSES
from changerelay.frames import CLOSE, PING, PONG, TEXT, ws_frame
from changerelay.protocol import (
    CLOSED,
    CLOSING,
    FAILED,
    FRAME_BURST,
    FRAMES_PER_SECOND,
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
    assert protocol.receive(masked(b"a", PING) + masked(b"b", PING), 0, 0.0) == (
        pong(b"a") + pong(b"b"), False)
    assert protocol.receive(masked(b"", PONG), 0, 0.0) == (b"", True)
    messages = masked(b"hello") + masked(b"\x00", frames.BINARY)
    assert protocol.receive(messages, 0, 0.0) == (b"", False)
    assert protocol.state is OPEN


def test_a_ping_split_across_reads_is_answered_once_whole():
    protocol, frame = WebSocketProtocol(4096), masked(b"split", PING)
    replies = [protocol.receive(frame[i:i + 1], 0, 0.0)[0] for i in range(len(frame))]
    assert replies == [b""] * (len(frame) - 1) + [pong(b"split")]


def test_behind_a_long_queue_only_the_latest_ping_is_answered_once_the_queue_is_short():
    protocol = WebSocketProtocol(4096)
    assert protocol.receive(masked(b"one", PING) + masked(b"two", PING), LONG, 0.0) == (b"", False)
    assert protocol.receive(masked(b"three", PING), LONG + 1, 0.0) == (b"", False)
    assert protocol.owed_pong(LONG) == b""  # still long
    assert protocol.owed_pong(LONG - 1) == pong(b"three")
    assert protocol.owed_pong(0) == b""  # owed once, paid once


def test_pongs_of_one_read_count_toward_the_queue():
    """A flood of pings in one read gets pongs up to the backlog, then owes only the latest."""
    protocol = WebSocketProtocol(4096)
    payload = b"p" * 125
    reply, _ = protocol.receive(masked(payload, PING) * 1000 + masked(b"last", PING), 0, 0.0)
    assert len(reply) < PONG_BACKLOG + len(pong(payload))
    assert reply == pong(payload) * (len(reply) // len(pong(payload)))
    assert protocol.owed_pong(0) == pong(b"last")


def test_a_short_queue_pong_answers_an_owed_one_too():
    protocol = WebSocketProtocol(4096)
    protocol.receive(masked(b"old", PING), LONG, 0.0)
    assert protocol.receive(masked(b"new", PING), 0, 0.0) == (pong(b"new"), False)
    assert protocol.owed_pong(0) == b""


def test_a_ping_read_with_a_bad_frame_gets_its_pong_before_the_close():
    """RFC 6455 §5.5.2: the pong is owed for a ping that came before the protocol error."""
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(masked(b"first", PING) + UNMASKED + masked(b"later", PING), 0, 0.0)
    assert reply == pong(b"first") + closing(1002, "client frames must be masked")
    assert protocol.state is FAILED
    assert protocol.receive(masked(b"more", PING), 0, 0.0) == (b"", False)  # nothing is read now
    assert protocol.close() == b""


def test_a_pong_owed_behind_a_long_queue_goes_before_the_close_of_a_failure():
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(masked(b"owed", PING) + masked(b"\xff\xfe"), LONG, 0.0)
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
    assert protocol.receive(close(1001, b"bye") + junk, 0, 0.0) == (
        ws_frame(struct.pack("!H", 1001), CLOSE), False)
    assert protocol.state is CLOSED
    assert protocol.receive(masked(b"x", PING), 0, 0.0) == (b"", False)


def test_a_ping_then_a_close_in_one_read_get_a_pong_then_the_answer():
    protocol = WebSocketProtocol(4096)
    assert protocol.receive(masked(b"p", PING) + close(1000), 0, 0.0)[0] == (
        pong(b"p") + ws_frame(struct.pack("!H", 1000), CLOSE))


def test_an_owed_pong_is_not_sent_once_the_peer_has_closed():
    """§5.5.2: a pong is owed unless a Close frame was received."""
    protocol = WebSocketProtocol(4096)
    protocol.receive(masked(b"owed", PING), LONG, 0.0)
    assert protocol.receive(masked(b"", CLOSE), LONG, 0.0) == (ws_frame(b"", CLOSE), False)
    assert protocol.owed_pong(0) == b""


def test_our_close_waits_for_the_answer_and_sends_nothing_after_it():
    protocol = WebSocketProtocol(4096)
    assert protocol.close(1013, "slow consumer") == closing(1013, "slow consumer")
    assert protocol.state is CLOSING
    assert protocol.close(1000) == b""
    assert protocol.receive(masked(b"late", PING) + masked(b"", PONG), 0, 0.0) == (b"", True)
    assert protocol.receive(close(1013), 0, 0.0) == (b"", False)  # the handshake is complete
    assert protocol.state is CLOSED


def test_our_close_pays_an_owed_pong_first():
    protocol = WebSocketProtocol(4096)
    protocol.receive(masked(b"owed", PING), LONG, 0.0)
    assert protocol.close(1001, "bye") == pong(b"owed") + closing(1001, "bye")
    assert protocol.owed_pong(0) == b""


def test_a_bad_frame_while_we_wait_for_the_answer_fails_without_a_second_close():
    protocol = WebSocketProtocol(4096)
    protocol.close()
    assert protocol.receive(UNMASKED, 0, 0.0) == (b"", False)
    assert protocol.state is FAILED


@pytest.mark.parametrize("data, code", [
    (masked(b"x" * 4097), 1009),
    (masked(b"\xc3\x28"), 1007),
    (masked(struct.pack("!H", 1005), CLOSE), 1002),
])
def test_protocol_errors_fail_with_their_code(data, code):
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(masked(b"", TEXT) + data, 0, 0.0)
    assert frames.close_code(reply[2:]) == code and reply[0] == 0x88
    assert protocol.state is FAILED


# -- the frame budget ------------------------------------------------------------------------

EMPTY_PING = masked(b"", PING)
FLOODED = frames.close_frame(*CLOSES["too_many_frames"].frame)


def test_a_burst_of_frames_past_the_budget_fails_with_1008_too_many_frames():
    protocol = WebSocketProtocol(4096)
    reply, _ = protocol.receive(EMPTY_PING * FRAME_BURST, 0, now=0.0)
    assert protocol.state is OPEN and reply.count(pong(b"")) == FRAME_BURST
    reply, _ = protocol.receive(EMPTY_PING, 0, now=0.0)
    assert reply == FLOODED and CLOSES["too_many_frames"].frame == (1008, "too many frames")
    assert protocol.state is FAILED and not protocol.listening


@pytest.mark.parametrize("frame", [
    masked(b"", PING), masked(b"", PONG), masked(b""), masked(b"x", frames.BINARY),
])
def test_every_kind_of_frame_counts(frame):
    protocol = WebSocketProtocol(4096)
    protocol.receive(frame * (FRAME_BURST + 1), 0, now=0.0)
    assert protocol.state is FAILED


def test_empty_continuation_fragments_count_though_they_complete_no_message():
    protocol = WebSocketProtocol(4096)
    fragments = masked(b"x", TEXT, fin=False) + masked(b"", frames.CONTINUATION, fin=False) * (
        FRAME_BURST + 1)
    reply, _ = protocol.receive(fragments, 0, now=0.0)
    assert reply == FLOODED


def test_a_flood_in_one_read_is_not_read_past_the_budget():
    """64 KiB of empty pings is 10,922 frames: the read stops at the budget, so a flood costs
    the same whatever its size, and only the pings within it are answered."""
    protocol = WebSocketProtocol(4096)
    flood = EMPTY_PING * ((1 << 16) // len(EMPTY_PING))
    reply, _ = protocol.receive(flood, 0, now=0.0)
    assert reply == pong(b"") * FRAME_BURST + FLOODED


def test_a_frame_dribbled_a_byte_per_read_pays_for_every_read():
    protocol = WebSocketProtocol(4096)
    message = masked(b"d" * 4000)
    replies = [protocol.receive(message[i:i + 1], 0, now=0.0)[0] for i in range(len(message))]
    assert protocol.state is FAILED and replies[FRAME_BURST] == FLOODED


def test_the_budget_refills_with_time_and_a_steady_sender_within_the_rate_stays():
    protocol = WebSocketProtocol(4096)
    now = 0.0
    for _ in range(10 * FRAME_BURST):  # far more frames than the burst, at the rate
        protocol.receive(EMPTY_PING, 0, now)
        now += 1 / FRAMES_PER_SECOND
    assert protocol.state is OPEN
    protocol.receive(EMPTY_PING * FRAME_BURST, 0, now + FRAME_BURST / FRAMES_PER_SECOND)
    assert protocol.state is OPEN  # a full bucket again


def test_legitimate_clients_never_come_near_the_budget():
    """A browser answers each of our pings (every WS_PING_INTERVAL), the websockets library
    pings every 20 s too, and a client may send a message now and then: a day of that, and
    Autobahn's largest burst (1,000 messages at once, cases 9.7 and 9.8) on top."""
    protocol = WebSocketProtocol(4096)
    for second in range(0, 86_400, 10):
        protocol.receive(masked(b"", PONG) + masked(b"k", PING) + masked(b"{}"), 0, second)
    assert protocol.receive(masked(b"m" * 4096) * 1000, 0, now=86_400.0)[0] == b""
    assert protocol.state is OPEN and protocol.listening


def test_a_peer_that_floods_after_our_close_is_no_longer_read():
    """Past the budget while closing, there is no second close: the peer is just not read, and
    the close timeout ends the connection."""
    protocol = WebSocketProtocol(4096)
    protocol.close(1001, "bye")
    assert protocol.receive(EMPTY_PING * (FRAME_BURST + 1), 0, now=0.0) == (b"", False)
    assert protocol.state is CLOSING and not protocol.listening


def test_a_failed_connection_stops_reading_a_peer_that_keeps_sending():
    protocol = WebSocketProtocol(4096)
    protocol.receive(UNMASKED, 0, now=0.0)
    assert protocol.state is FAILED and protocol.listening  # its goodbye is still read
    for _ in range(FRAME_BURST):
        protocol.receive(b"junk", 0, now=0.0)
    assert not protocol.listening
