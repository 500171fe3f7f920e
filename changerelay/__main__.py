"""Command line: ``changerelay`` runs the server (as do ``python -m changerelay`` and
``python server.py``); ``changerelay tail URL`` is a terminal client; ``changerelay token`` mints a
test JWT."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
from types import FrameType

from . import config as cfg
from . import logs


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or "changerelay"
    if argv[:1] == ["tail"]:
        from .tail import main as tail_main

        return tail_main(argv[1:], prog=f"{prog} tail")
    if argv[:1] == ["token"]:
        from .mint import main as token_main

        return token_main(argv[1:], prog=f"{prog} token")
    return run_server(argv, prog)


def run_server(argv: list[str], prog: str = "changerelay") -> int:
    try:
        config = cfg.load(argv, prog=prog)
    except cfg.ConfigError as exc:
        logs.startup_error(f"changerelay: configuration error: {exc}",
                           os.environ.get("LOG_FORMAT", "").strip().lower())
        return 2
    if config.reuse_port > 1:
        # Before the metrics' library is first imported (by app): it decides then whether
        # values are shared between processes.
        from .metrics import worker_directory

        with worker_directory():
            return _serve(config)
    return _serve(config)


def _serve(config: cfg.Config) -> int:
    from . import app, collector

    logs.setup(config.log_level, config.log_format)
    collector.pace()
    app.raise_open_files_limit()
    try:
        sockets = app.bind(config)
    except OSError as exc:
        logs.startup_error(f"changerelay: cannot listen on {config.host}:{config.port}: "
                           f"{exc.strerror}; set PORT (or HOST) to a free address",
                           config.log_format)
        return 2
    if config.reuse_port > 1:
        return _supervise(config, sockets)
    if not config.demo:
        return asyncio.run(app.serve(config, sockets))
    from .demo import Demo

    demo = Demo()
    try:
        config = dataclasses.replace(config, mongo_uri=demo.start())
        return asyncio.run(app.serve(config, sockets))
    finally:
        demo.stop()


def _supervise(config: cfg.Config, sockets: list[socket.socket]) -> int:
    """Fork REUSE_PORT workers, each with its own SO_REUSEPORT socket and change stream, sharing
    their metrics in the run's directory (``metrics.worker_directory``)."""
    from . import app
    from .metrics import worker_gone

    # Keep the port the parent got (PORT=0 picks one), and leave the accepting to the workers.
    config = dataclasses.replace(config, port=sockets[0].getsockname()[1])
    for sock in sockets:
        sock.close()
    children = []
    for _ in range(config.reuse_port):
        pid = os.fork()
        if pid == 0:
            code = asyncio.run(app.serve(config, app.bind(config)))
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        worker_gone(child)
        status = status or os.waitstatus_to_exitcode(code)
    return status


if __name__ == "__main__":
    sys.exit(main())
