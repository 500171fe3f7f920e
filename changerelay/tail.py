"""``changerelay tail URL``: print a relay's events as JSON lines, resuming forever.

The reference client for the resume protocol, in a terminal: it remembers the newest event id or
position, reconnects with ``resume_after`` after any drop (the relay's own backoff, ``backoff.py``),
and reports ``resync`` on stderr. Each line on stdout is one frame exactly as the relay sent it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bson import json_util
from tornado import httpclient, websocket

from .backoff import Backoff
from .tokens import token_id

BACKOFF_BASE = 0.5  # seconds before the first reconnect
BACKOFF_CAP = 30.0  # at most: a relay that is down for long is asked twice a minute
STABLE_AFTER = 10.0  # seconds connected after which the next drop starts the backoff over
FATAL_STATUSES = (400, 401, 403)


def with_resume(url: str, token: str | None) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "resume_after"]
    if token:
        query.append(("resume_after", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Tail:
    def __init__(self, url: str, resume_after: str | None = None, token: str | None = None,
                 out: TextIO | None = None, err: TextIO | None = None):
        if url.startswith("http"):
            url = "ws" + url[4:]
        self.url = url
        self.last = resume_after
        self.token = token
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.received = 0

    def note(self, text: str) -> None:
        print(f"tail: {text}", file=self.err, flush=True)

    async def run(self, max_events: int | None = None) -> int:
        backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP)
        while True:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            request = httpclient.HTTPRequest(with_resume(self.url, self.last), headers=headers)
            try:
                conn = await websocket.websocket_connect(request)
            except httpclient.HTTPClientError as exc:
                body = exc.response.body.decode(errors="replace") if exc.response else ""
                if exc.code in FATAL_STATUSES:
                    self.note(f"refused with HTTP {exc.code}: {body}")
                    return 1
                self.note(f"HTTP {exc.code} {body}".strip())
            except OSError as exc:
                self.note(f"cannot connect: {exc}")
            else:
                opened = time.monotonic()
                done = await self._read(conn, max_events)
                if done:
                    conn.close()
                    return 0
                self.note(f"closed ({conn.close_code} {conn.close_reason or ''}); "
                          f"resuming after {self.last}")
                if time.monotonic() - opened > STABLE_AFTER:
                    backoff.reset()
            await asyncio.sleep(backoff.delay())

    async def _read(self, conn: websocket.WebSocketClientConnection,
                    max_events: int | None) -> bool:
        while True:
            message = await conn.read_message()
            if message is None:
                return False
            frame = json_util.loads(message)  # relaxed Extended JSON: _typeBits become bytes
            print(message, file=self.out, flush=True)
            if "operationType" in frame:
                self.last = token_id(frame["_id"])
                self.received += 1
                if max_events is not None and self.received >= max_events:
                    return True
            elif frame.get("type") == "position":
                self.last = frame["resume_after"]
            elif frame.get("type") == "resync":
                self.note(f"resync ({frame.get('reason')}): events were lost; reload your state")


def main(argv: list[str], prog: str = "changerelay tail") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("url", help="e.g. ws://localhost:8000/socket?ns=shop.orders")
    parser.add_argument("--resume-after", help="the id of the last event you processed (a line's "
                        "_id._data, then '.' and its _typeBits in base64url if it has any)")
    parser.add_argument("--token", help="a JWT, sent as Authorization: Bearer")
    parser.add_argument("--max-events", type=int, help="exit after this many change events")
    args = parser.parse_args(argv)
    tail = Tail(args.url, args.resume_after, args.token)
    try:
        return asyncio.run(tail.run(args.max_events))
    except KeyboardInterrupt:
        return 130
