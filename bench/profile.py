"""Where a server's CPU goes during a run: py-spy, sampling from outside the process.

py-spy is not a dependency of the project; ``pip install py-spy`` into the virtualenv to use
``python -m bench --profile 1000``. It samples without stopping the target (``--nonblocking``), so
the run it watches is measured as usual. The collapsed stacks are saved next to the results, and
:func:`summary` turns them into the "self time by function" and "inclusive time" tables quoted in
BENCHMARKS.md (``python -m bench.profile FILE`` prints them for a saved file).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


class Profiler:
    native = False  # --profile-native: C frames too (sock.send, ...); pauses the target to sample

    def __init__(self, pids: list[int], path: Path, rate: int = 200):
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise RuntimeError("--profile needs py-spy: pip install py-spy (into .venv)")
        self.path = path
        self.proc = subprocess.Popen(
            [exe, "record", "--threads", "--format", "raw", "--rate", str(rate),
             # native stacks need the target paused while sampled; Python-only ones do not
             *([] if self.native else ["--nonblocking"]),
             "--output", str(path), "--pid", str(pids[0]),
             *(["--native"] if self.native else []),
             *(["--subprocesses"] if len(pids) > 1 else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.path.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.strip()[-500:]}")
        return self.path


# Leaf frames of a thread that waits (py-spy samples some of them as active, and with --native
# the leaf is the libc call): a lock, epoll or select, a condition variable.
WAITING = ("acquire_lock", "epoll_wait", "select (selectors.py)", "poll (selectors.py)",
           "wait (threading.py)", "idle")


def _frames(stack: str) -> list[str]:
    # raw format: "thread;frame;frame;... count", frame = "function (file:line)"
    frames = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        where = where.removesuffix(")").rsplit(":", 1)[0].split("/")[-1]
        frames.append(f"{name} ({where})" if where else name)
    return frames


def summary(path: Path, top: int = 25) -> str:
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if any(mark in frame for frame in frames[-3:] for mark in WAITING):
            continue  # a thread waiting is not CPU
        total += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
    if not total:
        return "no busy samples"
    rows = ["| self % | function |", "|---:|---|"]
    rows += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in own.most_common(top)]
    rows += ["", "| inclusive % | function |", "|---:|---|"]
    rows += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in inclusive.most_common(top)]
    return f"{total} busy samples\n\n" + "\n".join(rows)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
