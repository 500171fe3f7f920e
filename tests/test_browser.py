"""The page and its JavaScript client, driven in headless Chromium.

Three fixtures connect the end-to-end tests to a relay:

- ``relay_page_url``: the URL of the page (``GET /``).
- ``relay_collection``: a PyMongo ``Collection`` (or something with its write methods and
  ``full_name``); writing through it must produce change events on the relay's socket.
- ``drop_sockets(then=None)``: make the server close every ``/socket`` connection with 1001,
  calling ``then()`` while no new connection can be accepted.

Each runs twice, via the ``backend`` fixture: against :class:`StubRelay`, a small Tornado app
that speaks the wire protocol (change events in relaxed Extended JSON, control messages,
``resume_after`` replay) and sends the real page's Content-Security-Policy; and, marked ``e2e``,
against server.py watching the test primary (:class:`RealRelay`, through conftest's ``mongo``
and ``relay_factory``). Tests of the page's reaction to control messages and of the client
library on its own use the stub only: it can inject any message or close code on demand.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
import tornado.web
import tornado.websocket
from browser import CHROMIUM, Browser, ConsoleMessage, JavaScriptError
from bson import Int64, ObjectId, Timestamp, json_util
from pymongo import MongoClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from changerelay.primary import TestPrimary
from tests.support import free_port, token_of, websocket_by_hand

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI installs it")
    with Browser.start() as running:
        yield running


@pytest.fixture(scope="module")
def relay_stub() -> Iterator[StubRelay]:
    stub = StubRelay()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture(params=["stub", pytest.param("relay", marks=pytest.mark.e2e)])
def backend(request: pytest.FixtureRequest, relay_stub: StubRelay) -> StubRelay | RealRelay:
    """The relay a test talks to: the stub, or server.py against the test primary."""
    if request.param == "stub":
        return relay_stub
    return RealRelay(request.getfixturevalue("mongo"), request.getfixturevalue("relay_factory"))


@pytest.fixture
def relay_page_url(backend: StubRelay | RealRelay) -> str:
    return backend.page_url


@pytest.fixture
def relay_collection(backend: StubRelay | RealRelay) -> Any:
    return backend.collection


@pytest.fixture
def drop_sockets(backend: StubRelay | RealRelay) -> Callable[..., None]:
    return backend.drop_sockets


def live(browser: Browser, url: str) -> Browser:
    """Load the page and wait until its socket is open, so changes made now will reach it."""
    browser.open(url)
    browser.wait_for("document.getElementById('status').dataset.state === 'live'", 10)
    return browser


@pytest.fixture
def page(browser: Browser, relay_page_url: str) -> Browser:
    return live(browser, relay_page_url)


@pytest.fixture
def stub_page(browser: Browser, relay_stub: StubRelay) -> Browser:
    """The page on the stub, for tests that inject control messages or close codes."""
    return live(browser, relay_stub.page_url)


@pytest.fixture
def phone(browser: Browser) -> Iterator[Browser]:
    """The browser at a phone's width (390 px, as an iPhone 12-15), for one test."""
    browser.set_viewport(390, 844, mobile=True)
    try:
        yield browser
    finally:
        browser.set_viewport(1280, 800)


@pytest.fixture
def dark(browser: Browser) -> Iterator[Browser]:
    browser.prefer_color_scheme("dark")
    try:
        yield browser
    finally:
        browser.prefer_color_scheme(None)


# -- helpers -----------------------------------------------------------------------------------

ROWS_JS = """Array.from(document.querySelectorAll('#rows tr.change'), (row) => ({
    id: row.dataset.id, op: row.dataset.op, time: row.querySelector('time').dateTime,
    cells: Array.from(row.cells, (cell) => cell.textContent)}))"""


def rows(browser: Browser, marker: str) -> list[dict[str, Any]]:
    """Table rows (top to bottom) whose document key mentions ``marker``."""
    return [row for row in browser.evaluate(ROWS_JS) if marker in row["cells"][3]]


def wait_for_rows(browser: Browser, marker: str, count: int, timeout: float = 10) -> None:
    browser.wait_for(
        f"Array.from(document.querySelectorAll('#rows tr.change td:nth-child(4)'))"
        f".filter((td) => td.textContent.includes({json.dumps(marker)})).length >= {count}",
        timeout,
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def logged(browser: Browser) -> list[dict[str, Any]]:
    """The messages the page logged, as objects (it logs each one as it arrives)."""
    return [
        m.args[0] for m in browser.console_messages
        if m.level == "log" and m.args and isinstance(m.args[0], dict)
    ]


def is_change(message: ConsoleMessage, document_key: dict[str, Any]) -> bool:
    """Whether ``message`` logged the change event of the document with ``document_key``."""
    return (
        message.level == "log"
        and len(message.args) == 1
        and isinstance(message.args[0], dict)
        and message.args[0].get("documentKey") == document_key
    )


COUNT_JS = "Number(document.getElementById('count').textContent.replaceAll(',', ''))"


def is_event(message: ConsoleMessage, token: str) -> bool:
    """Whether ``message`` logged the change event whose id is ``token``."""
    return bool(message.args) and isinstance(message.args[0], dict) and (
        message.args[0].get("_id", {}).get("_data") == token
    )


def problems(browser: Browser) -> list[str]:
    """Errors the page produced: exceptions, CSP violations, failed loads."""
    return [m.text for m in browser.console_messages if m.level in ("error", "exception")]


# -- the page ----------------------------------------------------------------------------------


def test_status_goes_live_on_a_socket_derived_from_the_page_url(page: Browser) -> None:
    assert page.evaluate("document.getElementById('status-text').textContent") == "Live"
    socket_url = page.websocket_urls[-1]  # (a socket of the previous test's page may linger)
    page_url = urlsplit(page.evaluate("location.href"))
    assert socket_url == f"ws://{page_url.netloc}/socket"
    assert problems(page) == []


def test_a_change_appears_as_a_row_and_is_console_logged(
    page: Browser, relay_collection: Any
) -> None:
    key = unique("ada")
    relay_collection.insert_one({"_id": key, "name": "Ada Lovelace", "born": 1815})

    wait_for_rows(page, key, 1)
    [row] = rows(page, key)
    time, op, ns, document_key, change = row["cells"]
    assert op == "insert"
    assert ns == relay_collection.full_name
    assert document_key == json.dumps(key)
    assert change == '{name: "Ada Lovelace", born: 1815}'
    assert page.evaluate("document.getElementById('count').textContent") == "1"

    logged = page.wait_for_console(lambda m: is_change(m, {"_id": key}))
    event = logged.args[0]
    assert event["operationType"] == "insert"
    assert event["_id"]["_data"] == row["id"]
    assert row["time"] == event["wallTime"]["$date"]  # relaxed EJSON: an ISO-8601 string
    assert time[8] == "." and len(time) == 12  # HH:MM:SS.mmm
    assert problems(page) == []


def test_each_operation_type_is_rendered(page: Browser, relay_collection: Any) -> None:
    key = unique("op")
    relay_collection.insert_one({"_id": key, "tags": ["a", "b", "c"], "n": 1})
    relay_collection.update_one(
        {"_id": key}, {"$set": {"n": 2, "note": "x"}, "$unset": {"tags": ""}}
    )
    relay_collection.replace_one({"_id": key}, {"n": 3})
    relay_collection.delete_one({"_id": key})

    wait_for_rows(page, key, 4)
    table = rows(page, key)
    assert [r["op"] for r in table] == ["delete", "replace", "update", "insert"]
    ops = page.evaluate(
        "Array.from(document.querySelectorAll('#rows tr.change .op'), (b) => b.className)"
    )
    assert ops[:4] == ["op op-delete", "op op-replace", "op op-update", "op op-insert"]
    assert table[2]["cells"][4] == 'n = 2note = "x"unset tags'
    assert table[1]["cells"][4] == "{n: 3}"
    assert table[0]["cells"][4] == "document removed"


def test_events_without_a_document_and_unknown_types_are_rendered(
    stub_page: Browser, relay_stub: StubRelay
) -> None:
    ns = ("shop", unique("tmp"))
    relay_stub.publish(relay_stub.event("rename", ns, to={"db": "shop", "coll": "archive"}))
    relay_stub.publish(relay_stub.event("drop", ns))
    relay_stub.publish(relay_stub.event("invalidate", ns))
    created = relay_stub.event("createIndexes", ns, operationDescription={"indexes": [{"v": 2}]})
    relay_stub.publish(created)  # a type this page predates: shown, not dropped
    dropped = relay_stub.event("dropDatabase", ns)
    del dropped["ns"]["coll"]
    relay_stub.publish(dropped)

    stub_page.wait_for("document.querySelectorAll('#rows tr.change').length === 5")
    table = [row["cells"][1:] for row in stub_page.evaluate(ROWS_JS)]
    assert table == [
        ["dropDatabase", "shop", "—", "database dropped"],
        ["createIndexes", f"shop.{ns[1]}", "—", "{indexes: [{v: 2}]}"],
        ["invalidate", f"shop.{ns[1]}", "—", "change stream invalidated"],
        ["drop", f"shop.{ns[1]}", "—", "collection dropped"],
        ["rename", f"shop.{ns[1]}", "—", "renamed to shop.archive"],
    ]
    badges = stub_page.evaluate(
        "Array.from(document.querySelectorAll('#rows .op'), (badge) => badge.className)"
    )
    assert badges == [
        "op op-dropDatabase", "op op-other", "op op-invalidate", "op op-drop", "op op-rename",
    ]


def test_data_is_shown_as_text_never_as_markup(page: Browser, relay_collection: Any) -> None:
    key = unique("xss")
    payload = "<img src=x id=injected><b>bold</b>"
    relay_collection.insert_one({"_id": key, "bio": payload})

    wait_for_rows(page, key, 1)
    assert page.evaluate("document.querySelector('#rows img, #rows b, #injected')") is None
    assert json.dumps(payload) in rows(page, key)[0]["cells"][4]


def test_the_table_keeps_the_newest_200_rows_and_counts_all(
    stub_page: Browser, relay_stub: StubRelay
) -> None:
    page, relay_collection = stub_page, relay_stub.collection
    key = unique("many")
    for n in range(205):
        relay_collection.insert_one({"_id": f"{key}-{n:03}"})

    page.wait_for("document.getElementById('count').textContent === '205'", 15)
    table = rows(page, key)
    assert len(table) == 200
    assert table[0]["cells"][3] == json.dumps(f"{key}-204")
    assert table[-1]["cells"][3] == json.dumps(f"{key}-005")


def text(browser: Browser, element_id: str) -> str:
    return browser.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")


def shown(browser: Browser, element_id: str) -> bool:
    return browser.evaluate(f"!document.getElementById({json.dumps(element_id)}).hidden")


def test_pause_holds_rows_back_and_counts_them(stub_page: Browser, relay_stub: StubRelay) -> None:
    page, key = stub_page, unique("pause")
    relay_stub.collection.insert_one({"_id": f"{key}-0"})
    wait_for_rows(page, key, 1)
    page.evaluate("document.getElementById('pause').click()")
    assert page.evaluate("document.getElementById('pause').getAttribute('aria-pressed')") == "true"
    for n in range(1, 4):
        relay_stub.collection.insert_one({"_id": f"{key}-{n}"})
    relay_stub.broadcast({"type": "resync", "reason": "history_lost"})
    page.wait_for_console(lambda m: m.args == [{"type": "resync", "reason": "history_lost"}])

    assert len(rows(page, key)) == 1  # held back…
    assert text(page, "held") == "Paused · 3 events held back"  # …and counted
    assert page.evaluate(COUNT_JS) == 4
    assert page.evaluate("document.querySelectorAll('#rows tr.gap').length") == 0

    page.evaluate("document.getElementById('pause').click()")
    assert [r["cells"][3] for r in rows(page, key)] == [
        json.dumps(f"{key}-{n}") for n in (3, 2, 1, 0)]
    assert page.evaluate("document.querySelector('#rows tr').className") == "gap"  # in order
    assert not shown(page, "held")
    assert text(page, "pause") == "Pause"


def test_clear_empties_the_table_and_the_counts(stub_page: Browser, relay_stub: StubRelay) -> None:
    page, key = stub_page, unique("clear")
    relay_stub.collection.insert_one({"_id": key})
    relay_stub.collection.delete_one({"_id": key})
    wait_for_rows(page, key, 2)
    page.evaluate("document.getElementById('clear').click()")
    assert page.evaluate("document.querySelectorAll('#rows tr').length") == 0
    assert page.evaluate(COUNT_JS) == 0
    assert text(page, "op-counts") == ""
    assert shown(page, "empty")
    relay_stub.collection.insert_one({"_id": key + "-after"})
    wait_for_rows(page, key + "-after", 1)
    assert page.evaluate(COUNT_JS) == 1


def test_counts_per_operation_and_events_per_second(
    stub_page: Browser, relay_stub: StubRelay
) -> None:
    page, key = stub_page, unique("rate")
    for n in range(6):
        relay_stub.collection.insert_one({"_id": f"{key}-{n}"})
    for n in range(2):
        relay_stub.collection.update_one({"_id": f"{key}-{n}"}, {"$set": {"n": n}})
    relay_stub.collection.delete_one({"_id": f"{key}-0"})
    relay_stub.publish(relay_stub.event("createIndexes", ("shop", "orders")))
    wait_for_rows(page, key, 9)
    counts = page.evaluate("""Object.fromEntries(Array.from(
        document.querySelectorAll('#op-counts li'),
        (li) => [li.dataset.op, li.querySelector('.figure').textContent]))""")
    assert counts == {"insert": "6", "update": "2", "delete": "1", "createIndexes": "1"}
    # The figure covers whole seconds gone by: these ten events show within the next one.
    page.wait_for("Number(document.getElementById('rate').textContent) > 0", 3)
    assert 0 < float(text(page, "rate")) <= 10


def test_the_detail_view_shows_the_whole_event(page: Browser, relay_collection: Any) -> None:
    """Click or Enter opens the event as JSON, with copy buttons; Escape returns to the row. The
    key holds a NumberLong, so the id carries the token's type bits."""
    marker = unique("detail")
    key = {"name": marker, "n": Int64(2 ** 40 + 7)}
    document = {"_id": key, "nested": {"list": [1, {"deep": True}]}, "text": "x" * 300}
    relay_collection.insert_one(document)
    wait_for_rows(page, marker, 1)
    event = page.wait_for_console(
        lambda m: is_change(m, {"_id": {"name": marker, "n": 2 ** 40 + 7}})).args[0]
    event_id = token_of(event)
    assert "." in event_id
    row = f"document.querySelector('#rows tr[data-id={json.dumps(event_id)}]')"

    page.evaluate(f"{row}.click()")
    assert page.evaluate("document.getElementById('detail').open") is True
    assert json.loads(text(page, "detail-json")) == event  # everything, not the clipped cells
    assert text(page, "detail-json").startswith('{\n  "_id": {')  # formatted
    assert text(page, "detail-id") == event_id
    assert text(page, "detail-title") == f"insert · {relay_collection.full_name}"
    assert page.evaluate("document.getElementById('detail').contains(document.activeElement)")

    page.evaluate("""window.copied = [];
        navigator.clipboard.writeText = async (text) => { copied.push(text); };""")
    page.evaluate("document.getElementById('copy-id').click()")
    page.evaluate("document.getElementById('copy-event').click()")
    copied = page.wait_for("copied.length === 2 && copied")
    assert copied[0] == event_id and json.loads(copied[1]) == event
    assert text(page, "copied") == "Copied the event"
    page.evaluate("""navigator.clipboard.writeText = async () => {
        throw new DOMException('plain http', 'NotAllowedError'); };""")  # no clipboard here
    page.evaluate("document.getElementById('copy-id').click()")
    page.wait_for("document.getElementById('copied').textContent.startsWith('Selected')")
    assert page.evaluate("getSelection().toString()") == event_id

    page.press("Escape")
    page.wait_for(f"!document.getElementById('detail').open && document.activeElement === {row}")
    page.press("Enter")
    page.wait_for("document.getElementById('detail').open")
    page.evaluate("document.getElementById('detail-close').click()")
    page.evaluate(f"{row}.focus()")
    page.press(" ")
    page.wait_for("document.getElementById('detail').open")
    page.press("Escape")
    assert problems(page) == []


def test_controls_have_names_and_status_is_announced(stub_page: Browser) -> None:
    unnamed = stub_page.evaluate("""Array.from(
        document.querySelectorAll('input, button, [tabindex="0"]:not(tr)'),
        (control) => control.labels?.length || control.getAttribute('aria-label')
            || control.textContent.trim() ? null : control.outerHTML).filter(Boolean)""")
    assert unnamed == []
    roles = stub_page.evaluate("""['status', 'refusal', 'error', 'resync', 'copied'].map(
        (id) => document.getElementById(id).getAttribute('role'))""")
    assert roles == ["status", "alert", "alert", "alert", "status"]
    assert stub_page.evaluate("document.getElementById('status').getAttribute('aria-live')") == (
        "polite")


def test_at_390_px_events_are_cards_and_nothing_scrolls_sideways(
    phone: Browser, relay_stub: StubRelay
) -> None:
    page = live(phone, relay_stub.page_url + "?ns=shop.orders&filter=" + "%7B%7D")
    key = unique("narrow")
    relay_stub.collection.insert_one({"_id": key, "unbroken": "y" * 400,
                                      "nested": {"a": {"b": {"c": list(range(40))}}}})
    relay_stub.collection.update_one({"_id": key}, {"$set": {"some.long.path": "z" * 200}})
    relay_stub.broadcast({"type": "resync", "reason": "history_lost"})
    wait_for_rows(page, key, 2)
    page.wait_for("!document.getElementById('resync').hidden")
    layout = page.evaluate("""({
        width: innerWidth, scroll: document.documentElement.scrollWidth,
        row: getComputedStyle(document.querySelector('#rows tr.change')).display,
        head: document.querySelector('.changes thead').getBoundingClientRect().height,
        widest: Math.max(...Array.from(document.querySelectorAll('body *'),
                                       (el) => el.getBoundingClientRect().right)),
    })""")
    assert layout["width"] == 390 and layout["scroll"] <= 390, layout
    assert layout["widest"] <= 390, layout
    assert layout["row"] == "grid" and layout["head"] <= 1  # cards, column heads hidden
    # A card leaves out what an event does not have (a drop has no document key).
    relay_stub.collection.drop()
    page.wait_for("document.querySelector('#rows tr.change').dataset.op === 'drop'")
    assert page.evaluate("""getComputedStyle(
        document.querySelector('#rows tr.change .cell-key')).display""") == "none"


def test_light_and_dark(browser: Browser, relay_stub: StubRelay, dark: Browser) -> None:
    def background() -> list[float]:
        colour = browser.evaluate("getComputedStyle(document.body).backgroundColor")
        return [float(part) for part in colour[colour.index("(") + 1:-1].split(",")[:3]]

    live(browser, relay_stub.page_url)
    assert sum(background()) / 3 < 64
    browser.prefer_color_scheme("light")
    assert sum(background()) / 3 > 192


def test_the_scope_the_relay_watches_is_shown(stub_page: Browser) -> None:
    assert text(stub_page, "scope") == "the whole deployment"  # the stub watches everything
    assert not stub_page.evaluate("document.getElementById('demo')")


@pytest.mark.e2e
def test_a_scoped_relay_says_what_it_watches(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WATCH_COLLECTION="orders")
    relay.wait_ready()
    live(browser, relay.url + "/")
    assert text(browser, "scope") == f"{mongo.db}.orders"
    assert text(browser, "subscribed") == "everything watched"


def test_demo_data_is_labelled(browser: Browser, relay_stub: StubRelay) -> None:
    live(browser, relay_stub.base_url + "/demo")
    assert shown(browser, "demo")
    assert text(browser, "demo").startswith("Demo data, not your MongoDB.")


# -- the subscription form against the real relay -------------------------------------------


def fill(browser: Browser, *, ns: str = "", ops: tuple[str, ...] = (), filter: str = "") -> None:
    """Fill the subscription form and apply it, as a user would."""
    browser.evaluate(f"""(() => {{
        document.getElementById('sub-ns').value = {json.dumps(ns)};
        document.getElementById('sub-filter').value = {json.dumps(filter)};
        for (const box of document.querySelectorAll('#sub-ops input'))
            box.checked = {json.dumps(list(ops))}.includes(box.value);
        document.querySelector('#subscription button[type=submit]').click();
    }})()""")


@pytest.mark.e2e
def test_the_filter_bar_narrows_what_arrives(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    relay = RealRelay(mongo, relay_factory)
    page = live(browser, relay.page_url)
    before = len(page.websocket_urls)
    fill(page, ns=f"{mongo.db}.orders", ops=("insert",),
         filter='{"fullDocument.total": {"$gte": 10}}')
    [url] = page.wait_for_websockets(before + 1)[before:]
    page.wait_for("document.getElementById('status').dataset.state === 'live'")
    query = parse_qs(urlsplit(url).query)
    assert query == {"ns": [f"{mongo.db}.orders"], "ops": ["insert"],
                     "filter": ['{"fullDocument.total": {"$gte": 10}}']}
    assert parse_qs(urlsplit(page.evaluate("location.href")).query) == query  # a reload keeps it
    assert text(page, "subscribed") == (
        f'namespaces {mongo.db}.orders · operations insert · filter '
        '{"fullDocument.total": {"$gte": 10}}')

    key = unique("narrow")
    orders, carts = relay.collection, mongo.client[mongo.db]["carts"]
    carts.insert_one({"_id": f"{key}-cart", "total": 50})          # another collection
    orders.insert_one({"_id": f"{key}-small", "total": 5})          # below the filter
    orders.insert_one({"_id": f"{key}-big", "total": 20})           # the one that matches
    orders.update_one({"_id": f"{key}-big"}, {"$set": {"total": 30}})  # not an insert
    orders.insert_one({"_id": f"{key}-last", "total": 99})           # matches: ends the wait
    page.wait_for_console(lambda m: is_change(m, {"_id": f"{key}-last"}))
    assert [r["cells"][3] for r in rows(page, key)] == [
        json.dumps(f"{key}-last"), json.dumps(f"{key}-big")]
    assert problems(page) == []


# -- refusals, as a browser sees them ---------------------------------------------------------


def refused_requests(relay: Any, at_least: int, timeout: float = 10) -> int:
    """How many requests to /socket the relay answered 400, once there are ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        found = sum(" 400 GET /socket " in line for line in list(relay.lines))
        if found >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)  # the log has no change notification; poll it against a deadline


@pytest.mark.e2e
def test_a_refused_filter_shows_its_message_and_is_not_retried(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    relay.wait_ready()
    page = live(browser, relay.url + "/")
    opened = len(page.websocket_urls)
    fill(page, filter='{"fullDocument.total": {"$where": "sleep(100)"}}')

    page.wait_for("!document.getElementById('refusal').hidden")
    assert "$where" in text(page, "refusal") and "(400 unknown_operator)" in text(page, "refusal")
    assert page.evaluate("document.getElementById('status').dataset.state") == "stopped"
    assert text(page, "status-text") == "Refused by the relay"
    # One handshake and the one request that asked why; the client scheduled nothing after.
    assert refused_requests(relay, at_least=2) == 2
    assert len(page.websocket_urls) == opened + 1
    assert page.evaluate("document.getElementById('status').dataset.state") == "stopped"

    fill(page)  # a subscription the relay admits clears the message
    page.wait_for("document.getElementById('status').dataset.state === 'live'")
    assert not shown(page, "refusal")


@pytest.mark.e2e
def test_a_temporary_refusal_backs_off_until_admitted(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, MAX_CONNECTIONS_PER_IP=1)
    relay.wait_ready()
    held = websocket_by_hand(relay.port)
    try:
        browser.open(relay.url + "/")
        browser.wait_for("document.getElementById('status-detail').textContent"
                         ".includes('too_many_connections_from_address')", 10)
        browser.wait_for_websockets(2, 10)  # it tried again…
        assert text(browser, "status-text").startswith("Reconnecting")  # …and goes on trying
        assert not shown(browser, "refusal")
    finally:
        held.close()
    browser.wait_for("document.getElementById('status').dataset.state === 'live'", 20)


@pytest.mark.e2e
def test_a_401_with_a_url_function_retries_with_a_fresh_token(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    secret = "browser-secret-" + "x" * 32
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, AUTH_JWT_SECRET=secret)
    relay.wait_ready()
    expired = jwt.encode({"sub": "b", "exp": int(time.time()) - 60}, secret, algorithm="HS256")
    fresh = jwt.encode({"sub": "b", "exp": int(time.time()) + 300}, secret, algorithm="HS256")
    browser.open(relay.url + "/healthz")  # any page of the relay's origin will do
    browser.evaluate(f"""(async () => {{
        const {{ connect }} = await import('/static/changerelay.js');
        let token = {json.dumps(expired)};
        window.statuses = []; window.changes = [];
        connect(() => `/socket?access_token=${{token}}`, {{
            refreshable: true,
            onChange: (change) => changes.push(change),
            onStatus: (status) => {{
                statuses.push(status);
                if (status.refusal?.status === 401) token = {json.dumps(fresh)};  // "sign in"
            }},
        }});
    }})()""")
    browser.wait_for("statuses.some((s) => s.state === 'open')", 10)
    key = unique("fresh")
    mongo.client[mongo.db]["orders"].insert_one({"_id": key})
    browser.wait_for(f"changes.some((c) => c.documentKey._id === {json.dumps(key)})")
    refused = browser.evaluate("statuses.filter((s) => s.refusal).map((s) => s.refusal)")
    assert [r["error"] for r in refused] == ["token_expired"]
    # (a socket of the previous test's page may show up here as it closes)
    queries = [parse_qs(urlsplit(url).query) for url in browser.websocket_urls]
    assert [query["access_token"][0] for query in queries if "access_token" in query] == [
        expired, fresh]


# -- MongoDB's state, apart from the socket's --------------------------------------------------


def test_mongodb_state_is_shown_apart_from_the_socket(
    stub_page: Browser, relay_stub: StubRelay
) -> None:
    page = stub_page
    assert text(page, "source") == "MongoDB open"
    since = "2026-11-27T12:03:04.000Z"
    message = {"type": "source", "state": "unreachable", "since": since,
               "message": "MongoDB cannot be reached; the relay keeps retrying"}
    relay_stub.broadcast(message)
    page.wait_for("document.getElementById('status').dataset.source === 'unreachable'")
    clock = page.evaluate(f"new Date({json.dumps(since)}).toLocaleTimeString('en-GB')")
    assert " ".join(text(page, "status").split()) == (
        f"Connected to the relay · MongoDB unreachable since {clock} — retrying")
    assert page.evaluate("document.getElementById('source').title") == message["message"]
    page.wait_for_console(lambda m: m.args == [message])  # onControl passes it on…
    assert page.evaluate(COUNT_JS) == 0 and rows(page, "") == []  # …it is not an event

    relay_stub.broadcast({"type": "source", "state": "open", "message": "", "since": since})
    page.wait_for("document.getElementById('status-text').textContent === 'Live'")
    assert text(page, "source") == "MongoDB open"

    relay_stub.broadcast({"type": "source", "state": "not_replica_set", "since": since,
                          "message": "MongoDB is not a replica set"})
    page.wait_for("document.getElementById('source').textContent.includes('replica set')")
    assert text(page, "source") == f"MongoDB is not a replica set since {clock} — retrying"
    relay_stub.drop_sockets()  # a new connection starts from what the relay says then
    page.wait_for("document.getElementById('status-text').textContent === 'Live'", 10)


@pytest.mark.e2e
@pytest.mark.fault
def test_the_page_shows_mongodb_down_and_back(
    browser: Browser, relay_factory: Callable[..., Any]
) -> None:
    port = free_port()
    primary = TestPrimary(port=port).start()
    try:
        relay = relay_factory(MONGO_SRV=primary.uri + "&serverSelectionTimeoutMS=500")
        relay.wait_ready()
        page = live(browser, relay.url + "/")
        primary.stop()
        relay.wait_ready(source="unreachable", timeout=30)
        page.wait_for("document.getElementById('status').dataset.source === 'unreachable'", 3)
        assert "MongoDB unreachable since" in text(page, "source")
        assert page.evaluate("document.getElementById('status').dataset.state") == "live"
    finally:
        primary.stop()
    with TestPrimary(port=port):
        relay.wait_ready(timeout=30)
        page.wait_for("document.getElementById('status-text').textContent === 'Live'", 10)
        assert text(page, "source") == "MongoDB open"


# -- reconnecting ------------------------------------------------------------------------------


def test_reconnects_with_resume_after_and_loses_nothing(
    page: Browser, relay_collection: Any, drop_sockets: Callable[..., None]
) -> None:
    key = unique("gap")
    for n in range(3):
        relay_collection.insert_one({"_id": f"{key}-{n}"})
    wait_for_rows(page, key, 3)

    def write_while_disconnected() -> None:
        for n in range(3, 6):
            relay_collection.insert_one({"_id": f"{key}-{n}"})

    before = len(page.websocket_urls)
    drop_sockets(then=write_while_disconnected)

    wait_for_rows(page, key, 6, timeout=20)
    table = rows(page, key)
    assert [r["cells"][3] for r in table] == [json.dumps(f"{key}-{n}") for n in range(5, -1, -1)]
    assert len({r["id"] for r in table}) == 6
    page.wait_for_console(lambda m: is_change(m, {"_id": f"{key}-5"}))
    assert [m["documentKey"]["_id"] for m in logged(page) if "operationType" in m] == [
        f"{key}-{n}" for n in range(6)
    ]  # every change logged exactly once, in order

    first, *retries = page.websocket_urls[before - 1:]
    assert "resume_after" not in parse_qs(urlsplit(first).query)
    resumed = {parse_qs(urlsplit(url).query)["resume_after"][0] for url in retries}
    # The newest id the client held: the last event before the drop, or a position after it.
    ids = [m.get("_id", {}).get("_data") or m.get("resume_after") for m in logged(page)]
    held = ids[ids.index(table[3]["id"]) : ids.index(table[2]["id"])]
    assert len(resumed) == 1 and resumed <= set(held), (resumed, held)
    detail = page.evaluate("document.getElementById('status-detail').textContent")
    assert detail.startswith("last close: ")


@pytest.mark.e2e
def test_chromium_inflates_the_shared_deflate_frames(browser: Browser, mongo: Any,
                                                     relay_factory: Callable[..., Any]) -> None:
    """WS_COMPRESSION=true: Chromium negotiates permessage-deflate and reads every event."""
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WS_COMPRESSION="true")
    relay.wait_ready()
    live(browser, relay.url + "/")
    [handshake] = browser.websocket_handshakes
    assert "permessage-deflate" in handshake.get("sec-websocket-extensions", "")
    marker = unique("zip")
    documents = [{"_id": f"{marker}-{i}", "text": "compress me " * (50 + i)} for i in range(30)]
    mongo.client[mongo.db]["orders"].insert_many(documents)
    wait_for_rows(browser, marker, 30)
    browser.wait_for_console(lambda m: is_change(m, {"_id": documents[-1]["_id"]}))
    got = {m["documentKey"]["_id"]: m["fullDocument"] for m in logged(browser)
           if m.get("operationType") == "insert"}
    assert [got[d["_id"]] for d in documents] == documents
    assert problems(browser) == []


@pytest.mark.e2e
def test_a_relay_killed_mid_stream_and_restarted_leaves_no_gap(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    """SIGKILL sends no close frame and flushes nothing: the page only sees its connection die
    (1006), and all the successor learns of the page is the ``resume_after`` it reconnects with.
    Writes go on before, during and after the outage; every event must arrive exactly once."""
    relay = RealRelay(mongo, relay_factory)
    page = live(browser, relay.page_url)
    killed, restarted = threading.Event(), threading.Event()
    gates = {280: killed, 400: restarted}
    writer = GatedWriter(mongo.uri, mongo.db, total=480, batch=20, gates=gates)
    writer.start()
    try:
        page.wait_for(f"{COUNT_JS} >= 120", 30)  # the writer goes on, up to 280
        before = len(page.websocket_urls)
        relay.crash(then=lambda: (killed.set(), writer.wait_written(320, 30)))
        restarted.set()
        writer.join(60)
        assert not writer.is_alive() and writer.error is None, writer.error
    finally:
        writer.stop()

    expected = mongo.tokens()
    assert len(expected) == 480
    # The newest event, not a count, ends the wait: a gap then fails now, not at the deadline.
    page.wait_for_console(lambda m: is_event(m, expected[-1]), 30)
    assert [m["_id"]["_data"] for m in logged(page) if "operationType" in m] == expected
    assert page.evaluate(COUNT_JS) == len(expected)

    retries = page.websocket_urls[before:]
    resumed = {parse_qs(urlsplit(url).query).get("resume_after", [None])[0] for url in retries}
    held = {m.get("_id", {}).get("_data") or m.get("resume_after") for m in logged(page)}
    assert len(resumed) == 1 and resumed <= held, (resumed, retries)
    detail = page.evaluate("document.getElementById('status-detail').textContent")
    assert detail.startswith("last close: 1006 ")  # cut, not closed: it really was killed
    # While nothing listens, each socket fails and the client's probe (asking why) fails too.
    refused = ("failed: Error in connection establishment: net::ERR_CONNECTION_REFUSED",
               "Failed to load resource: net::ERR_CONNECTION_REFUSED")
    assert [text for text in problems(page) if not text.endswith(refused)] == []


def test_status_shows_reconnecting_and_the_last_close(
    page: Browser, drop_sockets: Callable[..., None]
) -> None:
    page.evaluate("""window.states = [];
        new MutationObserver(() => states.push(document.getElementById('status').dataset.state))
            .observe(document.getElementById('status'), {attributes: true})""")
    drop_sockets()

    page.wait_for("states.includes('reconnecting') && states.at(-1) === 'live'", 20)
    assert page.evaluate("document.getElementById('status-text').textContent") == "Live"
    detail = page.evaluate("document.getElementById('status-detail').textContent")
    assert detail.startswith("last close: 1001 ")


def test_the_close_reason_is_shown(stub_page: Browser, relay_stub: StubRelay) -> None:
    relay_stub.drop_sockets(code=1013, reason="client fell behind")
    stub_page.wait_for("document.getElementById('status-detail').textContent !== ''")
    detail = stub_page.evaluate("document.getElementById('status-detail').textContent")
    assert detail.startswith("last close: 1013 client fell behind · ")


def test_resync_shows_a_banner_and_keeps_the_resume_point(
    stub_page: Browser, relay_stub: StubRelay
) -> None:
    page = stub_page
    key = unique("resync")
    relay_stub.collection.insert_one({"_id": key})
    wait_for_rows(page, key, 1)
    [row] = rows(page, key)
    assert page.evaluate("document.getElementById('resync').hidden") is True

    relay_stub.broadcast({"type": "resync", "reason": "history_lost"})
    page.wait_for("!document.getElementById('resync').hidden")
    assert "history_lost" in page.evaluate("document.getElementById('resync-text').textContent")
    assert "history_lost" in page.evaluate("document.querySelector('#rows tr.gap').textContent")
    page.wait_for_console(lambda m: m.args == [{"type": "resync", "reason": "history_lost"}])

    opened = len(page.websocket_urls)  # the page may have retried its very first connect
    relay_stub.drop_sockets()
    urls = page.wait_for_websockets(opened + 1, 10)
    assert parse_qs(urlsplit(urls[-1]).query)["resume_after"] == [row["id"]]


def test_position_messages_move_the_resume_point(
    stub_page: Browser, relay_stub: StubRelay
) -> None:
    page = stub_page
    token = relay_stub.advance_position()
    page.wait_for_console(lambda m: m.args == [{"type": "position", "resume_after": token}])
    opened = len(page.websocket_urls)
    relay_stub.drop_sockets()
    urls = page.wait_for_websockets(opened + 1, 10)
    assert parse_qs(urlsplit(urls[-1]).query)["resume_after"] == [token]
    assert rows(page, "") == []  # a position is not a change


def test_server_errors_are_shown(stub_page: Browser, relay_stub: StubRelay) -> None:
    page = stub_page
    relay_stub.broadcast({"type": "error", "code": "bad_filter", "message": "unknown operator"})
    page.wait_for("!document.getElementById('error').hidden")
    text = page.evaluate("document.getElementById('error-text').textContent")
    assert text == "bad_filter: unknown operator"


def test_page_query_parameters_are_passed_to_the_socket(
    browser: Browser, relay_stub: StubRelay
) -> None:
    query = "ns=shop.orders&ops=insert%2Cupdate&filter=%7B%22total%22%3A%7B%22%24gt%22%3A5%7D%7D"
    browser.open(f"{relay_stub.page_url}?{query}")
    browser.wait_for("document.getElementById('status').dataset.state === 'live'", 10)
    assert urlsplit(browser.websocket_urls[0]).query == query
    # What the relay watches (the stub: everything) is not what this page subscribed to.
    assert browser.evaluate("document.getElementById('scope').textContent") == (
        "the whole deployment")
    assert browser.evaluate("document.getElementById('subscribed').textContent") == (
        'namespaces shop.orders · operations insert,update · filter {"total":{"$gt":5}}')
    form = browser.evaluate("""({ns: document.getElementById('sub-ns').value,
        filter: document.getElementById('sub-filter').value,
        ops: Array.from(document.querySelectorAll('#sub-ops input:checked'), (b) => b.value)})""")
    assert form == {"ns": "shop.orders", "filter": '{"total":{"$gt":5}}',
                    "ops": ["insert", "update"]}


# -- the client library on its own: a fake WebSocket and fake timers make backoff observable --

CLIENT_HARNESS = """(async () => {
    const client = await import('/static/changerelay.js');
    const sockets = [], delays = [], timers = [], statuses = [], controls = [], probes = [];
    class FakeSocket {
        constructor(url) { this.url = url; sockets.push(this); }
        close(code, reason) { this.onclose({code, reason, wasClean: true}); }
    }
    const tick = ((later) => () => new Promise((resolve) => later(resolve, 1)))(setTimeout);
    globalThis.WebSocket = FakeSocket;
    globalThis.setTimeout = (fn, ms) => { delays.push(ms); timers.push(fn); return timers.length; };
    globalThis.clearTimeout = (id) => { timers[id - 1] = null; };
    Math.random = () => 0.999;
    // The probe: fetch() of a failed socket's URL; by default the relay would admit it.
    let answer = () => new Response(null, {status: 204});
    globalThis.fetch = async (url) => { probes.push(String(url)); return answer(); };
    const refuse = (status, body, type = 'application/json') => {
        answer = () => new Response(typeof body === 'string' ? body : JSON.stringify(body),
                                    {status, headers: {'Content-Type': type}});
    };
    const connect = (url, options = {}) => client.connect(url, {...options, onStatus(status) {
        statuses.push(status);
        options.onStatus?.(status);
    }});
    const until = async (predicate) => {  // at most ~1 s of page turns
        for (let turn = 0; turn < 500 && !predicate(); turn++) await tick();
        if (!predicate()) throw new Error(`never true: ${predicate}`);
    };
    const closings = () => statuses.filter((status) => status.state === 'closed');
    // A socket ends (1006 before it opened: its handshake failed); wait for the client's verdict.
    const fail = async (code = 1006, reason = '') => {
        const seen = closings().length;
        sockets.at(-1).onclose({code, reason, wasClean: false});
        await until(() => closings().length > seen);
    };
    const retry = () => timers.at(-1)();
    const send = (message) => sockets.at(-1).onmessage({data: JSON.stringify(message)});
    const last = () => statuses.at(-1);
    %s
})()"""


def run_client(browser: Browser, relay_stub: StubRelay, body: str) -> Any:
    browser.open(f"{relay_stub.base_url}/blank")
    return browser.evaluate(CLIENT_HARNESS % body)


def test_client_backs_off_exponentially_with_a_cap(browser: Browser, relay_stub: StubRelay) -> None:
    delays = run_client(browser, relay_stub, """
        connect('/socket');
        for (let n = 0; n < 9; n++) { await fail(); retry(); }
        return delays.map(Math.round);""")
    assert delays == [500, 999, 1998, 3996, 7992, 15984, 29970, 29970, 29970]


def test_client_resets_backoff_after_a_stable_connection(
    browser: Browser, relay_stub: StubRelay
) -> None:
    delays = run_client(browser, relay_stub, """
        connect('/socket', {stableAfter: 0});
        await fail(); retry(); await fail(); retry();   // two failures: the backoff grew
        sockets.at(-1).onopen(); await fail();          // open long enough (0 ms): start over
        return delays.map(Math.round);""")
    assert delays == [500, 999, 500]


def test_client_resumes_after_the_newest_id_and_keeps_other_parameters(
    browser: Browser, relay_stub: StubRelay
) -> None:
    urls = run_client(browser, relay_stub, """
        connect('/socket?ns=a.b&filter=%7B%7D&resume_after=OLD', {resumeAfter: 'OLD'});
        sockets[0].onopen();
        send({operationType: 'insert', _id: {_data: '82AA'}});
        send({type: 'position', resume_after: '82BB'});
        await fail(); retry();
        send({type: 'resync', reason: 'history_lost'});          // keeps the id
        await fail(); retry();
        return sockets.map((s) => s.url);""")
    host = urlsplit(relay_stub.base_url).netloc
    assert urls == [
        f"ws://{host}/socket?ns=a.b&filter=%7B%7D&resume_after=OLD",
        f"ws://{host}/socket?ns=a.b&filter=%7B%7D&resume_after=82BB",
        f"ws://{host}/socket?ns=a.b&filter=%7B%7D&resume_after=82BB",
    ]


def test_client_ids_carry_the_type_bits_in_base64url(
    browser: Browser, relay_stub: StubRelay
) -> None:
    """MongoDB writes _typeBits for a NumberLong or double key (relaxed Extended JSON:
    {$binary: {base64, subType}}); the id is _data, '.', the bits in base64url without padding."""
    typed = {"_data": "82AA", "_typeBits": {"$binary": {"base64": "+/8=", "subType": "00"}}}
    outcome = run_client(browser, relay_stub, f"""
        connect('/socket');
        sockets[0].onopen();
        send({{operationType: 'insert', _id: {json.dumps(typed)}}});
        await fail(); retry();
        send({{operationType: 'insert', _id: {{_data: '82AB'}}}});
        await fail(); retry();
        return {{urls: sockets.map((s) => new URL(s.url).search),
                 ids: [client.eventId({{_id: {json.dumps(typed)}}}),
                       client.eventId({{_id: {{_data: '82AC'}}}}), client.eventId({{}})]}};""")
    assert outcome == {"urls": ["", "?resume_after=82AA.-_8", "?resume_after=82AB"],
                       "ids": ["82AA.-_8", "82AC", None]}


def test_client_close_stops_reconnecting(browser: Browser, relay_stub: StubRelay) -> None:
    outcome = run_client(browser, relay_stub, """
        const relay = connect('https://example.test/socket');
        sockets[0].onopen();
        relay.close();
        return {urls: sockets.map((s) => s.url), timers: timers.length,
                states: statuses.map((s) => [s.state, s.code ?? null, s.retryIn ?? null])};""")
    assert outcome == {
        "urls": ["wss://example.test/socket"],
        "timers": 0,
        "states": [["connecting", None, None], ["open", None, None], ["closed", 1000, None]],
    }


PERMANENT_REFUSALS = [
    (400, {"error": "invalid_json", "message": "filter is not valid JSON"}),
    (401, {"error": "token_expired", "message": "the token has expired; get a fresh one"}),
    (403, {"error": "origin_not_allowed", "message": "origin 'x' may not connect"}),
    (413, {"error": "body_not_allowed", "message": "no route of this relay reads a body"}),
    (414, {"error": "query_too_large", "message": "the query string is over 32 KiB"}),
    (421, {"error": "host_not_allowed", "message": "this relay does not answer to Host x"}),
    (431, {"error": "headers_too_large", "message": "headers too large"}),
    (418, {"error": "teapot", "message": "a 4xx the table does not list is permanent too"}),
]


@pytest.mark.parametrize(("status", "body"), PERMANENT_REFUSALS, ids=[str(s) for s, _ in
                                                                     PERMANENT_REFUSALS])
def test_client_asks_why_a_handshake_failed_and_stops_on_a_permanent_refusal(
    browser: Browser, relay_stub: StubRelay, status: int, body: dict[str, str]
) -> None:
    outcome = run_client(browser, relay_stub, f"""
        connect('/socket?ns=a.b&filter=%7B');
        refuse({status}, {json.dumps(body)});
        await fail();
        return {{probes, sockets: sockets.length, timers: timers.length,
                 last: [last().state, last().code, last().retryIn, last().refusal]}};""")
    host = urlsplit(relay_stub.base_url).netloc
    assert outcome == {
        "probes": [f"http://{host}/socket?ns=a.b&filter=%7B"],  # the socket's URL, over HTTP
        "sockets": 1,
        "timers": 0,  # no retry is scheduled
        "last": ["closed", 1006, None, {"status": status, **body}],
    }


def test_client_reports_a_refusal_that_is_not_json_by_its_status(
    browser: Browser, relay_stub: StubRelay
) -> None:
    last = run_client(browser, relay_stub, """
        connect('/sockets');
        refuse(404, '<html><title>404: Not Found</title></html>', 'text/html');
        await fail();
        return [last().retryIn, last().refusal];""")
    assert last == [None, {"status": 404, "error": None, "message": "HTTP 404"}]


@pytest.mark.parametrize("status", [408, 429, 503])
def test_client_backs_off_on_a_temporary_refusal(
    browser: Browser, relay_stub: StubRelay, status: int
) -> None:
    outcome = run_client(browser, relay_stub, f"""
        connect('/socket');
        refuse({status}, {{error: 'too_many_connections', message: 'retry later'}});
        await fail(); retry(); await fail(); retry();
        return {{sockets: sockets.length, probes: probes.length, delays: delays.map(Math.round),
                 refusal: closings().at(-1).refusal}};""")
    assert outcome == {
        "sockets": 3, "probes": 2, "delays": [500, 999],
        "refusal": {"status": status, "error": "too_many_connections", "message": "retry later"},
    }


def test_client_retries_a_401_only_with_a_refreshable_url(
    browser: Browser, relay_stub: StubRelay
) -> None:
    outcome = run_client(browser, relay_stub, """
        let token = 'stale';
        connect(() => `/socket?access_token=${token}`, {refreshable: true});
        refuse(401, {error: 'token_expired', message: 'the token has expired; get a fresh one'});
        await fail();
        const retryIn = last().retryIn;
        token = 'fresh';
        retry();
        let refused;
        try { client.connect('/socket?access_token=x', {refreshable: true}); }
        catch (error) { refused = error.message; }
        return {urls: sockets.map((s) => new URL(s.url).search), retryIn, refused};""")
    assert outcome == {
        "urls": ["?access_token=stale", "?access_token=fresh"],
        "retryIn": 499.5,
        "refused": "changerelay: refreshable needs a URL function that puts a fresh token in "
                   "each URL",
    }


def test_client_backs_off_when_the_probe_cannot_tell(
    browser: Browser, relay_stub: StubRelay
) -> None:
    """Admitted now (204), unreachable, another origin's unreadable answer, or a relay too old
    to probe (it calls a plain GET websocket_required): a connection problem, not a refusal."""
    outcome = run_client(browser, relay_stub, """
        connect('/socket');
        await fail(); retry();
        answer = () => { throw new TypeError('Failed to fetch'); };
        await fail(); retry();
        refuse(400, {error: 'websocket_required', message: '/socket speaks WebSocket'});
        await fail(); retry();
        return {sockets: sockets.length, probes: probes.length,
                refusals: statuses.filter((s) => s.refusal).length};""")
    assert outcome == {"sockets": 4, "probes": 3, "refusals": 0}


CLOSES_AFTER_OPEN = [
    # (code, reason, refreshable, retried)
    (1001, "server shutting down", False, True),
    (1013, "slow consumer", False, True),
    (1002, "client frames must be masked", False, True),  # a reason that names the fault
    (1006, "", False, True),  # cut after it opened: nothing to ask
    (4321, "from a newer relay", False, True),  # unknown codes reconnect, as before
    (1008, "token expired", False, False),
    (1008, "token expired", True, True),
]


@pytest.mark.parametrize(("code", "reason", "refreshable", "retried"), CLOSES_AFTER_OPEN)
def test_client_follows_the_table_after_a_close(
    browser: Browser, relay_stub: StubRelay, code: int, reason: str, refreshable: bool,
    retried: bool
) -> None:
    outcome = run_client(browser, relay_stub, f"""
        connect(() => '/socket', {{refreshable: {json.dumps(refreshable)}}});
        sockets[0].onopen();
        await fail({code}, {json.dumps(reason)});
        return {{probes: probes.length, timers: timers.length, retryIn: last().retryIn}};""")
    assert outcome["probes"] == 0
    assert outcome["timers"] == int(retried)
    assert (outcome["retryIn"] is not None) == retried


def test_client_closed_during_a_probe_stays_closed(
    browser: Browser, relay_stub: StubRelay
) -> None:
    outcome = run_client(browser, relay_stub, """
        let reply, response;
        answer = () => new Promise((resolve) => { reply = resolve; });
        const relay = connect('/socket');
        sockets[0].onclose({code: 1006, reason: '', wasClean: false});
        await until(() => reply);
        relay.close();
        response = new Response(JSON.stringify({error: 'too_many_connections', message: 'x'}),
                                {status: 503});
        reply(response);
        await until(() => response.bodyUsed);
        await tick();
        return {timers: timers.length, states: statuses.map((s) => [s.state, s.retryIn])};""")
    assert outcome == {"timers": 0, "states": [["connecting", None], ["closed", None]]}


def test_client_tells_mongodb_state_apart_from_the_socket(
    browser: Browser, relay_stub: StubRelay
) -> None:
    told = run_client(browser, relay_stub, """
        const sources = [];
        connect('/socket', {onSource: (s) => sources.push(
            [s.state, s.message, s.since && s.since.toISOString()])});
        sockets[0].onopen();   // open, and nothing said: nothing to tell
        send({type: 'source', state: 'unreachable', message: 'The relay cannot reach MongoDB.',
              since: '2026-12-01T06:03:04+00:00'});
        send({type: 'source', state: 'open', message: 'MongoDB is connected.',
              since: '2026-12-01T06:04:00+00:00'});
        send({type: 'source', state: 'auth_failed', message: 'No.', since: 'not a time'});
        await fail(1001, 'server shutting down'); retry();
        sockets.at(-1).onopen();   // a new connection, not told otherwise: open again
        sockets.at(-1).onopen();   // (told once)
        return {sources, states: statuses.map((s) => s.state)};""")
    assert told["sources"] == [
        ["unreachable", "The relay cannot reach MongoDB.", "2026-12-01T06:03:04.000Z"],
        ["open", "MongoDB is connected.", "2026-12-01T06:04:00.000Z"],
        ["auth_failed", "No.", None],
        ["open", "", None],
    ]
    assert told["states"] == ["connecting", "open", "closed", "connecting", "open", "open"]


def test_client_reports_frames_that_are_not_json_objects(
    browser: Browser, relay_stub: StubRelay
) -> None:
    controls = run_client(browser, relay_stub, """
        const changes = [];
        connect('/socket', {onControl: (m) => controls.push(m), onChange: (c) => changes.push(c)});
        sockets[0].onmessage({data: 'not json'});
        sockets[0].onmessage({data: '[1, 2]'});
        return controls.map((m) => [m.type, m.code]).concat([changes.length]);""")
    assert controls == [["error", "invalid_message"], ["error", "invalid_message"], 0]


def test_client_rejects_urls_it_can_never_connect_to(
    browser: Browser, relay_stub: StubRelay
) -> None:
    message = run_client(browser, relay_stub, """
        try { connect('ftp://example.test/socket'); } catch (error) { return error.message; }""")
    assert message == (
        'changerelay: "ftp://example.test/socket" is a ftp: URL; use ws:, wss:, http: or https:'
    )


# -- live queries: the client's map, then the page's live table ----------------------------------


@pytest.fixture
def live_stub(relay_stub: StubRelay) -> Iterator[StubRelay]:
    """The stub with an empty snapshot and no cut, put back so after the test."""
    relay_stub.snapshot, relay_stub.cut_snapshot_after = [], None
    try:
        yield relay_stub
    finally:
        relay_stub.snapshot, relay_stub.cut_snapshot_after = [], None


def relaxed(document: Any) -> Any:
    """A document as the page receives it: relaxed Extended JSON, parsed."""
    return json.loads(json_util.dumps(document, json_options=json_util.RELAXED_JSON_OPTIONS))


def id_key(value: Any) -> str:
    """The client's ``idKey`` of an ``_id``, as JavaScript's JSON.stringify writes it."""
    return json.dumps(relaxed(value), separators=(",", ":"), ensure_ascii=False)


LIVE_QUERY_JS = """(async () => {
    const client = await import('/static/changerelay.js');
    window.client = client;
    window.calls = []; window.statuses = [];
    window.query = client.liveQuery(%s, {
        onSnapshot: (documents) => calls.push(['snapshot', [...documents.values()]]),
        onChange: ({key, document, message}) =>
            calls.push(['change', key, document ?? null, message.operationType ?? message.type]),
        onReady: (ready) => calls.push(['ready', ready.snapshot ?? null]),
        onControl: (message) => {
            if (message.type === 'error') calls.push(['error', message.code]);
        },
        onStatus: (status) => statuses.push([status.state, status.retryIn ?? null]),
        baseDelay: 1,
    });
    window.held = query.documents;
})()"""


def start_live_query(browser: Browser, relay: StubRelay, url: str = "/socket?ns=shop.orders",
                     readies: int = 1) -> None:
    """A live query on the blank page, once its ``readies``-th ``ready`` has come."""
    browser.open(f"{relay.base_url}/blank")
    browser.evaluate(LIVE_QUERY_JS % json.dumps(url))
    wait_ready(browser, readies)


def wait_ready(browser: Browser, readies: int, timeout: float = 10) -> None:
    browser.wait_for(f"calls.filter((c) => c[0] === 'ready').length >= {readies}", timeout)


def held(browser: Browser) -> list[Any]:
    """The live query's documents, in the map's order."""
    return browser.evaluate("[...query.documents.values()]")


def calls_of(browser: Browser, kind: str) -> list[Any]:
    return [call[1:] for call in browser.evaluate("calls") if call[0] == kind]


def test_live_query_holds_the_snapshot_then_applies_every_change(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("live")
    a, b, c, d, e = (f"{key}-{n}" for n in "abcde")
    live_stub.snapshot = [
        {"_id": a, "n": 1, "tags": ["x", "y"], "nested": {"deep": {"v": 1}}},
        {"_id": b, "n": 2},
        {"_id": c, "n": 3},
    ]
    start_live_query(browser, live_stub)
    assert browser.evaluate("calls") == [
        ["snapshot", relaxed(live_stub.snapshot)], ["ready", 3]]  # one whole snapshot, then ready
    socket_url = urlsplit(browser.websocket_urls[-1])
    assert parse_qs(socket_url.query) == {"snapshot": ["1"], "ns": ["shop.orders"]}

    orders = live_stub.collection
    orders.update_one({"_id": a}, {"$set": {"nested.deep.v": 10, "tags.1": "z", "nested.w": True},
                                   "$unset": {"n": ""}})
    orders.replace_one({"_id": b}, {"name": "bee"})
    orders.delete_one({"_id": c})
    orders.insert_one({"_id": d, "n": 4})
    live_stub.broadcast({"type": "leave", "ns": "shop.orders", "documentKey": {"_id": d}})
    # An update with a post-image: the image wins over the description.
    live_stub.publish(live_stub.event(
        "update", ("shop", "orders"), documentKey={"_id": b},
        updateDescription={"updatedFields": {"name": "wrong"}, "removedFields": [],
                           "truncatedArrays": []},
        fullDocument={"_id": b, "name": "bee", "n": 22}))
    orders.insert_one({"_id": e, "n": 5})
    browser.wait_for(f"calls.some((c) => c[1] === {json.dumps(id_key(e))})")

    after_a = {"_id": a, "tags": ["x", "z"], "nested": {"deep": {"v": 10}, "w": True}}
    assert held(browser) == [after_a, {"_id": b, "name": "bee", "n": 22}, {"_id": e, "n": 5}]
    assert calls_of(browser, "change") == [
        [id_key(a), after_a, "update"],
        [id_key(b), {"_id": b, "name": "bee"}, "replace"],
        [id_key(c), None, "delete"],
        [id_key(d), {"_id": d, "n": 4}, "insert"],
        [id_key(d), None, "leave"],
        [id_key(b), {"_id": b, "name": "bee", "n": 22}, "update"],
        [id_key(e), {"_id": e, "n": 5}, "insert"],
    ]
    assert len(calls_of(browser, "snapshot")) == 1
    assert problems(browser) == []


def test_live_query_keeps_ids_of_different_bson_types_apart(
    browser: Browser, live_stub: StubRelay
) -> None:
    """An ObjectId and the string of its hex digits, 5 and "5", a document and a date are six
    documents; NumberLong(7) and 7.0 are one, as in MongoDB's _id index."""
    oid = ObjectId()
    when = datetime.datetime(2026, 12, 1, 10, 0, tzinfo=datetime.UTC)
    ids: list[Any] = [oid, str(oid), 5, "5", Int64(7), {"a": 1, "b": [2]}, when, 2.5]
    live_stub.snapshot = [{"_id": value, "v": n} for n, value in enumerate(ids)]
    start_live_query(browser, live_stub)
    assert len(held(browser)) == len(ids)
    keys = browser.evaluate("[...query.documents.keys()]")
    assert keys == [id_key(value) for value in ids] and len(set(keys)) == len(ids)

    orders = live_stub.collection
    orders.update_one({"_id": 5}, {"$set": {"v": "int five"}})
    orders.update_one({"_id": oid}, {"$set": {"v": "the ObjectId"}})
    orders.replace_one({"_id": 7.0}, {"v": "seven"})  # the NumberLong's slot
    orders.delete_one({"_id": {"a": 1, "b": [2]}})
    orders.update_one({"_id": when}, {"$set": {"v": "the date"}})
    browser.wait_for("calls.filter((c) => c[0] === 'change').length === 5")

    got = {json.dumps(document["_id"], sort_keys=True): document["v"]
           for document in held(browser)}
    assert got == {
        json.dumps({"$oid": str(oid)}): "the ObjectId",
        json.dumps(str(oid)): 1,
        "5": "int five",
        json.dumps("5"): 3,
        "7": "seven",  # the replace's _id (7.0, a number to JavaScript) in the NumberLong's place
        json.dumps({"$date": "2026-12-01T10:00:00Z"}): "the date",
        "2.5": 7,
    }


UPDATE_CASES = [
    # (document, updateDescription, the document after it), as MongoDB applies $set/$unset and
    # pipeline updates: paths are dotted, a numeric part indexes an array or names an object's
    # field, $set creates missing objects and pads arrays with null, $unset of an array element
    # leaves null in its slot (https://www.mongodb.com/docs/manual/reference/operator/update/unset/).
    ({"a": {"b": 1}}, {"updatedFields": {"a.c.d": 2}}, {"a": {"b": 1, "c": {"d": 2}}}),
    ({"arr": [1, 2, 3]}, {"updatedFields": {"arr.1": 9}}, {"arr": [1, 9, 3]}),
    ({"arr": [1]}, {"updatedFields": {"arr.3": 4}}, {"arr": [1, None, None, 4]}),
    ({"items": [{"q": 1}, {"q": 2}]}, {"updatedFields": {"items.1.q": 5, "items.0.r": 0}},
     {"items": [{"q": 1, "r": 0}, {"q": 5}]}),
    ({"m": {"0": "x"}}, {"updatedFields": {"m.0": "y"}}, {"m": {"0": "y"}}),
    ({}, {"updatedFields": {"x.0": 1}}, {"x": {"0": 1}}),
    ({"a": {"b": 1, "c": 2}, "d": 3}, {"removedFields": ["a.b", "d", "missing.path"]},
     {"a": {"c": 2}}),
    ({"arr": [1, 2, 3]}, {"removedFields": ["arr.1"]}, {"arr": [1, None, 3]}),
    ({"arr": [1, 2, 3, 4, 5]},
     {"truncatedArrays": [{"field": "arr", "newSize": 2}], "updatedFields": {"arr.1": 7}},
     {"arr": [1, 7]}),
    ({"o": {"arr": [[1, 2, 3]]}}, {"truncatedArrays": [{"field": "o.arr.0", "newSize": 1}]},
     {"o": {"arr": [[1]]}}),
    # A field whose name holds a dot, and a numeric field name inside an array's element:
    # MongoDB 6.1+ says how to read such a path in disambiguatedPaths (a number is an index).
    ({"a.b": 1, "a": {"b": 2}},
     {"updatedFields": {"a.b": 3}, "disambiguatedPaths": {"a.b": ["a.b"]}},
     {"a.b": 3, "a": {"b": 2}}),
    ({"arr": [{"0": "x"}]},
     {"updatedFields": {"arr.0.0": "y"}, "disambiguatedPaths": {"arr.0.0": ["arr", 0, "0"]}},
     {"arr": [{"0": "y"}]}),
    ({"a": {"b": 1}}, {"updatedFields": {"a": {"whole": True}}}, {"a": {"whole": True}}),
]


def test_live_query_applies_update_descriptions(browser: Browser, relay_stub: StubRelay) -> None:
    browser.open(f"{relay_stub.base_url}/blank")
    outcome = browser.evaluate(f"""(async () => {{
        const {{ applyUpdate }} = await import('/static/changerelay.js');
        return {json.dumps([[doc, update] for doc, update, _ in UPDATE_CASES])}.map(
            ([document, update]) => {{
                const before = JSON.stringify(document);
                const after = applyUpdate(document, update);
                return [after, JSON.stringify(document) === before];
            }});
    }})()""")
    assert [after for after, _ in outcome] == [expected for _, _, expected in UPDATE_CASES]
    assert all(untouched for _, untouched in outcome)  # a new document; the input stays

    # Documents share what an update did not touch: a later update leaves earlier ones alone.
    chain = browser.evaluate("""(async () => {
        const { applyUpdate } = await import('/static/changerelay.js');
        const v0 = {a: {b: [{c: 1}, {c: 2}], d: {e: 1}}, f: [1, 2]};
        const v1 = applyUpdate(v0, {updatedFields: {'a.b.1.c': 20, 'g': {h: [1]}}});
        const v2 = applyUpdate(v1, {updatedFields: {'a.d.e': 2, 'g.h.0': 9, 'f.0': 0},
                                    removedFields: ['a.b.0.c']});
        const v3 = applyUpdate(v2, {truncatedArrays: [{field: 'a.b', newSize: 0}]});
        return [v0, v1, v2, v3];
    })()""")
    assert chain == [
        {"a": {"b": [{"c": 1}, {"c": 2}], "d": {"e": 1}}, "f": [1, 2]},
        {"a": {"b": [{"c": 1}, {"c": 20}], "d": {"e": 1}}, "f": [1, 2], "g": {"h": [1]}},
        {"a": {"b": [{}, {"c": 20}], "d": {"e": 2}}, "f": [0, 2], "g": {"h": [9]}},
        {"a": {"b": [], "d": {"e": 2}}, "f": [0, 2], "g": {"h": [9]}},
    ]


def socket_queries(browser: Browser, since: int) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(url).query) for url in browser.websocket_urls[since:]]


def test_live_query_reconnects_and_takes_the_relays_reset_and_fresh_snapshot(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("reset")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n} for n in range(3)]
    start_live_query(browser, live_stub)
    browser.evaluate("window.first = query.documents")
    live_stub.collection.insert_one({"_id": f"{key}-3", "n": 3})
    browser.wait_for("query.documents.size === 4")
    resume_point = browser.evaluate("query.lastId")

    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n * 10} for n in (1, 3, 4)]
    opened = len(browser.websocket_urls)
    live_stub.drop_sockets()  # 1001: it resumes, and the stub starts it over with a reset
    wait_ready(browser, 2)

    [query] = socket_queries(browser, opened)
    assert query["snapshot"] == ["1"] and query["resume_after"] == [resume_point]
    assert held(browser) == relaxed(live_stub.snapshot)
    assert [len(documents) for [documents] in calls_of(browser, "snapshot")] == [3, 3]
    assert browser.evaluate("query.documents === first")  # one Map for the query's life


def test_live_query_resnapshots_on_resync_and_converges(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("resync")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n} for n in range(4)]
    start_live_query(browser, live_stub)
    live_stub.collection.update_one({"_id": f"{key}-0"}, {"$set": {"n": 100}})
    browser.wait_for("query.documents.values().next().value.n === 100")

    # Changes were lost: the truth moved on without the client (one deleted, one added, one
    # changed), and all it is told is the resync.
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": -n} for n in (0, 2, 3, 5)]
    opened = len(browser.websocket_urls)
    live_stub.broadcast({"type": "resync", "reason": "history_lost"})
    wait_ready(browser, 2)

    [query] = socket_queries(browser, opened)
    assert query == {"snapshot": ["1"], "ns": ["shop.orders"]}  # no resume point: a fresh one
    assert held(browser) == relaxed(live_stub.snapshot)
    live_stub.collection.insert_one({"_id": f"{key}-6", "n": 6})  # and it goes on from there
    browser.wait_for("query.documents.size === 5")
    assert held(browser)[-1] == {"_id": f"{key}-6", "n": 6}


def test_live_query_dropped_mid_snapshot_starts_over(
    browser: Browser, live_stub: StubRelay
) -> None:
    """The map never shows a half snapshot, and the connection after one that was cut asks for
    a fresh snapshot: its resume point died with the reset."""
    key = unique("cut")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n} for n in range(3)]
    start_live_query(browser, live_stub)
    live_stub.collection.insert_one({"_id": f"{key}-3", "n": 3})
    browser.wait_for("query.documents.size === 4")

    live_stub.snapshot = [{"_id": f"{key}-{n}", "v": n} for n in range(6)]
    live_stub.cut_snapshot_after = 3  # the next snapshot: reset, three documents, then a close
    opened = len(browser.websocket_urls)
    live_stub.drop_sockets()
    wait_ready(browser, 2)

    resumed, fresh = socket_queries(browser, opened)
    assert "resume_after" in resumed  # (the stub answers it with a reset, then cuts)
    assert fresh == {"snapshot": ["1"], "ns": ["shop.orders"]}
    assert held(browser) == relaxed(live_stub.snapshot)
    assert [len(documents) for [documents] in calls_of(browser, "snapshot")] == [3, 6]


def test_live_query_cut_on_its_first_snapshot_shows_only_the_whole_one(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("first-cut")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n} for n in range(5)]
    live_stub.cut_snapshot_after = 2
    start_live_query(browser, live_stub)
    assert socket_queries(browser, 0) == [{"snapshot": ["1"], "ns": ["shop.orders"]}] * 2
    assert calls_of(browser, "snapshot") == [[relaxed(live_stub.snapshot)]]  # never the half
    assert calls_of(browser, "ready") == [[5]]


def test_live_query_empties_when_its_collection_is_dropped_or_renamed(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("drop")
    live_stub.snapshot = [{"_id": f"{key}-{n}"} for n in range(3)]
    start_live_query(browser, live_stub)
    live_stub.collection.drop()
    browser.wait_for("query.documents.size === 0")
    live_stub.collection.insert_one({"_id": f"{key}-again"})
    live_stub.collection.rename("archive")
    browser.wait_for("calls.filter((c) => c[0] === 'snapshot').length === 3")
    assert [len(documents) for [documents] in calls_of(browser, "snapshot")] == [3, 0, 0]
    assert held(browser) == []


def test_live_query_takes_a_fresh_token_per_attempt(
    browser: Browser, live_stub: StubRelay
) -> None:
    """A URL function (with refreshable) works as with connect: snapshot=1 goes into each URL
    it returns, and each attempt asks it again."""
    live_stub.snapshot = [{"_id": unique("token")}]
    browser.open(f"{live_stub.base_url}/blank")
    browser.evaluate("window.token = 'first'")
    browser.evaluate(LIVE_QUERY_JS.replace(
        "client.liveQuery(%s, {", "client.liveQuery(%s, {refreshable: true,") % (
        "() => `/socket?ns=shop.orders&access_token=${window.token}`"))
    wait_ready(browser, 1)
    browser.evaluate("window.token = 'second'")
    live_stub.drop_sockets()
    wait_ready(browser, 2)
    first, second = socket_queries(browser, 0)
    assert first["access_token"] == ["first"] and second["access_token"] == ["second"]
    assert first["snapshot"] == second["snapshot"] == ["1"]
    try:
        browser.evaluate("client.liveQuery('/socket?ns=a.b', {refreshable: true})")
    except JavaScriptError as error:
        assert "refreshable needs a URL function" in str(error)
    else:
        raise AssertionError("a refreshable string URL was accepted")


def test_live_query_snapshots_first_whatever_resume_after_it_is_given(
    browser: Browser, live_stub: StubRelay
) -> None:
    """Its map starts empty: resuming would apply changes to documents it never received."""
    live_stub.snapshot = [{"_id": unique("resume")}]
    browser.open(f"{live_stub.base_url}/blank")
    browser.evaluate(LIVE_QUERY_JS.replace(
        "client.liveQuery(%s, {", "client.liveQuery(%s, {resumeAfter: '8263AA',") % (
        json.dumps("/socket?ns=shop.orders")))
    wait_ready(browser, 1)
    assert socket_queries(browser, 0) == [{"snapshot": ["1"], "ns": ["shop.orders"]}]
    assert held(browser) == relaxed(live_stub.snapshot)


def test_live_query_resnapshots_on_an_update_it_cannot_apply(
    browser: Browser, live_stub: StubRelay
) -> None:
    """An update of a document it does not hold, without a post-image: the client cannot build
    the document, so it says so and starts over rather than lose it."""
    key = unique("gap")
    live_stub.snapshot = [{"_id": f"{key}-0", "n": 0}]
    start_live_query(browser, live_stub)
    live_stub.snapshot = [{"_id": f"{key}-0", "n": 0}, {"_id": f"{key}-1", "n": 1, "m": 2}]
    opened = len(browser.websocket_urls)
    live_stub.collection.update_one({"_id": f"{key}-1"}, {"$set": {"m": 2}})
    wait_ready(browser, 2)
    assert socket_queries(browser, opened) == [{"snapshot": ["1"], "ns": ["shop.orders"]}]
    assert ["live_query_gap"] in calls_of(browser, "error")
    assert held(browser) == relaxed(live_stub.snapshot)


def test_live_query_stops_on_snapshot_too_large(browser: Browser, live_stub: StubRelay) -> None:
    """Past the relay's limit, found out mid-read: retrying would read the same set again."""
    key = unique("large")
    live_stub.snapshot = [{"_id": key, "n": 1}]
    start_live_query(browser, live_stub)
    opened = len(browser.websocket_urls)
    live_stub.broadcast({"type": "error", "code": "snapshot_too_large",
                         "message": "more than 10000 documents match; narrow the filter"})
    live_stub.drop_sockets(code=1011, reason="snapshot too large")
    browser.wait_for("statuses.at(-1)[0] === 'closed'")
    assert browser.evaluate("statuses.at(-1)") == ["closed", None]  # no retry follows
    assert len(browser.websocket_urls) == opened
    assert held(browser) == [{"_id": key, "n": 1}]  # what it had stays
    assert ["snapshot_too_large"] in calls_of(browser, "error")


def test_a_plain_connection_exposes_ready_and_resumes_from_it(
    browser: Browser, relay_stub: StubRelay
) -> None:
    browser.open(f"{relay_stub.base_url}/blank")
    browser.evaluate("""(async () => {
        const { connect } = await import('/static/changerelay.js');
        window.readies = []; window.controls = []; window.changes = [];
        window.relay = connect('/socket', {baseDelay: 1, onReady: (m) => readies.push(m),
            onControl: (m) => controls.push(m.type), onChange: (c) => changes.push(c)});
    })()""")
    browser.wait_for("readies.length === 1")
    [ready] = browser.evaluate("readies")
    assert set(ready) == {"type", "resume_after"} and "snapshot" not in ready
    assert browser.evaluate("relay.lastId") == ready["resume_after"]
    relay_stub.broadcast({"type": "from-a-newer-relay", "x": 1})  # unknown types: passed on
    opened = len(browser.websocket_urls)
    relay_stub.drop_sockets()
    browser.wait_for("readies.length === 2")
    [query] = socket_queries(browser, opened)
    assert query == {"resume_after": [ready["resume_after"]]}
    assert browser.evaluate("controls") == ["ready", "from-a-newer-relay", "ready"]
    assert browser.evaluate("changes.length") == 0


def test_the_page_does_not_count_ready_as_an_event(stub_page: Browser) -> None:
    stub_page.wait_for_console(lambda m: bool(m.args) and isinstance(m.args[0], dict)
                               and m.args[0].get("type") == "ready")
    assert stub_page.evaluate(COUNT_JS) == 0 and rows(stub_page, "") == []
    assert shown(stub_page, "empty") and not shown(stub_page, "error")
    assert problems(stub_page) == []


DOCUMENT_ROWS_JS = """Array.from(document.querySelectorAll('#documents tr.doc'), (row) => ({
    key: row.dataset.key, changed: row.classList.contains('changed'),
    id: row.querySelector('.cell-id').textContent,
    doc: row.querySelector('.cell-doc').textContent}))"""


def document_rows(browser: Browser) -> list[dict[str, Any]]:
    return browser.evaluate(DOCUMENT_ROWS_JS)


def row_of(key: str) -> str:
    escaped = f"CSS.escape({json.dumps(key)})"
    return f"document.querySelector(`#documents tr.doc[data-key=${{{escaped}}}]`)"


def live_table(browser: Browser, relay: StubRelay, query: str) -> Browser:
    page = live(browser, f"{relay.page_url}?{query}")
    page.wait_for("document.querySelectorAll('#documents tr.doc').length > 0", 10)
    return page


def test_the_live_table_shows_the_documents_and_changes_rows_in_place(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("table")
    a, b, c, d = (f"{key}-{n}" for n in "abcd")
    payload = "<img src=x id=injected><b>bold</b>"
    live_stub.snapshot = [{"_id": a, "n": 1}, {"_id": b, "bio": payload}, {"_id": c, "n": 3}]
    page = live_table(browser, live_stub, "live=shop.orders&filter=%7B%22n%22%3A1%7D&x=%2F")
    query = urlsplit(page.websocket_urls[-1]).query
    assert parse_qs(query) == {"snapshot": ["1"], "ns": ["shop.orders"], "filter": ['{"n":1}'],
                               "x": ["/"]}
    assert "filter=%7B%22n%22%3A1%7D" in query and "x=%2F" in query  # byte for byte
    assert document_rows(page) == [
        {"key": id_key(a), "changed": False, "id": json.dumps(a), "doc": "{n: 1}"},
        {"key": id_key(b), "changed": False, "id": json.dumps(b),
         "doc": f"{{bio: {json.dumps(payload)}}}"},
        {"key": id_key(c), "changed": False, "id": json.dumps(c), "doc": "{n: 3}"},
    ]
    injected = "document.querySelector('#documents img, #documents b, #injected')"
    assert page.evaluate(injected) is None
    assert "3" in text(page, "documents-count")

    page.evaluate(f"{row_of(id_key(a))}.marked = true")
    orders = live_stub.collection
    orders.update_one({"_id": a}, {"$set": {"n": 2}})
    page.wait_for(f"{row_of(id_key(a))}.querySelector('.cell-doc').textContent === '{{n: 2}}'")
    assert page.evaluate(f"{row_of(id_key(a))}.marked") is True  # the same row, updated in place
    assert page.evaluate(f"{row_of(id_key(a))}.classList.contains('changed')") is True
    page.wait_for(f"!{row_of(id_key(a))}.classList.contains('changed')", 5)  # briefly

    orders.delete_one({"_id": b})
    live_stub.broadcast({"type": "leave", "ns": "shop.orders", "documentKey": {"_id": c}})
    orders.insert_one({"_id": d, "n": 4})
    page.wait_for(f"{row_of(id_key(d))} !== null")
    assert [row["id"] for row in document_rows(page)] == [json.dumps(a), json.dumps(d)]
    assert "2" in text(page, "documents-count")
    assert problems(page) == []


def test_the_live_table_starts_over_on_resync(browser: Browser, live_stub: StubRelay) -> None:
    key = unique("page-resync")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n} for n in range(3)]
    page = live_table(browser, live_stub, "live=shop.orders")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "n": n * 7} for n in (1, 2, 4)]
    opened = len(page.websocket_urls)
    live_stub.broadcast({"type": "resync", "reason": "history_lost"})
    page.wait_for(f"{row_of(id_key(f'{key}-4'))} !== null", 10)
    assert [row["doc"] for row in document_rows(page)] == ["{n: 7}", "{n: 14}", "{n: 28}"]
    assert "resume_after" not in parse_qs(urlsplit(page.websocket_urls[opened]).query)
    assert not shown(page, "resync")  # nothing to do for the reader: it reloaded by itself
    assert problems(page) == []


def test_the_form_switches_to_the_live_table_and_back(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("toggle")
    live_stub.snapshot = [{"_id": key, "n": 1}]
    page = live(browser, live_stub.page_url)
    assert shown(page, "events-view") and not shown(page, "live-view")
    opened = len(page.websocket_urls)
    page.evaluate("""(() => {
        document.getElementById('sub-live').click();
        document.getElementById('sub-ns').value = 'shop.orders';
        document.querySelector('#subscription button[type=submit]').click();
    })()""")
    page.wait_for(f"{row_of(id_key(key))} !== null", 10)
    assert page.evaluate("document.getElementById('sub-ops').disabled") is True
    assert urlsplit(page.evaluate("location.href")).query == "live=shop.orders"  # a reload keeps it
    assert socket_queries(page, opened)[-1] == {"snapshot": ["1"], "ns": ["shop.orders"]}
    assert not shown(page, "events-view") and shown(page, "live-view")
    assert "shop.orders" in text(page, "subscribed")

    opened = len(page.websocket_urls)
    page.evaluate("""(() => {
        document.getElementById('sub-live').click();
        document.querySelector('#subscription button[type=submit]').click();
    })()""")
    page.wait_for("document.getElementById('status').dataset.state === 'live'"
                  " && !document.getElementById('events-view').hidden", 10)
    assert socket_queries(page, opened)[-1] == {"ns": ["shop.orders"]}
    live_stub.collection.insert_one({"_id": key + "-event"})
    wait_for_rows(page, key + "-event", 1)  # change events again
    assert problems(page) == []


def test_the_live_table_keeps_at_most_1000_rows_and_counts_all(
    browser: Browser, live_stub: StubRelay
) -> None:
    """A large collection costs the page no more than 1,000 rows; removing a shown document
    brings in the next one, and the caption counts what the query holds."""
    key = unique("big")
    live_stub.snapshot = [{"_id": f"{key}-{n:04}", "n": n} for n in range(1003)]
    page = live(browser, f"{live_stub.page_url}?live=shop.orders")
    page.wait_for("document.getElementById('documents-count').textContent === '1,003'", 15)
    assert page.evaluate("document.querySelectorAll('#documents tr.doc').length") == 1000
    assert shown(page, "documents-capped")
    live_stub.collection.delete_one({"_id": f"{key}-0000"})
    page.wait_for("document.getElementById('documents-count').textContent === '1,002'")
    ids = page.evaluate("Array.from(document.querySelectorAll('#documents .cell-id'),"
                        " (cell) => cell.textContent)")
    assert len(ids) == 1000 and ids[0] == json.dumps(f"{key}-0001")
    assert ids[-1] == json.dumps(f"{key}-1000")  # the next in the map's order took the place


def test_the_live_table_says_when_the_snapshot_is_too_large(
    browser: Browser, live_stub: StubRelay
) -> None:
    key = unique("too-large")
    live_stub.snapshot = [{"_id": key, "n": 1}]
    page = live_table(browser, live_stub, "live=shop.orders")
    opened = len(page.websocket_urls)
    live_stub.broadcast({"type": "error", "code": "snapshot_too_large",
                         "message": "more than 10000 documents match; narrow the filter"})
    live_stub.drop_sockets(code=1011, reason="snapshot too large")
    page.wait_for("document.getElementById('status').dataset.state === 'stopped'")
    assert text(page, "error-text") == (
        "snapshot_too_large: more than 10000 documents match; narrow the filter")
    assert shown(page, "error") and len(page.websocket_urls) == opened
    assert [row["id"] for row in document_rows(page)] == [json.dumps(key)]


def test_the_live_table_has_names_and_fits_390_px(phone: Browser, live_stub: StubRelay) -> None:
    key = unique("narrow-live")
    live_stub.snapshot = [{"_id": f"{key}-{n}", "unbroken": "y" * 400,
                           "nested": {"a": {"b": list(range(40))}}} for n in range(3)]
    page = live_table(phone, live_stub, "live=shop.orders")
    layout = page.evaluate("""({
        width: innerWidth, scroll: document.documentElement.scrollWidth,
        widest: Math.max(...Array.from(document.querySelectorAll('body *'),
                                       (el) => el.getBoundingClientRect().right)),
        caption: document.querySelector('#documents caption')?.textContent.trim() ?? '',
        heads: Array.from(document.querySelectorAll('#documents th'),
                          (th) => th.textContent.trim()),
    })""")
    assert layout["width"] == 390 and layout["scroll"] <= 390, layout
    assert layout["widest"] <= 390, layout
    assert "shop.orders" in layout["caption"] and all(layout["heads"]), layout
    unnamed = page.evaluate("""Array.from(
        document.querySelectorAll('input, button, [tabindex="0"]:not(tr)'),
        (control) => control.labels?.length || control.getAttribute('aria-label')
            || control.textContent.trim() ? null : control.outerHTML).filter(Boolean)""")
    assert unnamed == []


# -- a live query on a real relay (the live branch's relay side) ---------------------------------


def churn(orders: Any, keys: list[int], rounds: int, tag: str) -> None:
    """Writes of every kind a live query applies: $set on nested and array paths, $unset,
    replace, delete and insert; the last write is a marker, so that once the client holds it,
    it has applied everything before it (change events arrive in order)."""
    for n in range(rounds):
        key = keys[n % len(keys)]
        orders.update_one({"_id": key}, {"$set": {"nested.v": n, "tags.1": f"{tag}{n}"},
                                         "$unset": {"gone": ""}})
        if n % 5 == 1:
            orders.replace_one({"_id": key}, {"n": -n, "tags": ["r"], "nested": {"v": 0}})
        if n % 7 == 2 and key in keys:
            orders.delete_one({"_id": key})
            keys.remove(key)
        if n % 3 == 0:
            new = 1000 + len(keys) + n
            orders.insert_one({"_id": new, "n": new, "tags": ["i", "j"], "gone": 1})
            keys.append(new)
    orders.insert_one({"_id": f"marker-{tag}", "tags": []})


def converged(browser: Browser, orders: Any, marker: str, timeout: float = 30) -> None:
    browser.wait_for(f"query.documents.has({json.dumps(id_key(marker))})", timeout)
    actual = {id_key(d["_id"]): relaxed(d) for d in orders.find()}
    held_now = {id_key(d["_id"]): d for d in held(browser)}
    assert held_now == actual


@pytest.mark.e2e
@pytest.mark.fault
def test_a_live_query_on_a_real_relay_resnapshots_on_resync_and_converges(
    browser: Browser, relay_factory: Callable[..., Any]
) -> None:
    """The relay's resume point is lost (MongoDB comes back without its oplog): it tells its
    clients to resync, and the live query reads a fresh snapshot and follows it."""
    port = free_port()
    primary = TestPrimary(port=port).start()
    try:
        relay = relay_factory(MONGO_SRV=primary.uri + "&serverSelectionTimeoutMS=500")
        relay.wait_ready()
        with MongoClient(primary.uri) as client:
            orders = client.shop.orders
            keys = list(range(20))
            orders.insert_many([{"_id": n, "n": n, "tags": ["a", "b"], "nested": {"v": n},
                                 "gone": True} for n in keys])
            browser.open(relay.url + "/healthz")  # any page of the relay's origin will do
            browser.evaluate(LIVE_QUERY_JS % json.dumps("/socket?ns=shop.orders"))
            wait_ready(browser, 1, timeout=15)
            assert len(held(browser)) == 20
            churn(orders, keys, 40, "first")
            converged(browser, orders, "marker-first")
        opened = len(browser.websocket_urls)
        primary.stop()
    finally:
        primary.stop()
    with TestPrimary(port=port) as reborn, MongoClient(reborn.uri) as client:
        orders = client.shop.orders
        keys = list(range(100, 115))
        orders.insert_many([{"_id": n, "n": n, "tags": ["c", "d"], "nested": {"v": 0}}
                            for n in keys])
        wait_ready(browser, 2, timeout=60)
        churn(orders, keys, 40, "second")
        converged(browser, orders, "marker-second")
    fresh = socket_queries(browser, opened)
    assert fresh and all("resume_after" not in query for query in fresh)
    [first_snapshot], *_ = calls_of(browser, "snapshot")
    assert len(first_snapshot) == 20
    assert [m.text for m in browser.console_messages if m.level == "exception"] == []
    browser.evaluate("query.close()")  # no retries at a relay about to stop
    browser.open("about:blank")


@pytest.mark.e2e
def test_the_live_table_on_a_real_relay_follows_documents_in_and_out_of_its_filter(
    browser: Browser, mongo: Any, relay_factory: Callable[..., Any]
) -> None:
    relay = RealRelay(mongo, relay_factory)
    orders = relay.collection
    key = unique("in-out")
    ids = [f"{key}-{n}" for n in range(6)]
    orders.insert_many([{"_id": i, "status": "open" if n % 2 else "closed", "n": n}
                        for n, i in enumerate(ids)])
    status = json.dumps({"fullDocument.status": "open"}, separators=(",", ":"))
    page = live(browser, f"{relay.page_url}?live={mongo.db}.orders&filter={quote(status)}")
    page.wait_for("document.querySelectorAll('#documents tr.doc').length === 3", 10)

    def shown_ids() -> list[str]:
        return [json.loads(row["id"]) for row in document_rows(page)]

    assert sorted(shown_ids()) == [ids[1], ids[3], ids[5]]
    page.evaluate(f"{row_of(id_key(ids[3]))}.marked = true")
    orders.update_one({"_id": ids[0]}, {"$set": {"status": "open"}})      # enters
    orders.update_one({"_id": ids[1]}, {"$set": {"status": "closed"}})    # leaves
    orders.update_one({"_id": ids[3]}, {"$set": {"n": 33}})               # changes in place
    orders.delete_one({"_id": ids[5]})                                    # goes
    orders.insert_one({"_id": ids[5] + "-new", "status": "open", "n": 6})  # comes, last
    page.wait_for(f"{row_of(id_key(ids[5] + '-new'))} !== null", 10)

    expected = sorted(d["_id"] for d in orders.find({"status": "open"}))
    assert sorted(shown_ids()) == expected == [ids[0], ids[3], ids[5] + "-new"]
    assert page.evaluate(f"{row_of(id_key(ids[3]))}.marked") is True
    assert "n: 33" in page.evaluate(f"{row_of(id_key(ids[3]))}.textContent")
    assert text(page, "documents-count") == "3"
    assert problems(page) == []


# -- the driver itself -------------------------------------------------------------------------


def test_browser_close_leaves_no_process_behind() -> None:
    psutil = pytest.importorskip("psutil")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI installs it")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Browser.start() as browser:
        assert browser.evaluate("Promise.resolve(6 * 7)") == 42
        spawned = {p.pid for p in psutil.Process().children(recursive=True)} - before
        assert browser.pid in spawned
    left = {p.pid for p in psutil.Process().children(recursive=True)} & spawned
    assert left == set()
    assert not psutil.pid_exists(browser.pid)


def test_screenshots_of_a_realistic_page(
    browser: Browser, relay_stub: StubRelay, tmp_path: Path
) -> None:
    """Also the source of the README's docs/screenshot.png (desktop) and
    docs/screenshot-phone.png (390 px): set CHANGERELAY_SCREENSHOTS=docs to write them there."""
    page = live(browser, relay_stub.page_url + "?ns=shop")
    orders, carts = relay_stub.collection, relay_stub.collection.database["carts"]
    ada, grace, cart = ObjectId(), ObjectId(), ObjectId()
    when = datetime.datetime(2026, 11, 27, 9, 30, tzinfo=datetime.UTC)
    orders.insert_one({"_id": ada, "customer": "Ada", "total": 42.5, "status": "new"})
    orders.insert_one({"_id": grace, "customer": "Grace", "total": 18, "status": "new"})
    orders.update_one({"_id": ada}, {"$set": {"status": "paid", "paidAt": when}})
    carts.insert_one({"_id": cart, "items": [{"sku": "A-1", "qty": 2}], "owner": grace})
    orders.replace_one({"_id": grace}, {"customer": "Grace", "total": 21.0, "status": "new"})
    orders.update_one({"_id": grace}, {"$unset": {"status": ""}})
    orders.delete_one({"_id": ada})
    carts.rename("carts_archived")
    orders.database["carts_archived"].drop()
    page.wait_for("document.querySelector('#rows tr.change')?.dataset.op === 'drop'")
    page.wait_for("Number(document.getElementById('rate').textContent) > 0", 3)
    assert len(rows(page, str(ada))) == 3

    shots = {"screenshot.png": page.screenshot(tmp_path / "desktop.png")}
    page.set_viewport(390, 844, mobile=True)
    try:
        page.wait_for("innerWidth === 390")
        shots["screenshot-phone.png"] = page.screenshot(tmp_path / "phone.png")
    finally:
        page.set_viewport(1280, 800)
    for shot, width in zip(shots.values(), (1280, 390), strict=True):
        header = shot.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == width
    if target := os.environ.get("CHANGERELAY_SCREENSHOTS"):
        for name, shot in shots.items():
            shutil.copyfile(shot, Path(target) / name)


# -- the relays ---------------------------------------------------------------------------------


class RealRelay:
    """server.py (through conftest's ``relay_factory``) watching the ``mongo`` fixture's database.

    It keeps one port across restarts, so a page can reconnect to its successor.
    """

    def __init__(self, mongo: Any, relay_factory: Callable[..., Any]) -> None:
        self._mongo, self._factory = mongo, relay_factory
        self._port = free_port()
        self._relay = self._start()
        self.page_url = f"http://127.0.0.1:{self._port}/"
        self.collection = mongo.client[mongo.db]["orders"]

    def _start(self) -> Any:
        relay = self._factory(MONGO_SRV=self._mongo.uri, WATCH_DB=self._mongo.db, PORT=self._port)
        relay.wait_ready()
        return relay

    def drop_sockets(self, then: Callable[[], None] | None = None) -> None:
        """Restart the relay: SIGTERM closes every socket with 1001; ``then`` runs while down."""
        self._relay.terminate()
        if then is not None:
            then()
        self._relay = self._start()

    def crash(self, then: Callable[[], Any] | None = None) -> None:
        """Restart the relay after SIGKILL: sockets are cut without a close frame, nothing is
        flushed; ``then`` runs while nothing listens on the port."""
        self._relay.kill()
        if then is not None:
            then()
        self._relay = self._start()


class GatedWriter(threading.Thread):
    """Inserts ``total`` small documents in batches through its own PyMongo client.

    Before document ``n`` it waits for ``gates[n]``, so a test can place writes before, during
    and after an outage whatever the machine's speed; the pause between batches keeps events
    arriving while the test acts, rather than all at once.
    """

    def __init__(
        self, uri: str, db: str, *, total: int, batch: int, gates: dict[int, threading.Event]
    ) -> None:
        super().__init__(daemon=True)
        self._uri, self._db, self._total, self._batch, self._gates = uri, db, total, batch, gates
        self._stopping = threading.Event()
        self._progress = threading.Condition()
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with MongoClient(self._uri, serverSelectionTimeoutMS=10_000) as client:
                orders = client[self._db]["orders"]
                for start in range(0, self._total, self._batch):
                    gate = self._gates.get(start)
                    if gate is not None and not gate.wait(60):
                        raise TimeoutError(f"gate before document {start} never opened")
                    if self._stopping.is_set():
                        return
                    orders.insert_many(
                        [{"n": n} for n in range(start, min(start + self._batch, self._total))]
                    )
                    with self._progress:
                        self.written = min(start + self._batch, self._total)
                        self._progress.notify_all()
                    self._stopping.wait(0.01)
        except BaseException as error:  # reported by the test, which owns the assertion
            self.error = error
        finally:
            with self._progress:
                self._progress.notify_all()

    def wait_written(self, count: int, timeout: float) -> None:
        with self._progress:
            if not self._progress.wait_for(
                lambda: self.written >= count or not self.is_alive(), timeout
            ):
                raise TimeoutError(f"the writer wrote {self.written} documents, not {count}")

    def stop(self) -> None:
        self._stopping.set()
        for gate in self._gates.values():
            gate.set()
        self.join(10)


class StubRelay:
    """Serves the real page and static files, and a /socket that follows the wire protocol.

    It runs its own IOLoop in a thread; the test thread calls into it synchronously.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.sockets: set[StubSocket] = set()
        # What a snapshot (``snapshot=1``) connection reads: the documents, in order, and a
        # one-shot cut: close the socket (1001) after this many of them, mid-snapshot.
        self.snapshot: list[dict[str, Any]] = []
        self.cut_snapshot_after: int | None = None
        self._tokens = itertools.count(1)
        self.collection = StubCollection(self, "shop", "orders")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server, port = self._call(self._listen)
        self.base_url = f"http://127.0.0.1:{port}"
        self.page_url = f"{self.base_url}/"
        self.accepting = True

    def _listen(self) -> tuple[HTTPServer, int]:
        app = tornado.web.Application(
            [
                (r"/", PageHandler),
                (r"/demo", PageHandler, {"demo": True}),
                (r"/blank", BlankHandler),
                (r"/socket", StubSocket, {"relay": self}),
            ],
            template_path=str(ROOT / "templates"),
            static_path=str(ROOT / "static"),
        )
        listeners = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(app)
        server.add_sockets(listeners)
        return server, listeners[0].getsockname()[1]

    def _call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        self._call(self._server.stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def publish(self, event: dict[str, Any]) -> None:
        def publish() -> None:
            self.history.append(event)
            for client in list(self.sockets):
                client.send(event)

        self._call(publish)

    def broadcast(self, message: dict[str, Any]) -> None:
        def broadcast() -> None:
            for client in list(self.sockets):
                client.send(message)

        self._call(broadcast)

    def drop_sockets(
        self, then: Callable[[], None] | None = None, *, code: int = 1001, reason: str = ""
    ) -> None:
        """Close every socket; while ``then`` runs, refuse handshakes (HTTP 503)."""

        def drop() -> None:
            self.accepting = then is None
            for client in list(self.sockets):
                self.sockets.discard(client)
                client.close(code, reason or None)

        self._call(drop)
        if then is not None:
            try:
                then()
            finally:
                self._call(lambda: setattr(self, "accepting", True))

    def advance_position(self) -> str:
        """Mint a resume point past the newest event, as a quiet stream's batch token would be."""
        token = self._call(self.mint_position)
        self.broadcast({"type": "position", "resume_after": token})
        return token

    def mint_position(self) -> str:
        """A resume point past the newest event (on the stub's loop)."""
        token = self._token()
        self.history.append({"_id": {"_data": token}, "quiet": True})
        return token

    def _token(self) -> str:
        return f"8263{next(self._tokens):026X}"

    def event(self, operation: str, ns: tuple[str, str], **fields: Any) -> dict[str, Any]:
        """A change event shaped like MongoDB's; :meth:`StubSocket.send` encodes it as relaxed
        Extended JSON, as the relay does."""
        now = datetime.datetime.now(datetime.UTC)
        token: dict[str, Any] = {"_data": self._token()}
        if _typed(fields.get("documentKey")):
            token["_typeBits"] = b"\x01"  # MongoDB writes some for such a key (see tokens.py)
        return {
            "_id": token,
            "operationType": operation,
            "clusterTime": Timestamp(int(now.timestamp()), 1),
            "wallTime": now,
            "ns": {"db": ns[0], "coll": ns[1]},
            **fields,
        }


def _typed(value: Any) -> bool:
    """Whether a key holds a NumberLong or a double, whose types only type bits keep."""
    if isinstance(value, dict):
        return any(map(_typed, value.values()))
    if isinstance(value, list):
        return any(map(_typed, value))
    return isinstance(value, Int64 | float)


class StubCollection:
    """The subset of PyMongo's ``Collection`` the tests write through; each write publishes."""

    def __init__(self, relay: StubRelay, db: str, name: str) -> None:
        self._relay, self._ns = relay, (db, name)
        self.full_name = f"{db}.{name}"
        self.database = StubDatabase(relay, db)

    def insert_one(self, document: dict[str, Any]) -> None:
        self._publish("insert", fullDocument=document, documentKey={"_id": document["_id"]})

    def update_one(self, filter: dict[str, Any], update: dict[str, Any]) -> None:
        description = {
            "updatedFields": update.get("$set", {}),
            "removedFields": list(update.get("$unset", {})),
            "truncatedArrays": [],
        }
        self._publish("update", documentKey={"_id": filter["_id"]}, updateDescription=description)

    def replace_one(self, filter: dict[str, Any], replacement: dict[str, Any]) -> None:
        document = {"_id": filter["_id"], **replacement}
        self._publish("replace", fullDocument=document, documentKey={"_id": filter["_id"]})

    def delete_one(self, filter: dict[str, Any]) -> None:
        self._publish("delete", documentKey={"_id": filter["_id"]})

    def rename(self, new_name: str) -> None:
        self._publish("rename", to={"db": self._ns[0], "coll": new_name})

    def drop(self) -> None:
        self._publish("drop")

    def _publish(self, operation: str, **fields: Any) -> None:
        self._relay.publish(self._relay.event(operation, self._ns, **fields))


class StubDatabase:
    def __init__(self, relay: StubRelay, name: str) -> None:
        self._relay, self.name = relay, name

    def __getitem__(self, name: str) -> StubCollection:
        return StubCollection(self._relay, self.name, name)


CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws://{host} "
    "wss://{host}; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class PageHandler(tornado.web.RequestHandler):
    """The real template, with the relay's variables: what it watches, and whether it is a demo."""

    def initialize(self, demo: bool = False) -> None:
        self.demo = demo

    def get(self) -> None:
        self.set_header("Content-Security-Policy", CSP.format(host=self.request.host))
        self.render("index.html", watch_db=None, watch_collection=None, demo=self.demo)


class BlankHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Security-Policy", CSP.format(host=self.request.host))
        self.write('<!doctype html><title>blank</title><link rel="icon" href="data:,">')


class StubSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, relay: StubRelay) -> None:
        self.relay = relay

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if not self.relay.accepting:
            self.set_status(503)
            self.finish({"error": "unavailable", "message": "restarting; retry with backoff"})
            return
        if "Upgrade" not in self.request.headers:  # the client asking why a handshake failed
            self.set_status(204)
            self.finish()
            return
        await super().get(*args, **kwargs)

    def open(self) -> None:
        after = self.get_argument("resume_after", None)
        if self.get_argument("snapshot", None) == "1":
            if not self._send_snapshot(reset=after is not None):
                return
        elif after is not None:
            ids = [token_of(event) for event in self.relay.history]
            if after in ids:
                for event in self.relay.history[ids.index(after) + 1 :]:
                    if "quiet" not in event:
                        self.send(event)
            else:
                self.send({"type": "resync", "reason": "history_lost"})
        # Every connection is told once when its live feed is attached, and from where.
        ready: dict[str, Any] = {"type": "ready", "resume_after": self.relay.mint_position()}
        if self.get_argument("snapshot", None) == "1":
            ready["snapshot"] = len(self.relay.snapshot)
        self.send(ready)
        self.relay.sockets.add(self)

    def _send_snapshot(self, *, reset: bool) -> bool:
        """The stub always starts a resuming snapshot client over (``reset``), as the protocol
        allows; False when the one-shot cut closed the socket mid-snapshot."""
        if reset:
            self.send({"type": "reset"})
        ns = self.get_argument("ns", "shop.orders")
        for n, document in enumerate(self.relay.snapshot):
            if n == self.relay.cut_snapshot_after:
                self.relay.cut_snapshot_after = None
                self.close(1001, "server shutting down")
                return False
            self.send({"type": "doc", "ns": ns, "doc": document})
        return True

    def send(self, message: dict[str, Any]) -> None:
        self.write_message(json_util.dumps(message, json_options=json_util.RELAXED_JSON_OPTIONS))

    def on_close(self) -> None:
        self.relay.sockets.discard(self)
