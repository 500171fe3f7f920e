"""Log lines never carry a credential, whichever library wrote them."""

from __future__ import annotations

import json
import logging
import sys
import threading

import pytest

from changerelay import logs


@pytest.mark.parametrize(("line", "masked"), [
    ("mongodb://relay:s3cret@db1:27017,db2/?replicaSet=rs0",
     "mongodb://relay:***@db1:27017,db2/?replicaSet=rs0"),
    ("connecting to mongodb+srv://u:p%40ss@cluster0.example.net/x",
     "connecting to mongodb+srv://u:***@cluster0.example.net/x"),
    ("GET /socket?ns=a&access_token=eyJhbGciOi.eyJzdWIiOi.sig_-x&ops=insert",
     "GET /socket?ns=a&access_token=***&ops=insert"),
    ("Authorization: Bearer eyJhbGciOi.eyJzdWIiOi.sig", "Authorization: Bearer ***"),
    ("mongodb://host-without-credentials:27017", "mongodb://host-without-credentials:27017"),
])
def test_credentials_are_masked(line, masked):
    assert logs.mask(line) == masked


@pytest.fixture
def global_logging():
    """logs.setup changes process-wide state: put it back for the other tests."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook)
    yield
    root.handlers, level, sys.excepthook, threading.excepthook = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def test_a_traceback_quoting_the_uri_is_masked_too(global_logging, capsys):
    logs.setup("INFO", "json")
    try:
        raise ValueError("cannot parse mongodb://admin:hunter2@db/")
    except ValueError:
        logging.getLogger("pymongo.topology").exception("failed")
    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["name"] == "pymongo.topology"
    assert "hunter2" not in line and "admin:***@db" in record["exc_info"]
