"""Fixtures, and the runner for ``async def`` tests (each on a fresh event loop).

Without ``MONGODB_TEST_URI`` every test gets its own :class:`~changerelay.primary.TestPrimary`
(the wire-protocol test primary). With it, end-to-end tests that inject no fault run against that
real replica set, each in a database of its own that is dropped afterwards; tests marked ``fault``
skip there. What the tests share besides fixtures is in ``tests/support.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import pytest
from pymongo import MongoClient

from changerelay.primary import TestPrimary
from tests.support import REAL_URI, Mongo, RelayProcess


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run an ``async def`` test to completion on a fresh event loop."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**arguments))
    return True


def pytest_collection_modifyitems(config, items):
    if not REAL_URI:
        return
    skip = pytest.mark.skip(reason="injects faults into the test primary; cannot run against "
                            "MONGODB_TEST_URI")
    for item in items:
        if "fault" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def primary():
    """A running test primary (fault-injecting tests use this directly).

    Leaving it fails the test if the primary logged a handler error (``TestPrimary.check``).
    """
    if REAL_URI:
        pytest.skip("needs the test primary for fault injection")
    with TestPrimary() as server:
        yield server


@pytest.fixture
def writer(primary):
    """A driver client of the test primary, for the test's own writes.

    Its server selection is bounded as ``Mongo``'s is: leaving the fixture ends the client's
    sessions (endSessions), and with the primary stopped by the test that would otherwise wait
    the driver's default 30 s for a server. A test that stops the primary closes it first.
    """
    with MongoClient(primary.uri, serverSelectionTimeoutMS=5000) as client:
        yield client


@pytest.fixture
def mongo():
    """The MongoDB a test writes to; a test primary fails the test if it logged a handler error."""
    with contextlib.nullcontext() if REAL_URI else TestPrimary() as server:
        m = Mongo(REAL_URI or server.uri, server)
        yield m
        m.close()


@pytest.fixture
def relay_factory():
    started: list[RelayProcess] = []

    def start(env=None, args=(), **kwargs) -> RelayProcess:
        relay = RelayProcess({**(env or {}), **kwargs}, args).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.kill()
        print(f"--- relay log (port {relay.port}) ---\n{relay.log()}")  # shown on failure


@pytest.fixture
def relay(mongo, relay_factory):
    """A relay watching the test's own database, open and ready."""
    r = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    r.wait_ready()
    return r
