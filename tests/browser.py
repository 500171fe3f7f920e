"""A small headless-Chromium driver that speaks the DevTools protocol directly.

Why not Selenium or Playwright: both are large downloads with their own browser builds, and all
the tests need is to load a page, evaluate JavaScript, read the console and take a screenshot.
Debian's ``chromium`` package plus Tornado's WebSocket client (already a dependency) cover that.

The DevTools connection lives on a private asyncio loop in a background thread, so the API is
plain synchronous calls that a pytest test can make without an async plugin::

    with Browser.start() as browser:
        browser.open("http://127.0.0.1:8888/")
        browser.wait_for("document.querySelectorAll('tbody tr').length >= 1")
        print(browser.console_messages)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

CHROMIUM = "/usr/bin/chromium"
_PR_SET_CHILD_SUBREAPER = 36

# Flags that keep a headless run quiet, deterministic and free of network side traffic.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
)


# key → (virtual key code, text it types)
_KEYS = {"Enter": (13, "\r"), "Escape": (27, ""), "Tab": (9, ""), " ": (32, " ")}


class BrowserError(RuntimeError):
    """Chromium could not be started, or the DevTools protocol reported an error."""


class JavaScriptError(BrowserError):
    """The evaluated JavaScript threw; the message is the page's own error description."""


@dataclasses.dataclass
class ConsoleMessage:
    """One ``console.*`` call, or an uncaught exception / browser log entry (``level`` says which).

    ``args`` holds the logged values converted to Python: objects and arrays are copied by value
    (as JSON), so a test can inspect what the page logged rather than a DevTools handle.
    """

    level: str
    args: list[Any]

    @property
    def text(self) -> str:
        """The arguments joined like a console line; objects are rendered as compact JSON."""
        return " ".join(
            a if isinstance(a, str) else json.dumps(a, separators=(",", ":")) for a in self.args
        )


class Browser:
    """A running headless Chromium with one page attached over the DevTools protocol."""

    def __init__(self) -> None:
        # Use Browser.start(); the constructor only sets up state so close() is always safe.
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._ws: WebSocketClientConnection | None = None
        self._session: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._changed = threading.Condition()
        self._console: list[ConsoleMessage] = []
        self._websocket_urls: list[str] = []
        self._websocket_handshakes: list[dict[str, str]] = []  # response headers, in order
        # Console arguments are fetched by value in arrival order; this queue keeps that order.
        self._console_queue: asyncio.Queue[tuple[int, str, list[dict[str, Any]]]] | None = None
        self._tasks: list[asyncio.Future[None]] = []
        self._page_loads = 0  # tags queued console messages, so a new page drops stale ones
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        executable: str = CHROMIUM,
        *,
        width: int = 1280,
        height: int = 800,
        timeout: float = 30.0,
    ) -> Browser:
        """Launch Chromium with a throwaway profile and attach to a fresh blank page."""
        if not os.access(executable, os.X_OK):
            raise BrowserError(
                f"{executable} is missing or not executable; install it (apt-get install chromium)"
            )
        _become_subreaper()
        browser = cls()
        try:
            browser._launch(executable, width, height, timeout)
        except BaseException:
            browser.close()
            raise
        return browser

    def _launch(self, executable: str, width: int, height: int, timeout: float) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="changerelay-chromium-"))
        profile = self._tmp / "profile"
        log_path = self._tmp / "chromium.log"
        # A private HOME keeps the crash handler's database and caches out of the real one.
        env = {**os.environ, "HOME": str(self._tmp), "XDG_CONFIG_HOME": str(self._tmp / "config"),
               "XDG_CACHE_HOME": str(self._tmp / "cache")}
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own process group, so close() can reap renderer and zygote children too.
                start_new_session=True,
            )
        endpoint = self._wait_for_endpoint(profile / "DevToolsActivePort", log_path, timeout)
        self._thread.start()
        self._run(self._attach(endpoint, width, height), timeout)

    def _wait_for_endpoint(self, port_file: Path, log_path: Path, timeout: float) -> str:
        """Chromium writes the port it picked (and the browser target path) once it listens."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrowserError(
                    f"chromium exited with status {self._process.returncode} before DevTools "
                    f"was ready; its output:\n{_tail(log_path)}"
                )
            with contextlib.suppress(FileNotFoundError):
                lines = port_file.read_text().split()
                if len(lines) == 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.02)  # the file has no change notification; poll it against a deadline
        raise BrowserError(
            f"chromium did not write {port_file} within {timeout}s; its output:\n{_tail(log_path)}"
        )

    async def _attach(self, endpoint: str, width: int, height: int) -> None:
        self._ws = await websocket_connect(endpoint, max_message_size=256 * 1024 * 1024)
        self._console_queue = asyncio.Queue()
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._console_loop()),
        ]
        target = await self._send(
            "Target.createTarget", {"url": "about:blank"}, browser_level=True
        )
        attached = await self._send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
            browser_level=True,
        )
        self._session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self._send(f"{domain}.enable")
        await self._send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def close(self) -> None:
        """Shut Chromium down and remove its profile. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        helpers = set()
        if self._process is not None and self._tmp is not None:
            helpers = _chromium_processes(self._process.pid, str(self._tmp))
        if self._ws is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._send("Browser.close", browser_level=True), 5)
            with contextlib.suppress(Exception):
                self._run(self._disconnect(), 5)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
        if self._process is not None:
            _stop(self._process, helpers)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _disconnect(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            self._ws.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The browser process id, so a test can check nothing outlives close()."""
        return self._process.pid if self._process else None

    # -- page API ----------------------------------------------------------------------------

    def open(self, url: str, timeout: float = 15.0) -> None:
        """Navigate the page to ``url`` and return once its ``load`` event has fired.

        Console messages and WebSocket URLs recorded for the previous page are forgotten. The
        page goes to ``about:blank`` first: until the previous page is unloaded, its timers still
        run (a reconnect to the previous test's relay, already gone, logged a refused connection
        into the next test's console); DevTools events arrive in order, so once the blank page
        has loaded nothing more of the previous one can come.
        """

        async def navigate(to: str) -> None:
            loaded = self._next_event("Page.loadEventFired")
            result = await self._send("Page.navigate", {"url": to})
            if result.get("errorText"):
                loaded.cancel()
                raise BrowserError(f"could not open {to}: {result['errorText']}")
            await loaded

        self._run(navigate("about:blank"), timeout)
        with self._changed:
            self._console.clear()
            self._websocket_urls.clear()
            self._websocket_handshakes.clear()
            self._page_loads += 1
        self._run(navigate(url), timeout)

    def evaluate(self, js: str, timeout: float = 15.0) -> Any:
        """Evaluate a JavaScript expression in the page; promises are awaited.

        The result comes back by value (JSON-compatible); ``undefined`` becomes ``None``. An
        exception in the page raises :class:`JavaScriptError` with the page's error text.
        """
        result = self._run(
            self._send(
                "Runtime.evaluate",
                {"expression": js, "returnByValue": True, "awaitPromise": True},
            ),
            timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(f"{description}\n  while evaluating: {js}")
        return result["result"].get("value")

    def wait_for(self, js_predicate: str, timeout: float = 5.0) -> Any:
        """Wait until the JavaScript expression is truthy in the page; return its value.

        The polling runs inside the page (every animation-frame-ish 10 ms), so a wait costs one
        round trip. Raises ``TimeoutError`` naming the predicate and its last value.
        """
        script = f"""new Promise((resolve, reject) => {{
            const predicate = () => ({js_predicate});
            const deadline = performance.now() + {timeout * 1000};
            const check = () => {{
                let value;
                try {{ value = predicate(); }} catch (error) {{ reject(error); return; }}
                if (value) resolve({{ok: true, value}});
                else if (performance.now() >= deadline) resolve({{ok: false, value}});
                else setTimeout(check, 10);
            }};
            check();
        }})"""
        outcome = self.evaluate(script, timeout + 10)
        if not outcome["ok"]:
            raise TimeoutError(
                f"{js_predicate!r} still {outcome.get('value')!r} after {timeout}s"
            )
        return outcome["value"]

    @property
    def console_messages(self) -> list[ConsoleMessage]:
        """Everything the page logged so far (console calls, uncaught errors, CSP reports)."""
        with self._changed:
            return list(self._console)

    def wait_for_console(
        self, predicate: Callable[[ConsoleMessage], bool], timeout: float = 5.0
    ) -> ConsoleMessage:
        """Wait until a console message satisfying ``predicate`` has been logged; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self._console:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = "\n  ".join(m.text[:200] for m in self._console[-10:])
                    raise TimeoutError(
                        f"no matching console message in {timeout}s; the last ones:\n  {seen}"
                    )
                self._changed.wait(remaining)

    @property
    def websocket_urls(self) -> list[str]:
        """URLs of every WebSocket the page opened, in order (from the Network domain)."""
        with self._changed:
            return list(self._websocket_urls)

    @property
    def websocket_handshakes(self) -> list[dict[str, str]]:
        """Response headers (lower-case names) of every WebSocket handshake the page completed."""
        with self._changed:
            return list(self._websocket_handshakes)

    def wait_for_websockets(self, count: int, timeout: float = 5.0) -> list[str]:
        """Wait until the page has opened at least ``count`` WebSockets; return their URLs."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._websocket_urls) >= count, timeout):
                raise TimeoutError(
                    f"the page opened {len(self._websocket_urls)} WebSockets in {timeout}s, "
                    f"not {count}: {self._websocket_urls}"
                )
            return list(self._websocket_urls)

    def press(self, key: str) -> None:
        """Press and release a key (``Enter``, ``Escape``, ``Tab``, ``" "``) as a user would:
        trusted events, to whatever has the focus."""
        code, text = _KEYS[key]
        for kind in ("keyDown", "keyUp"):
            params = {"type": kind, "key": key, "code": "Space" if key == " " else key,
                      "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
            if kind == "keyDown" and text:
                params["text"] = text
            self._run(self._send("Input.dispatchKeyEvent", params), 10)

    def set_viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Resize the page's viewport (``mobile``: a phone's meta-viewport handling too)."""
        self._run(self._send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}), 10)

    def prefer_color_scheme(self, scheme: str | None) -> None:
        """Emulate ``prefers-color-scheme: light`` or ``dark``; None: the browser's own."""
        features = [{"name": "prefers-color-scheme", "value": scheme}] if scheme else []
        self._run(self._send("Emulation.setEmulatedMedia", {"features": features}), 10)

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the viewport to ``path`` and return it."""
        result = self._run(self._send("Page.captureScreenshot", {"format": "png"}), 30)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(result["data"]))
        return target

    # -- DevTools plumbing (runs on the private loop) ----------------------------------------

    def _run(self, coroutine: Any, timeout: float) -> Any:
        if not self._thread.is_alive():
            coroutine.close()
            raise BrowserError("the browser is closed (or was never started); use Browser.start()")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _send(
        self, method: str, params: dict[str, Any] | None = None, *, browser_level: bool = False
    ) -> dict[str, Any]:
        """Send one command to the page session (or to the browser itself) and await its reply."""
        if self._ws is None:
            raise BrowserError("not connected to chromium")
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if not browser_level:
            message["sessionId"] = self._session
        reply = self._pending[message_id] = asyncio.get_running_loop().create_future()
        try:
            await self._ws.write_message(json.dumps(message))
            return await reply
        finally:
            self._pending.pop(message_id, None)

    def _next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event on our page session."""
        future = asyncio.get_running_loop().create_future()

        def listener(name: str, params: dict[str, Any]) -> None:
            if name == method and not future.done():
                future.set_result(params)

        self._listeners.append(listener)
        future.add_done_callback(lambda _: self._listeners.remove(listener))
        return future

    async def _read_loop(self) -> None:
        assert self._ws is not None
        while (raw := await self._ws.read_message()) is not None:
            message = json.loads(raw)
            if "id" in message:
                reply = self._pending.get(message["id"])
                if reply is None or reply.done():
                    continue
                if "error" in message:
                    reply.set_exception(BrowserError(f"DevTools error: {message['error']}"))
                else:
                    reply.set_result(message.get("result", {}))
            elif message.get("sessionId") == self._session:
                self._dispatch(message["method"], message.get("params", {}))
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(BrowserError("the DevTools connection closed"))

    def _dispatch(self, method: str, params: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            listener(method, params)
        assert self._console_queue is not None
        if method == "Runtime.consoleAPICalled":
            self._console_queue.put_nowait((self._page_loads, params["type"], params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self._console_queue.put_nowait((self._page_loads, "exception", [{"value": text}]))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            message = (self._page_loads, entry["level"], [{"value": entry["text"]}])
            self._console_queue.put_nowait(message)
        elif method == "Network.webSocketCreated":
            with self._changed:
                self._websocket_urls.append(params["url"])
                self._changed.notify_all()
        elif method == "Network.webSocketHandshakeResponseReceived":
            headers = {k.lower(): v for k, v in params["response"].get("headers", {}).items()}
            with self._changed:
                self._websocket_handshakes.append(headers)
                self._changed.notify_all()

    async def _console_loop(self) -> None:
        assert self._console_queue is not None
        while True:
            page_load, level, args = await self._console_queue.get()
            values = [await self._by_value(arg) for arg in args]
            with self._changed:
                if page_load != self._page_loads:
                    continue
                self._console.append(ConsoleMessage(level, values))
                self._changed.notify_all()

    async def _by_value(self, remote: dict[str, Any]) -> Any:
        """Turn a DevTools RemoteObject into a Python value, copying objects as JSON."""
        if "value" in remote:
            return remote["value"]
        if "objectId" not in remote:
            return remote.get("unserializableValue", remote.get("description"))
        try:
            result = await self._send(
                "Runtime.callFunctionOn",
                {
                    "objectId": remote["objectId"],
                    "functionDeclaration": "function () { return this; }",
                    "returnByValue": True,
                },
            )
            return result["result"].get("value")
        except BrowserError:
            return remote.get("description")


def _stop(process: subprocess.Popen[bytes], helpers: set[int]) -> None:
    """Wait for Chromium to exit, escalating to signals, then reap every helper it started.

    ``helpers`` is the browser's process tree, taken while it ran: the crash handlers leave the
    browser's process group and get re-parented to us (we are their subreaper), so a group kill
    alone would leave them as zombies.
    """
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        try:
            process.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    remaining = set(helpers)
    while remaining:
        for pid in list(remaining):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    remaining.discard(pid)
            except ChildProcessError:  # not ours to reap: done once it has gone
                if not Path(f"/proc/{pid}").exists():
                    remaining.discard(pid)
        if time.monotonic() > deadline:
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        if remaining:
            time.sleep(0.01)  # no portable way to wait on non-children; poll with a deadline


def _chromium_processes(root: int, marker: str) -> set[int]:
    """Pids of ``root``'s live descendants, plus our children whose command line has ``marker``.

    The second set catches Chromium's crash handlers: they double-fork, so they are our
    children (we are their subreaper), not the browser's. Read from /proc; empty elsewhere.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # The command name may contain spaces or parentheses; fields resume after the last ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found = set()
    for pid in children.get(os.getpid(), []):
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux only) so close() can reap Chromium's zygote helpers."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no output: {error})"
