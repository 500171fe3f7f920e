"""Where the kernel does the clients' TCP receive work on loopback: ``--loopback-rx``.

On loopback the kernel runs the *receiver's* TCP processing (netif_rx, the softirq, tcp_v4_rcv,
waking the reader) inside the *sender's* ``send()`` call, on the sender's core. A relay sending
one frame to each of 10,000 clients on one machine so pays for its clients' kernel receive work,
which a real network does on the clients' machines: a bare loop of ``send()`` costs two to three
times as much (11.5 against 4-4.7 µs per call on the benchmark VM).

Receive packet steering (RPS) moves that work: with the client cores' mask in
``/sys/class/net/lo/queues/rx-*/rps_cpus``, a loopback packet is queued to a client core and
processed there. The queue is the client core's backlog, ``net.core.netdev_max_backlog``
packets (1,000 by default) and it drops what does not fit: one pass of 10,000 sends outruns the
client core, so 57,575 packets were dropped and 41,010 segments retransmitted in 18 passes on
the VM, where unsteered loopback drops none. So ``steer`` raises the backlog with the mask, and
the packets the backlogs dropped during the run are recorded.

``steer`` remembers the old values; ``Steering.restore`` writes them back, and runs from a
``finally``, at exit and on SIGINT/SIGTERM/SIGHUP, because the settings outlive the process and
change every loopback connection on the machine.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import sys
from pathlib import Path

QUEUES = Path("/sys/class/net/lo/queues")
BACKLOG = Path("/proc/sys/net/core/netdev_max_backlog")
SOFTNET = Path("/proc/net/softnet_stat")
BACKLOG_PER_CLIENT = 10  # a pass's frames and the clients' ACKs, with room for multi-segment sends
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WHY = ("on loopback the kernel does the receiver's TCP work inside the sender's send(); "
       "steering it to the client core charges it where a real network would: to the client's "
       "machine")


def cpu_mask(cpus: set[int]) -> str:
    """``cpus`` as ``rps_cpus`` writes it: hex, 32-bit groups split by commas, highest first."""
    digits = f"{sum(1 << cpu for cpu in cpus):x}"
    digits = digits.zfill(-(-len(digits) // 8) * 8)
    groups = [digits[start:start + 8] for start in range(0, len(digits), 8)]
    groups[0] = groups[0].lstrip("0") or "0"
    return ",".join(groups)


def dropped(softnet: Path = SOFTNET) -> int | None:
    """Packets every core's backlog has dropped since boot (2nd column of softnet_stat)."""
    try:
        with open(softnet) as stat:
            return sum(int(line.split()[1], 16) for line in stat)
    except (OSError, IndexError, ValueError):
        return None


class Steering:
    """The effective mode, the settings written, and the values to write back.

    ``restore`` is idempotent, so the ``finally``, the exit hook and a signal may all call it.
    """

    def __init__(self, mode: str, mask: str | None = None, reason: str = "",
                 softnet: Path = SOFTNET):
        self.mode, self.mask, self.reason = mode, mask, reason
        self.backlog: int | None = None
        self.previous: dict[Path, str] = {}
        self._handlers: dict[int, object] = {}
        self.softnet, self.dropped0 = softnet, dropped(softnet)

    def record(self) -> dict:
        """What the results JSON keeps: the mode in effect, what was written over what, and the
        packets dropped at a backlog since ``steer`` (any number but 0 means retransmissions)."""
        now = dropped(self.softnet)
        return {"mode": self.mode, "mask": self.mask, "backlog": self.backlog,
                "reason": self.reason,
                "previous": {str(path): old for path, old in self.previous.items()},
                "dropped": None if None in (now, self.dropped0) else now - self.dropped0}

    def restore(self) -> None:
        previous, self.previous = self.previous, {}
        for path, old in reversed(previous.items()):  # the mask before the backlog
            try:
                path.write_text(old)
            except OSError as error:
                print(f"loopback-rx: could not restore {path} to {old!r} ({error}); "
                      f"run: echo {old} > {path}", file=sys.stderr)
        for signum, handler in self._handlers.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / unset
                signal.signal(signum, handler)
        self._handlers = {}
        atexit.unregister(self.restore)

    def guard(self) -> None:
        """Restore at interpreter exit and on the signals that end a run early.

        SIGINT keeps raising KeyboardInterrupt and SIGTERM/SIGHUP raise SystemExit, so the
        harness's own ``finally`` still stops the servers it started. Ignored signals stay ignored.
        """
        atexit.register(self.restore)
        for signum in SIGNALS:
            with contextlib.suppress(ValueError):  # signal.signal outside the main thread
                current = signal.getsignal(signum)
                if current is not signal.SIG_IGN:
                    self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        previous = self._handlers.get(signum)
        self.restore()
        if not callable(previous):  # SIG_DFL: end the run, through the harness's finally
            raise SystemExit(128 + signum)
        previous(signum, frame)


def steer(mode: str, client_cores: set[int], server_cores: set[int], clients: int = 0,
          queues: Path = QUEUES, backlog: Path = BACKLOG, softnet: Path = SOFTNET) -> Steering:
    """Point every loopback receive queue at ``client_cores`` (mode ``client``), or leave it.

    The backlog is raised to ``BACKLOG_PER_CLIENT`` packets per client of the session (never
    lowered). Anything that prevents either (not root, read-only sysfs, no RPS in the kernel, one
    core) is said in one line on stderr, and the run goes on as ``sender``: the kernel default.
    """
    if mode == "sender":
        return Steering("sender", reason="--loopback-rx sender", softnet=softnet)
    mask = cpu_mask(client_cores)
    files = sorted(queues.glob("rx-*/rps_cpus"))
    reason = ""
    if not files:
        reason = f"no {queues}/rx-*/rps_cpus (a kernel without RPS?)"
    elif client_cores & server_cores:
        reason = "the clients share the server's core"
    if reason:
        return _fallback(reason, softnet)
    steering = Steering("client", mask, softnet=softnet)
    path = backlog
    try:
        current = int(backlog.read_text())
        steering.backlog = max(current, BACKLOG_PER_CLIENT * clients)
        if steering.backlog > current:
            backlog.write_text(str(steering.backlog))
            steering.previous[backlog] = str(current)
        for path in files:
            old = path.read_text().strip()
            path.write_text(mask)
            steering.previous[path] = old
    except (OSError, ValueError) as error:
        steering.restore()
        return _fallback(f"cannot set {path} ({getattr(error, 'strerror', None) or error})",
                         softnet)
    steering.guard()
    return steering


def _fallback(reason: str, softnet: Path) -> Steering:
    print(f"loopback-rx: {reason}; the numbers include the clients' TCP receive work on the "
          "server core (--loopback-rx sender)", file=sys.stderr)
    return Steering("sender", reason=reason, softnet=softnet)
