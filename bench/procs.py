"""The processes of a benchmark: servers, the change source and load clients, pinned to cores.

CPU time and memory are read from ``/proc`` rather than asked of the processes, so the numbers
include every thread (PyMongo's monitors, Tornado's loop) and, with ``REUSE_PORT``, every worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
LISTENING = re.compile(r"listening on http://[\d.]+:(\d+)/")


def spawn(argv: list[str], cpus: set[int] | None, env: dict | None = None,
          root: Path = ROOT, **popen) -> subprocess.Popen:
    """Start ``argv`` in ``root`` confined to ``cpus`` from its first instruction (children
    inherit it)."""
    if cpus is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    proc = subprocess.Popen(argv, cwd=str(root), env=env, **popen)
    if cpus is not None and not shutil.which("taskset"):
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (REUSE_PORT workers are children of the supervisor)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, ()))
    return found


def cpu_ticks_seconds(pid: int, system_only: bool = False) -> float:
    """utime + stime from ``/proc/PID/stat`` of ``pid`` and its descendants (10 ms resolution).

    With ``system_only``, stime alone: time in the kernel, mostly ``send()`` for a relay.
    """
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[12]) + (0 if system_only else int(fields[11]))  # stime, utime
    return total / TICK


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """On-CPU seconds of ``pid``, all its threads and (by default) its live descendants.

    The sum of ``/proc/PID/task/*/schedstat`` (nanoseconds) when the kernel has it, since
    utime+stime in ``/proc/PID/stat`` counts in 10 ms ticks, too coarse for a short run; the
    two agree on what they count (user and system time of every thread).
    """
    total = 0.0
    for member in family(pid) if descendants else [pid]:
        total += _process_cpu(member)
    return total


def _process_cpu(pid: int) -> float:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    nanoseconds, fallback = 0, False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                nanoseconds += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            fallback = True
            break
    return cpu_ticks_seconds(pid) if fallback else nanoseconds / 1e9


def core_busy_seconds() -> dict[int, float]:
    """Busy CPU seconds of every core since boot, from ``/proc/stat`` (everyone's, not ours).

    The difference from our own processes' CPU is what other programs took from the cores
    during a run: on a shared machine that is what makes throughput numbers move.
    """
    busy = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
                busy[int(name[3:])] = (user + nice + system + irq + softirq + steal) / TICK
    return busy


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants."""
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Server:
    """A server process under test that logs ``listening on http://HOST:PORT/``."""

    name = "?"

    def __init__(self, argv: list[str], env: dict, cpus: set[int] | None, root: Path = ROOT):
        self.argv, self.env, self.cpus, self.root = argv, env, cpus, root
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self._seen = threading.Condition()

    def start(self, timeout: float = 20) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "WATCH_"))}
        env.update({"PYTHONUNBUFFERED": "1", "HOST": "127.0.0.1", "PORT": "0"})
        env.update(self.env)
        self.proc = spawn(self.argv, self.cpus, env, self.root, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_log(lambda: self.port is not None, timeout, "never said it was listening")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                match = LISTENING.search(line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_log(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} {what}:\n" + "\n".join(self.lines[-30:]))
                self._seen.wait(remaining)

    def wait_ready(self, timeout: float = 20) -> None:
        raise NotImplementedError

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def cpu_ticks(self, system_only: bool = False) -> float:
        return cpu_ticks_seconds(self.proc.pid, system_only)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Relay(Server):
    name = "changerelay"

    def __init__(self, uri: str, db: str, cpus: set[int] | None, reuse_port: int = 0,
                 env: dict | None = None, root: Path = ROOT):
        """``root``: the checkout whose ``server.py`` runs (``--baseline``: another revision)."""
        env = {"MONGO_SRV": uri, "WATCH_DB": db, "LOG_LEVEL": "INFO", **(env or {})}
        if reuse_port:
            env["REUSE_PORT"] = str(reuse_port)
        super().__init__([sys.executable, "server.py"], env, cpus, root)
        self.reuse_port = reuse_port

    def wait_ready(self, timeout: float = 20) -> None:
        """``/readyz`` answers 200 once the change stream is open (each worker: its own)."""
        workers = max(1, self.reuse_port)
        self.wait_log(lambda: sum("change stream open" in line for line in self.lines)
                      >= workers, timeout, "never opened its change stream")

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as reply:
            return json.loads(reply.read())


class Tutorial(Server):
    name = "tutorial"

    def __init__(self, uri: str, db: str, cpus: set[int] | None):
        super().__init__([sys.executable, "-m", "bench.tutorial_server"],
                         {"MONGO_SRV": uri, "WATCH_DB": db}, cpus)

    def wait_ready(self, timeout: float = 20) -> None:
        self.wait_log(lambda: any("change stream open" in line for line in self.lines),
                      timeout, "never opened its change stream")


class Source:
    """The test primary in its own process (``bench/source.py``)."""

    def __init__(self, cpus: set[int] | None):
        self.proc = spawn([sys.executable, "-m", "bench.source"], cpus, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
        self.uri = self.proc.stdout.readline().strip()
        if not self.uri.startswith("mongodb://"):
            raise RuntimeError("the test primary did not start (bench/source.py printed "
                               f"{self.uri!r}); run python -m bench.source to see why")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class LoadClient:
    """A ``bench/loadclient.py`` process, driven by one JSON line each way."""

    def __init__(self, cpus: set[int] | None):
        self.proc = spawn([sys.executable, "-m", "bench.loadclient"], cpus,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.hello = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load client exited; run python -m bench.loadclient by hand "
                               "to see its error")
        return json.loads(line)

    def ask(self, op: str, **fields) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError):
                self.ask("exit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
