"""What the tests share: a MongoDB to write to, the relay as a process, real clients, frames.

Tests import from here (``from tests.support import WS``); ``conftest.py`` holds only fixtures and
the runner for ``async def`` tests.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from bson import Decimal128, Int64
from hypothesis import strategies as st
from pymongo import MongoClient
from tornado import httpclient, httputil, websocket

from changerelay import events as ev
from changerelay.filters import compile_filter
from changerelay.frames import TEXT
from changerelay.primary import TestPrimary
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription

ROOT = Path(__file__).resolve().parent.parent
REAL_URI = os.environ.get("MONGODB_TEST_URI")
#: THOROUGH=1 (a .ci/run step of its own) runs every property test with its full number of
#: examples; the functional suite runs a fifth of them, to stay within a minute.
THOROUGH = os.environ.get("THOROUGH") == "1"


def examples(thorough: int) -> int:
    """Hypothesis examples for a property test: ``thorough`` in the THOROUGH run, a fifth (at
    least 20) in the functional suite."""
    return thorough if THOROUGH else max(20, thorough // 5)


# Linux's TCP states (include/net/tcp_states.h), as TCP_INFO reports them.
TCP_ESTABLISHED = 1


class Mongo:
    """The MongoDB a test writes to: the test primary, or a real replica set.

    ``tokens()`` is the reference log the clients are compared with: the ids of every change
    event in the test's database, in order — from the test primary's own log, or on a real
    deployment from a change stream this fixture opened before the test wrote anything.
    """

    def __init__(self, uri: str, primary: TestPrimary | None):
        self.uri = uri
        self.primary = primary
        self.db = "t_" + uuid.uuid4().hex[:12]
        self.client = MongoClient(uri, serverSelectionTimeoutMS=5000)
        self._log: list[str] = []
        self._recorder = None
        if primary is None:
            marks = self.db + "_marks"
            self._recorder = self.client.watch(
                [{"$match": {"ns.db": {"$in": [self.db, marks]}}}], max_await_time_ms=200)

    @property
    def fake(self) -> bool:
        return self.primary is not None

    def tokens(self) -> list[str]:
        if self.fake:
            return [event_id(e["_id"]) for e in self.primary.events
                    if e.get("ns", {}).get("db") == self.db]
        # Change streams are totally ordered: once a marker written now shows up, every event
        # committed before it has been seen.
        marker = uuid.uuid4().hex
        self.client[self.db + "_marks"].m.insert_one({"_id": marker})
        deadline = time.monotonic() + 30
        while True:
            change = self._recorder.try_next()
            if change is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the marker {marker} never came through the recorder")
                continue
            if change.get("ns", {}).get("db") == self.db:
                self._log.append(event_id(change["_id"]))
            elif change.get("documentKey", {}).get("_id") == marker:
                return list(self._log)

    def wait_for(self, predicate, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.01)

    def close(self):
        if not self.fake:
            self._recorder.close()
            self.client.drop_database(self.db)
            self.client.drop_database(self.db + "_marks")
        self.client.close()


@dataclass
class Response:
    code: int
    body: bytes
    headers: object

    def json(self):
        return json.loads(self.body)


class RelayProcess:
    """``python server.py`` as a subprocess, on a free port, with its log captured."""

    def __init__(self, env: dict, args=()):
        self.env = env
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 15) -> RelayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "WATCH_"))}
        env.update({"PORT": "0", "HOST": "127.0.0.1", "LOG_LEVEL": "DEBUG",
                    "PYTHONUNBUFFERED": "1"})
        env.update({k: str(v) for k, v in self.env.items()})
        argv = [str(ROOT / "server.py"), *self.args]
        if needs_fresh_interpreter(env, self.args):
            self.proc = subprocess.Popen(
                [sys.executable, *argv], cwd=str(ROOT), env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        else:
            self.proc = Zygote.get().spawn(argv, env, str(ROOT))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout):
            self.kill()
            raise AssertionError("relay did not start listening:\n" + self.log())
        return self

    def _read(self):
        pattern = re.compile(r"listening on http://[\d.]+:(\d+)/")
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = pattern.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()

    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket"

    def get(self, path: str, headers=None) -> Response:
        """A plain blocking GET (usable inside or outside an event loop)."""
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return Response(reply.status, reply.read(), reply.headers)
        except urllib.error.HTTPError as error:
            return Response(error.code, error.read(), error.headers)

    def ready(self) -> dict:
        response = self.get("/readyz")
        return {"status": response.code, **json.loads(response.body or b"{}")}

    def wait_ready(self, timeout: float = 15, source: str = "open") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.ready()
            if status.get("source") == source:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"readyz never reached {source}: {status}\n{self.log()}")
            time.sleep(0.05)

    def wait_log(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never appeared in the relay log:\n{self.log()}")

    def terminate(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(2)
        return code

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def needs_fresh_interpreter(env: dict[str, str], args: list[str]) -> bool:
    """Whether a relay must start as a new interpreter rather than fork from ``tests.zygote``:
    when what it runs with is read at import or interpreter start (``PYTHON*``; prometheus_client
    reads ``PROMETHEUS_MULTIPROC_DIR``, which ``REUSE_PORT`` sets before importing it), or when the
    zygote is switched off (``RELAY_POPEN=1``, to compare)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "WATCH_"))}
    changed = {k for k, v in env.items() if inherited.get(k) != v} | (inherited.keys() - env.keys())
    return (os.environ.get("RELAY_POPEN") == "1"
            or any(k.startswith(("PYTHON", "PROMETHEUS")) for k in changed - {"PYTHONUNBUFFERED"})
            or env.get("REUSE_PORT", "0").strip() not in ("", "0", "1")
            or any(a.startswith("--reuse-port") for a in args))


class Zygote:
    """The client of this test process's fork server (``tests/zygote.py``), started on first use."""

    _instance: Zygote | None = None
    _create = threading.Lock()

    @classmethod
    def get(cls) -> Zygote:
        with cls._create:
            if cls._instance is None or cls._instance.server.poll() is not None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", str(theirs.fileno())], cwd=str(ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL)
        theirs.close()
        atexit.register(self.close)
        self._spawning = threading.Lock()
        self._started: list[int] = []
        self._changed = threading.Condition()
        self.exits: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def close(self) -> None:
        """End the zygote (it kills relays left running) and reap it, so that its CPU time is
        counted where this process's is."""
        # shutdown(), not only close(): our reader thread is blocked in recv() on this socket,
        # and while a call holds it, close() does not end the connection, so the zygote saw no
        # end of file and every test process waited out the 10 s below at exit.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str,
              timeout: float = 30) -> ForkedProcess:
        read, write = os.pipe()
        message = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        with self._spawning:
            try:
                socket.send_fds(self.sock, [message], [write])
            finally:
                os.close(write)
            with self._changed:
                if not self._changed.wait_for(lambda: self._started, timeout):
                    os.close(read)
                    raise AssertionError("the zygote did not fork a relay in time")
                pid = self._started.pop(0)
        return ForkedProcess(self, pid, argv, os.fdopen(read, "r"))

    def _read(self) -> None:
        while True:
            try:
                message = self.sock.recv(4096)
            except OSError:
                message = b""
            with self._changed:
                if not message:  # the zygote died: no exit will be reported
                    self.exits.setdefault(-1, -1)
                    self._changed.notify_all()
                    return
                answer = json.loads(message)
                if "started" in answer:
                    self._started.append(answer["started"])
                else:
                    self.exits[answer["exited"]] = answer["code"]
                self._changed.notify_all()


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a relay forked by the zygote: its pid,
    its output, its exit status, signals. Signals go through a pidfd, so that one never reaches
    another process that got the pid after the relay's end."""

    def __init__(self, zygote: Zygote, pid: int, argv: list[str], stdout):
        self.zygote = zygote
        self.pid = pid
        self.args = argv
        self.stdout = stdout
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # already ended (and reaped by the zygote)
            self._pidfd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with self.zygote._changed:
                self._update()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote._changed:
            if not self.zygote._changed.wait_for(self._update, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _update(self) -> bool:
        if self.returncode is None:
            if self.pid in self.zygote.exits:
                self.returncode = self.zygote.exits.pop(self.pid)
            elif -1 in self.zygote.exits:
                raise AssertionError("the zygote died before the relay's exit was reported")
        if self.returncode is not None and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return self.returncode is not None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class RawHTTP:
    """A blocking TCP client that sends exactly the bytes it is given: the heads HTTP libraries
    will not send (oversized, malformed, half-sent, promising a body on GET)."""

    def __init__(self, port: int, timeout: float = 5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """Send ``data``; False if the relay had closed the connection already."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def response(self, timeout: float = 5) -> Response | None:
        """The next response, its body read by Content-Length; None if the connection closed
        before one; TimeoutError if none came in time."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            if not self._receive(deadline):
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, _, fields = head.decode("latin-1").partition("\r\n")
        headers = httputil.HTTPHeaders.parse(fields)
        length = int(headers.get("Content-Length", "0"))
        while len(self.buffer) < length and self._receive(deadline):
            pass
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status_line.split()[1]), body, headers)

    def closed(self, timeout: float = 5) -> bool:
        """True once the relay has closed the connection (whatever it sent first is kept in
        ``buffer``), False if it is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while self._receive(deadline):
                pass
        except TimeoutError:
            return False
        return True

    def _receive(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)  # TimeoutError past the deadline
        except ConnectionResetError:
            return False
        self.buffer += chunk
        return bool(chunk)

    def close(self) -> None:
        self.sock.close()


class ParkedHeads:
    """Connections that each send an endless request head, as fast as the relay takes it, and
    never finish it (``GET / HTTP/1.1``, then one header that does not end)."""

    def __init__(self, port: int, count: int):
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            self.sockets.append(sock)
        self.sent = [0] * count
        self.start = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Parked: "

    def push(self, seconds: float, most: int = 2 * 1024 * 1024) -> int:
        """Send for ``seconds`` (each connection at most ``most`` bytes); the bytes sent."""
        chunk = b"p" * 65536
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for number, sock in enumerate(self.sockets):
                data = self.start if not self.sent[number] else chunk
                if self.sent[number] >= most:
                    continue
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    self.sent[number] += sock.send(data)
            time.sleep(0.001)
        return sum(self.sent)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class WS:
    """A real WebSocket client (Tornado's) that records every frame it receives."""

    def __init__(self, conn):
        self.conn = conn
        self.frames: list[dict] = []

    @classmethod
    async def connect(cls, url: str, max_message_size: int | None = None, **kwargs) -> WS:
        """``max_message_size``: Tornado's is 10 MiB, and events may be larger."""
        request = httpclient.HTTPRequest(url, **kwargs)
        sizes = {} if max_message_size is None else {"max_message_size": max_message_size}
        return cls(await websocket.websocket_connect(request, **sizes))

    async def recv(self, timeout: float = 10):
        message = await asyncio.wait_for(self.conn.read_message(), timeout)
        if message is None:
            return None
        frame = json.loads(message)
        self.frames.append(frame)
        return frame

    async def changes(self, count: int, timeout: float = 20) -> list[dict]:
        """The next ``count`` change events (control messages are recorded but skipped)."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError(f"closed after {len(got)} of {count} changes: "
                                     f"{self.close_code} {self.close_reason}")
            if "operationType" in frame:
                got.append(frame)
        return got

    async def until(self, predicate, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError(f"closed before the awaited frame: {self.close_code}")
            if predicate(frame):
                return frame

    async def closed(self, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            message = await asyncio.wait_for(self.conn.read_message(),
                                             max(0.01, deadline - time.monotonic()))
            if message is None:
                return self.close_code, self.close_reason
            self.frames.append(json.loads(message))

    @property
    def close_code(self):
        return self.conn.close_code

    @property
    def close_reason(self):
        return self.conn.close_reason

    def close(self):
        self.conn.close()


class SSE:
    """A raw Server-Sent Events reader (what EventSource does, minus the browser)."""

    def __init__(self, reader, writer, status: int, head: str):
        self.reader, self.writer, self.status = reader, writer, status
        self.head = head  # the response head, lower-cased
        self._buf = b""

    @classmethod
    async def open(cls, port: int, query: str = "", last_event_id: str | None = None,
                   extra: dict | None = None):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        headers = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        headers += "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
        writer.write(f"GET /events{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Accept: text/event-stream\r\n{headers}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        assert b"chunked" in head.lower() or status != 200
        return cls(reader, writer, status, head.decode("latin-1").lower())

    async def _line(self) -> bytes:
        # The body is HTTP/1.1 chunked; SSE records may span chunks, so unchunk into a buffer.
        while b"\n" not in self._buf:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            self._buf += data[:-2]
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def record(self, timeout: float = 20) -> dict:
        """The next record; comment lines (heartbeats) are skipped."""
        fields: dict = {}
        while True:
            line = await asyncio.wait_for(self._line(), timeout)
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.decode().partition(": ")
            fields[name] = value

    async def comment(self, timeout: float = 5) -> bytes:
        """The next comment line (a heartbeat); call it between records, as it skips lines."""
        async with asyncio.timeout(timeout):
            while not (line := await self._line()).startswith(b":"):
                pass
        return line

    async def changes(self, count: int) -> list[dict]:
        got = []
        while len(got) < count:
            record = await self.record()
            if "data" in record and "event" not in record:
                got.append(record)
        return got

    def close(self):
        self.writer.close()


def drain(stream, count: int, timeout: float = 5) -> list[dict]:
    """The next ``count`` events of a (synchronous) change stream, failing, not hanging, if they
    don't arrive in time."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} events: {got}"
        event = stream.try_next()
        if event is not None:
            got.append(event)
    return got


def rss(pid: int) -> int:
    """A process's resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def latency(frame: dict) -> float:
    """Seconds from an event's commit (its ``wallTime``, the primary's clock) to now."""
    wall = datetime.datetime.fromisoformat(frame["wallTime"]["$date"])
    return time.time() - wall.timestamp()


async def latencies(client: WS, count: int) -> list[float]:
    """The latencies of ``client``'s next ``count`` events (a bystander's, in load tests), each
    taken as it arrives."""
    out = []
    while len(out) < count:
        [frame] = await client.changes(1, timeout=30)
        out.append(latency(frame))
    return out


def p95(values: list[float]) -> float:
    """The 95th percentile: of the 80 samples a load test's phase takes, a p99 is the second
    largest, which one stray pause of a shared machine sets."""
    return statistics.quantiles(values, n=100)[94]


def stalled_request(port: int, target: str) -> socket.socket:
    """A raw client that sends its request — a WebSocket handshake for ``/socket…``, a plain GET
    otherwise — and never reads a byte, its receive buffer small."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    upgrade = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    sock.sendall((f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"{upgrade if target.startswith('/socket') else ''}\r\n").encode())
    return sock


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (``tcpi_state``, the first byte of Linux's tcp_info):
    a peer that never reads learns nothing from its own reads, but its kernel knows whether the
    connection still stands."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


async def dropped(socks: list[socket.socket], timeout: float) -> bool:
    """Whether every one of ``socks`` is dropped (no longer established) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(tcp_state(sock) == TCP_ESTABLISHED for sock in socks):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def token(n: int) -> str:
    """A resume token's _data for the n-th event (the hub's tests need only their order)."""
    return f"82{n:016X}"


def event(n: int, op="insert", db="db", coll="c") -> ev.Event:
    """An encoded insert (or ``op``) event numbered ``n``."""
    return ev.encode_change({"_id": {"_data": token(n)}, "operationType": op,
                             "ns": {"db": db, "coll": coll}, "documentKey": {"_id": n}})


def event_id(token: dict) -> str:
    """The id a client holds for a resume token: ``_data``, then ``.`` and ``_typeBits`` in
    base64url without padding when the token has them (issue 12). ``token`` is a frame's ``_id``
    in relaxed Extended JSON or a token as the driver decodes it. Written out here on its own, so
    that the relay's ids are checked against it rather than against themselves."""
    bits = token.get("_typeBits")
    if isinstance(bits, dict):
        bits = base64.b64decode(bits["$binary"]["base64"])
    if not bits:
        return token["_data"]
    return token["_data"] + "." + base64.urlsafe_b64encode(bytes(bits)).rstrip(b"=").decode()


def token_of(frame: dict) -> str:
    """The id of an event frame (or of an event as MongoDB logged it)."""
    return event_id(frame["_id"])


def masked(payload: bytes, opcode: int = TEXT, fin: bool = True, rsv1: bool = False,
           mask: bytes | None = None, length_as: int | None = None) -> bytes:
    """A frame as a client must send it. The default mask is derived from the frame, not
    random, so that parametrised test ids are the same in every process (pytest-xdist)."""
    if mask is None:
        mask = hashlib.blake2b(payload + bytes([opcode]), digest_size=4).digest()
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    length = len(payload) if length_as is None else length_as
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def metrics(relay: RelayProcess, headers: dict | None = None) -> dict[tuple, float]:
    """``GET /metrics`` parsed: ``{(sample name, (label, value)...): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    response = relay.get("/metrics", headers=headers)
    assert response.code == 200, (response.code, response.body)
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.body.decode())
            for sample in family.samples}


def wait_metrics(relay: RelayProcess, predicate, timeout: float = 15) -> dict[tuple, float]:
    """Scrape until ``predicate(samples)`` holds; fail with the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = metrics(relay)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {samples}")
        time.sleep(0.05)


async def metrics_until(relay: RelayProcess, predicate, timeout: float = 15) -> dict[tuple, float]:
    """``wait_metrics`` for async tests: the loop keeps running (clients answer pings, closes
    go out) while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(metrics, relay)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {samples}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A port nothing listens on now (a test primary stopped and started again takes it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def websocket_by_hand(port: int, path: str = "/socket") -> socket.socket:
    """A WebSocket opened over a plain socket, its handshake read: it answers nothing, not even
    pings, and sends whatever bytes a test writes."""
    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += held.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return held
def split_frame(data: bytes) -> tuple[tuple[int, bytes], bytes] | None:
    """The first whole frame a server sent, as ``((opcode, payload), rest)``; None if the data
    does not hold one yet."""
    if len(data) < 2:
        return None
    length, offset = data[1] & 0x7F, 2
    if length == 126:
        length, offset = int.from_bytes(data[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(data[2:10], "big"), 10
    if len(data) < offset + length:
        return None
    return (data[0] & 0x0F, data[offset:offset + length]), data[offset + length:]


async def read_frames(sock: socket.socket, until_close: bool = False) -> list[tuple[int, bytes]]:
    """Every frame a (non-blocking) socket receives from a server, until EOF or, with
    ``until_close``, until its close frame."""
    loop = asyncio.get_running_loop()
    frames: list[tuple[int, bytes]] = []
    data = b""
    while chunk := await loop.sock_recv(sock, 1 << 20):
        data += chunk
        while (split := split_frame(data)) is not None:
            frame, data = split
            frames.append(frame)
            if until_close and frame[0] == 0x8:
                return frames
    return frames


# -- generated subscriptions and change events (hypothesis), for the index and the hub --------
# Owners alice and bob, so that filters and rules on them often decide, and leaves happen (the
# owner before the change matches, the owner after it does not).

WHO = st.sampled_from(["alice", "bob"])
SMALL = st.one_of(WHO, st.sampled_from([None, 1, 1.0, Int64(2), Decimal128("2"), True, "x"]),
                  st.lists(WHO, max_size=2))
FIELDS = st.sampled_from(["owner", "team", "n"])
# Documents mostly have an owner, so that rules and filters on it often decide (and leaves
# happen: the owner before the change matches, the owner after it does not).
OWNED = st.fixed_dictionaries({"owner": WHO}, optional={"team": SMALL, "n": SMALL})
IMAGE = st.one_of(OWNED, OWNED, OWNED, st.dictionaries(FIELDS, SMALL, max_size=3), st.none())
CONDITION = st.one_of(
    SMALL,
    st.builds(lambda v: {"$eq": v}, SMALL),
    st.builds(lambda vs: {"$in": vs}, st.lists(SMALL, max_size=3)),
    st.builds(lambda v: {"$ne": v}, SMALL),
    st.builds(lambda v: {"$gt": v}, st.sampled_from([0, "a"])),
    st.builds(lambda f: {"$exists": f}, st.booleans()),
    st.just({"$in": ["alice", {"$regex": "^b"}]}),
    st.just({"$regex": "^c"}),
)
PATH = st.one_of(
    FIELDS.map(lambda f: "fullDocument." + f),
    FIELDS.map(lambda f: "fullDocumentBeforeChange." + f),
    st.sampled_from(["documentKey._id", "operationType", "ns.coll", "fullDocument"]),
)
SPECS = st.recursive(
    st.dictionaries(PATH, CONDITION, min_size=1, max_size=2),
    lambda inner: st.builds(lambda op, branches: {op: branches},
                            st.sampled_from(["$and", "$or", "$nor"]),
                            st.lists(inner, min_size=1, max_size=3)),
    max_leaves=4,
)
RULES = st.one_of(
    WHO.map(lambda who: {"fullDocument.owner": who}),
    st.lists(WHO, max_size=2).map(lambda who: {"fullDocument.owner": {"$in": who}}),
    st.dictionaries(FIELDS.map(lambda f: "fullDocument." + f), CONDITION, min_size=1,
                    max_size=2),
    SPECS,
)
OPS = ["insert", "update", "replace", "delete", "drop", "invalidate", "dropDatabase"]
DOCUMENT_OPS = ["update", "replace", "delete", "update", "replace", "insert"]
NAMESPACES = st.sampled_from([("db", "c"), ("db", "d"), ("db", None), ("other", "c")])


def sometimes(strategy):
    """None two times in three: every part a subscription has narrows what it is sent."""
    return st.one_of(st.none(), st.none(), strategy)


def subscriptions(post_images=None):
    """Subscriptions with any parts. ``post_images`` is a relay's (FULL_DOCUMENT) for every
    token it admits, and a rule's equality does not include it: tests of one hub draw it once."""
    return st.builds(
        lambda ns, ops, spec, rule, post, grant: Subscription(
            ns, ops, None if spec is None else compile_filter(spec),
            None if rule is None else AccessRule(rule, post_images=post), grant),
        sometimes(st.lists(NAMESPACES, min_size=1, max_size=2)),
        sometimes(st.lists(st.sampled_from(OPS), min_size=1, max_size=3)),
        st.none() | SPECS, st.none() | RULES | RULES,
        st.booleans() if post_images is None else post_images,
        sometimes(st.lists(NAMESPACES, min_size=1, max_size=2)),
    )


SUBSCRIPTIONS = subscriptions()


@st.composite
def batches(draw, max_size=5):
    """Change events numbered from 1 (``token(n)``): inserts, updates, replaces and deletes
    with and without images, drops, renames' kin, invalidates, over a few namespaces."""
    events = []
    for n in range(1, draw(st.integers(1, max_size)) + 1):
        op = draw(st.sampled_from(DOCUMENT_OPS) | st.sampled_from(OPS))
        fields = {"_id": {"_data": token(n)}, "operationType": op}
        if op != "invalidate":
            db, coll = draw(NAMESPACES)
            fields["ns"] = {"db": db} if op == "dropDatabase" else {"db": db, "coll": coll or "c"}
        if op in ("insert", "update", "replace", "delete"):
            fields["documentKey"] = {"_id": draw(st.integers(0, 2))}
            after, before = draw(IMAGE), draw(IMAGE)
            if op != "delete" and (after is not None or op != "update"):
                fields["fullDocument"] = after
            if op != "insert" and draw(st.integers(0, 3)):
                fields["fullDocumentBeforeChange"] = before
        events.append(ev.encode_change(fields))
    return events


class FakeClient:
    """A client as the hub sees it (``hub.Subscriber``), recording the events and control
    messages it is handed."""

    encoding = "ws"

    def __init__(self, subscription=None):
        self.subscription = subscription or Subscription()
        self.received: list[str] = []
        self.controls: list[dict] = []
        self.last_send = 0.0
        self.told = None
        self.sent = None
        self.closed = False

    def pack(self, events):
        return json.dumps([e.token for e in events]).encode()

    def send(self, payload):
        self.received.extend(json.loads(payload))

    def deliver(self, events, payload):
        self.send(payload)

    def replay(self, events):
        self.send(self.pack(events))

    def send_control(self, message, token=None):
        self.controls.append(json.loads(message))
