"""Accepting connections on the listening sockets, and pausing when accept() cannot succeed.

At the open-files limit (EMFILE, or the system's ENFILE) accept() fails while the connection stays
queued, so the listening socket stays readable. Tornado's accept loop called it again at once,
forever: a core busy, a traceback per attempt (33 MB of log in 10 s) and every other callback
starved. Here a failed accept() stops accepting on every listening socket for a moment — the one
backoff (``backoff.py``), from milliseconds up to a second — while connected clients are served as
usual; new connections wait in the kernel's backlog, and accepting resumes by itself once there
are descriptors again. One log line per ``LOG_INTERVAL_SECONDS`` says how often it happened.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from logzero import logger

from .backoff import Backoff

# Connections accepted per wake-up, as Tornado's own loop does, so that a crowd of new connections
# does not starve the connected ones.
ACCEPT_BATCH = 128
PAUSE_BASE_SECONDS = 0.01  # the first pause after accept() fails
PAUSE_CAP_SECONDS = 1.0    # the longest: accepting comes back at most this late
LOG_INTERVAL_SECONDS = 10.0

OnConnection = Callable[[socket.socket, Any], None]


class Listener:
    """Hands every accepted connection (non-blocking) to ``on_connection``."""

    def __init__(self, sockets: list[socket.socket], on_connection: OnConnection):
        self.sockets = sockets
        self.on_connection = on_connection
        self.loop = asyncio.get_running_loop()
        self.backoff = Backoff(PAUSE_BASE_SECONDS, PAUSE_CAP_SECONDS)
        self._resuming: asyncio.TimerHandle | None = None
        self._failing_since: float | None = None  # when accept() began to fail, if it does
        self._failures = 0  # failed accept() calls since then
        self._logged_at = -LOG_INTERVAL_SECONDS
        self._told = False  # a line said accepting had stopped, and none yet that it resumed

    def start(self) -> None:
        for sock in self.sockets:
            sock.setblocking(False)
        self._listen()

    def stop(self) -> None:
        """Accept nothing more, and close the listening sockets."""
        self._pause()
        if self._resuming is not None:
            self._resuming.cancel()
        for sock in self.sockets:
            sock.close()

    def _listen(self) -> None:
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self) -> None:
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # gone while it was queued
                continue
            except OSError as exc:
                self._failed(exc)
                return
            if self._failing_since is not None:
                self._recovered()
            connection.setblocking(False)
            self.on_connection(connection, address)

    def _failed(self, exc: OSError) -> None:
        """Stop accepting for a moment; say so at most once per LOG_INTERVAL_SECONDS."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since, self._failures = now, 0
        self._failures += 1
        if now - self._logged_at >= LOG_INTERVAL_SECONDS:
            logger.warning("not accepting connections for %.1fs: %s (%d accept() calls failed); "
                           "connected clients are still served, and accepting resumes by itself",
                           now - self._failing_since, exc.strerror or exc, self._failures)
            self._logged_at, self._told = now, True
        self._pause()
        self._resuming = self.loop.call_later(self.backoff.delay(), self._listen)

    def _recovered(self) -> None:
        assert self._failing_since is not None
        if self._told:
            logger.info("accepting connections again after %.1fs (%d accept() calls failed)",
                        time.monotonic() - self._failing_since, self._failures)
            self._told = False
        self._failing_since = None
        self.backoff.reset()
