"""A fork server for the tests' relays: ``python -m tests.zygote FD``.

Every end-to-end test starts ``python server.py``, and a fresh interpreter spends most of a relay's
start (about half a second of CPU) importing Tornado, PyMongo, cryptography and changerelay.
This process imports them once per test process and forks a child per relay, which then runs
``server.py`` as ``__main__`` with its own pid, environment, arguments, working directory, stdout
and stderr (one pipe, as ``RelayProcess`` reads it) and exit status. Signals reach the child
directly (``tests.support.ForkedProcess``); this process only forks and reports exits.

Forking is safe here because nothing in this process ever starts a thread or an event loop: it
imports, then waits on its control socket and its children's pidfds with ``poll``. Whatever a
module reads from the environment when imported would be read here once, not per relay, so
``tests.support`` starts such relays with ``Popen`` instead (``needs_fresh_interpreter``).

Protocol (a ``SOCK_SEQPACKET`` socket, one JSON message per packet): a request
``{"argv", "env", "cwd"}`` carries the write end of the child's output pipe as ``SCM_RIGHTS``; the
answer is ``{"started": pid}``, and later ``{"exited": pid, "code": c}`` with ``c`` as
``Popen.returncode`` gives it (negative: killed by that signal). End of file on the socket (the
test process is gone) kills the children that are left, and ends this process.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import traceback

#: What a relay imports by the time it serves, found with ``PYTHONPROFILEIMPORTTIME``.
#: prometheus_client picks its value class from ``PROMETHEUS_MULTIPROC_DIR`` when imported, which
#: is why a relay with ``REUSE_PORT`` gets a fresh interpreter (``needs_fresh_interpreter``).
PRELOAD = (
    "changerelay.__main__",
    "changerelay.app",
    "tornado.platform.asyncio",
    "pymongo.pyopenssl_context",
    "prometheus_client",
)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # optional (pyOpenSSL): the relay does without it
            importlib.import_module(name)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("tests.zygote: a preloaded module started a thread; forking is unsafe")
    gc.freeze()  # children share the imported modules' pages instead of copying them on collection
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(control, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd != control.fileno():
                pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                control.send(json.dumps(
                    {"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
                continue
            message, fds, _, _ = socket.recv_fds(control, 1 << 20, 1)
            if not message:
                for pid in children.values():
                    os.kill(pid, signal.SIGKILL)
                return
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0], control)
            os.close(fds[0])
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            control.send(json.dumps({"started": pid}).encode())


def _child(request: dict, output: int, control: socket.socket) -> None:
    """Become ``python ARGV...`` with the request's environment; never returns."""
    code = 1
    try:
        control.close()
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        code = _run(sys.argv[0])
    finally:
        os._exit(code)


def _run(path: str) -> int:
    """Run the script as ``__main__`` and end as the interpreter would: its exit status, non-daemon
    threads joined, ``atexit`` handlers run, output flushed."""
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = _status(exit_.code)
    except KeyboardInterrupt:
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as CPython ends on an uncaught KeyboardInterrupt
        code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    _flush()
    return code


def _status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


if __name__ == "__main__":
    main()
