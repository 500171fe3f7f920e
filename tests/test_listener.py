"""The accept loop (changerelay/listener.py): connections handed on, and a pause, not a spin, when
accept() fails.

A real listening socket with real queued connections; for the open-files limit, accept() is made
to fail with EMFILE (the end-to-end test in test_e2e_http_limits.py lowers the relay's real limit).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

import pytest
from logzero import logger

from changerelay import listener
from changerelay.listener import Listener


class Failing:
    """A listening socket whose accept() fails with EMFILE while ``failing`` is set."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.failing = True
        self.attempts = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def accept(self):
        self.attempts += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    handler = Lines()
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


async def until(condition, timeout: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_every_connection_is_handed_on_non_blocking():
    accepted = []
    server = socket.create_server(("127.0.0.1", 0))
    accepting = Listener([server], lambda sock, address: accepted.append(sock))
    accepting.start()
    clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
    await until(lambda: len(accepted) == 3)
    assert all(not sock.getblocking() for sock in accepted)
    accepting.stop()
    assert server.fileno() == -1  # closed: nothing more is accepted
    for sock in [*accepted, *clients]:
        sock.close()


async def test_at_the_open_files_limit_it_pauses_logs_once_and_recovers(lines):
    accepted = []
    failing = Failing(socket.create_server(("127.0.0.1", 0)))
    accepting = Listener([failing], lambda sock, address: accepted.append(sock))
    accepting.start()
    client = socket.create_connection(failing.sock.getsockname())  # queued, readable, failing
    await asyncio.sleep(1)
    # A spin would have called accept() tens of thousands of times; pauses from 10 ms that
    # double up to a second make it a handful.
    assert 2 <= failing.attempts <= 12, failing.attempts
    assert len(lines) == 1 and "not accepting connections" in lines[0], lines
    assert "Too many open files" in lines[0]

    failing.failing = False
    await until(lambda: accepted, timeout=listener.PAUSE_CAP_SECONDS + 1)
    assert lines[1].startswith("accepting connections again")
    accepting.stop()
    for sock in [*accepted, client]:
        sock.close()


async def test_a_long_outage_is_told_once_per_interval(lines, monkeypatch):
    monkeypatch.setattr(listener, "LOG_INTERVAL_SECONDS", 0.3)
    monkeypatch.setattr(listener, "PAUSE_CAP_SECONDS", 0.02)
    failing = Failing(socket.create_server(("127.0.0.1", 0)))
    accepting = Listener([failing], lambda sock, address: None)
    accepting.start()
    client = socket.create_connection(failing.sock.getsockname())
    await asyncio.sleep(1)
    assert failing.attempts > 20  # short pauses: many attempts, and still
    assert 3 <= len(lines) <= 5, lines  # a line per 0.3 s
    accepting.stop()
    client.close()
