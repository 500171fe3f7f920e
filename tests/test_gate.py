"""The gate (changerelay/gate.py): request heads read within their limits, on real sockets.

``check_head`` and ``too_large`` are pure and tested on bytes; the ``Gate`` runs on an event loop
with a loopback TCP connection per client, one end the relay's, the other the client's.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from tornado import httputil

from changerelay import gate
from changerelay.admission import Refusal
from changerelay.gate import Gate, Limits, check_head, response, too_large

GET = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n"
TORNADOS_END = re.compile(rb"\r?\n\r?\n")


def refused(head: bytes) -> str:
    with pytest.raises(Refusal) as info:
        check_head(head)
    return info.value.code


def with_fields(*fields: str) -> bytes:
    return GET + "".join(f"{field}\r\n" for field in fields).encode() + b"\r\n"


# -- check_head -------------------------------------------------------------------------------


def test_an_ordinary_head_passes_whatever_its_line_ends():
    check_head(with_fields("Accept: */*", "Content-Length: 0"))
    check_head(b"GET / HTTP/1.0\nHost: relay\n\n")
    check_head(b"GET /?a=1&b=2 HTTP/1.0\r\n\r\n")  # HTTP/1.0 needs no Host
    check_head(with_fields("Content-Length: 0, 0", "Content-Length: 0"))


def test_header_lines_are_counted_up_to_the_cap():
    host_and = [f"X-{n}: {n}" for n in range(gate.MAX_HEADER_LINES - 1)]  # Host is one
    check_head(with_fields(*host_and))
    assert refused(with_fields(*host_and, "X-Last: 1")) == "too_many_headers"


@pytest.mark.parametrize("fields", [
    ("Content-Length: 1",), ("Content-Length: 100000000000",), ("Content-Length: 0, 1",),
    ("Content-Length: 0", "Content-Length: 2"), ("Transfer-Encoding: chunked",),
    ("Transfer-Encoding: identity",), ("transfer-encoding: gzip, chunked",),
])
def test_a_body_announced_in_any_way_is_refused(fields):
    assert refused(with_fields(*fields)) == "body_not_allowed"


@pytest.mark.parametrize("head", [
    GET + b"Content-Length: ten\r\n\r\n", GET + b"Content-Length: -1\r\n\r\n",
    GET + "Content-Length: ²\r\n\r\n".encode("latin-1"),  # a digit to str.isdigit, not to HTTP
    b"GET /healthz HTTP/2.0\r\n\r\n", b"GET /healthz\r\n\r\n", b"\r\n\r\n",
    GET + b"no colon\r\n\r\n", GET + b"X-Folded: a\r\n continued\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
])
def test_a_head_tornado_would_not_read_is_malformed(head):
    assert refused(head) == "malformed_request"


@given(st.binary(max_size=40).map(lambda raw: bytes(b"a\r\n"[byte % 3] for byte in raw)),
       st.integers(0, 40))
def test_a_head_ends_where_tornados_pattern_ends_it(data, scanned):
    """Tornado finds a head's end with ``\r?\n\r?\n`` (HTTP1Connection._read_message_inner); the
    gate's substring searches end it at the same byte, also when the first ``scanned`` bytes
    came in earlier pieces (and held no end) and the search starts 2 bytes before the new ones,
    as the gate's does."""
    first = TORNADOS_END.search(data)
    assume(first is None or first.end() > scanned)
    found = gate.end_of_head(bytearray(data), max(0, scanned - 2))
    assert found == (first.end() if first else -1)


def test_too_large_tells_a_long_request_line_from_long_headers():
    assert too_large(bytearray(b"GET /" + b"a" * 100), 100).status == 414
    assert too_large(bytearray(GET + b"X: " + b"a" * 100), 100).code == "headers_too_large"
    assert too_large(bytearray(b"GET /" + b"a" * 100 + b"\r\n"), 100).code == "uri_too_long"


def test_a_refusal_is_a_complete_response_that_closes():
    data = response(Refusal("too_many_headers", "fewer, please"))
    head, _, body = data.partition(b"\r\n\r\n")
    status, _, fields = head.decode().partition("\r\n")
    headers = httputil.HTTPHeaders.parse(fields)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["Connection"] == "close" and headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body) == {"error": "too_many_headers", "message": "fewer, please"}


# -- the Gate on sockets ----------------------------------------------------------------------

LIMITS = Limits(head_bytes=1024, seconds=0.5, unfinished=4)


class Served:
    """What the gate hands on: (relay's socket, address, bytes)."""

    def __init__(self):
        self.calls: list[tuple[socket.socket, object, bytes]] = []

    def __call__(self, sock, address, data):
        self.calls.append((sock, address, data))


def pair() -> tuple[socket.socket, socket.socket]:
    """A TCP connection on loopback: (the relay's end, non-blocking; the client's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        relay_end, _ = listener.accept()
    relay_end.setblocking(False)
    return relay_end, client


async def until(condition, timeout: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def answer(client: socket.socket, timeout: float = 3) -> tuple[bytes, bool]:
    """Everything the relay sent until it closed, and whether it closed in ``timeout``."""
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(client, 65536):
                data += chunk
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        pass
    return data, True


def status_of(data: bytes) -> tuple[int, str]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


async def test_a_head_is_served_whole_however_it_is_cut():
    served = Served()
    the_gate = Gate(LIMITS, served)
    head = GET + b"\r\n"
    for cut in range(len(GET) - 3, len(head)):  # the end split at every place
        relay_end, client = pair()
        the_gate.admit(relay_end, ("peer", cut))
        client.sendall(head[:cut])
        await asyncio.sleep(0.01)
        client.sendall(head[cut:] + b"\x88\x80after")  # bytes behind the head go along
        count = len(served.calls) + 1
        await until(lambda count=count: len(served.calls) == count)
        assert served.calls[-1][1:] == (("peer", cut), head + b"\x88\x80after")
        assert not the_gate.unfinished
        client.close()
        relay_end.close()


async def test_a_head_dribbled_a_byte_at_a_time_is_read_once():
    served = Served()
    relay_end, client = pair()
    Gate(LIMITS, served).admit(relay_end, "peer")
    for byte in with_fields("X-A: 1", "X-B: 2"):
        client.send(bytes([byte]))
        await asyncio.sleep(0)
    await until(lambda: served.calls)
    assert served.calls == [(relay_end, "peer", with_fields("X-A: 1", "X-B: 2"))]
    client.close()
    relay_end.close()


async def test_what_came_already_is_read_first():
    """A kept-alive connection comes back with the next head in the bytes read with the last."""
    served = Served()
    relay_end, client = pair()
    Gate(LIMITS, served).admit(relay_end, "peer", GET + b"\r\n")
    assert served.calls == [(relay_end, "peer", GET + b"\r\n")]
    client.close()
    relay_end.close()


@pytest.mark.parametrize("size, status", [(LIMITS.head_bytes, None), (LIMITS.head_bytes + 1, 431)])
async def test_a_head_at_the_limit_passes_and_one_byte_more_is_refused(size, status):
    served = Served()
    relay_end, client = pair()
    Gate(LIMITS, served).admit(relay_end, "peer")
    client.sendall(GET + b"X-Pad: " + b"p" * (size - len(GET) - 11) + b"\r\n\r\n")
    if status is None:
        await until(lambda: served.calls)
        assert len(served.calls[0][2]) == size
    else:
        data, closed = await answer(client)
        assert closed and status_of(data) == (431, "headers_too_large") and not served.calls
    client.close()


async def test_a_refusal_reaches_a_client_that_is_still_sending():
    """Closing at once with unread bytes would reset the connection and could lose the answer:
    the gate lingers, dropping what still comes, and the client reads its 431."""
    served = Served()
    the_gate = Gate(LIMITS, served)
    relay_end, client = pair()
    the_gate.admit(relay_end, "peer")
    loop = asyncio.get_running_loop()
    client.setblocking(False)
    await loop.sock_sendall(client, GET + b"X-Pad: " + b"p" * 200_000)
    data, closed = await answer(client)
    assert closed and status_of(data) == (431, "headers_too_large") and not served.calls
    client.close()  # the gate stops lingering once the client is gone
    await until(lambda: not the_gate.unfinished)


async def test_the_deadline_answers_a_partial_head_and_closes_an_idle_connection():
    served = Served()
    the_gate = Gate(LIMITS, served)
    (partial, partial_client), (idle, idle_client) = pair(), pair()
    the_gate.admit(partial, "partial")
    the_gate.admit(idle, "idle")
    partial_client.sendall(GET[:10])
    started = time.monotonic()
    data, closed = await answer(partial_client)
    assert closed and status_of(data) == (408, "request_timeout")
    assert LIMITS.seconds <= time.monotonic() - started + 0.05 < LIMITS.seconds + 0.5
    assert await answer(idle_client) == (b"", True)
    assert list(the_gate.unfinished) and not served.calls  # lingering, then gone for good:
    await until(lambda: not the_gate.unfinished, timeout=gate.LINGER_SECONDS + 1)


async def test_past_the_cap_the_oldest_unfinished_connection_goes():
    served = Served()
    the_gate = Gate(LIMITS, served)
    ends = [pair() for _ in range(LIMITS.unfinished + 2)]
    for number, (relay_end, client) in enumerate(ends):
        if number == 1:
            client.sendall(GET)  # started a head: told why it goes; the silent one is not
        await asyncio.sleep(0.01)
        the_gate.admit(relay_end, number)
    assert [connection.address for connection in the_gate.unfinished] == [2, 3, 4, 5]
    assert await answer(ends[0][1]) == (b"", True)
    data, closed = await answer(ends[1][1])
    assert closed and status_of(data) == (503, "too_many_pending_requests")
    for _, client in ends[2:]:
        client.sendall(GET + b"\r\n")
    await until(lambda: len(served.calls) == 4)
    the_gate.close()


async def test_close_drops_every_unfinished_connection():
    the_gate = Gate(LIMITS, Served())
    ends = [pair() for _ in range(3)]
    for number, (relay_end, client) in enumerate(ends):
        the_gate.admit(relay_end, number)
        client.sendall(GET[:number * 5])
    await asyncio.sleep(0.01)
    the_gate.close()
    assert not the_gate.unfinished
    for _, client in ends:
        assert await answer(client, timeout=0.5) == (b"", True)
