"""Logging: one format for every line the process writes, and no credential in any of them.

Our own lines go through logzero's logger; Tornado, PyMongo, asyncio, the ``warnings`` module and
uncaught exceptions (in the main thread or any other) all reach the same handler on the root
logger, so with ``LOG_FORMAT=json`` every line on stderr is one JSON object that a log pipeline
can parse. Whatever the source, a line passes a filter that masks passwords in connection strings
and bearer tokens, since a driver or framework message may quote either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from types import TracebackType

import logzero
from logzero import logger
from tornado import web

# user:password@ in any URI (mongodb://, mongodb+srv://, http://...): the password is masked.
_URI_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@\s/]*@", re.IGNORECASE)
# A JWT in a query string or an Authorization header.
_TOKEN = re.compile(r"(?P<head>access_token=|Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# Third-party loggers that talk a lot below INFO: every command PyMongo sends, every request.
_QUIET_BELOW_INFO = ("pymongo",)


def mask(text: str) -> str:
    """``text`` with URI passwords and bearer tokens replaced by ``***``."""
    return _TOKEN.sub(r"\g<head>***", _URI_PASSWORD.sub(r"\g<head>:***@", text))


class _Masking(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info:  # formatters then print exc_text, the masked traceback
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup(level_name: str, log_format: str) -> None:
    """Route every logger to one stderr handler in ``log_format`` (``text`` or ``json``);
    Tornado's access lines only at DEBUG (one per request)."""
    level = getattr(logging, level_name)
    logzero.json(enable=log_format == "json")
    logzero.loglevel(level)
    handler = logger.handlers[0]
    handler.setStream(sys.stderr)  # the stderr of now, not of when logzero was imported
    if not any(isinstance(f, _Masking) for f in handler.filters):
        handler.addFilter(_Masking())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logger.propagate = False  # it has the same handler already
    logging.getLogger("tornado.access").setLevel(
        level if level <= logging.DEBUG else logging.WARNING)
    for name in _QUIET_BELOW_INFO:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = lambda args: _uncaught(args.exc_type, args.exc_value,
                                                  args.exc_traceback)


def _uncaught(kind: type[BaseException], value: BaseException | None,
              traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value or kind(), traceback)
        return
    logger.critical("uncaught %s", kind.__name__, exc_info=(kind, value, traceback))


def startup_error(message: str, log_format: str | None) -> None:
    """A line for stderr before logging is set up (bad settings, a port in use), in the format
    asked for when it is known."""
    line = mask(message)
    if log_format == "json":
        line = json.dumps({"levelname": "CRITICAL", "name": "changerelay", "message": line})
    print(line, file=sys.stderr, flush=True)


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access line without the query string: it can carry an access_token."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access = logging.getLogger("tornado.access")
    if access.isEnabledFor(level):
        request = handler.request
        access.log(level, "%d %s %s (%s) %.2fms", status, request.method,
                   request.path, request.remote_ip, 1000.0 * request.request_time())
