"""``--loopback-rx``: the mask written and, above all, what is written back.

``rps_cpus`` and ``netdev_max_backlog`` outlive the benchmark and change every loopback
connection on the machine, so the restore paths are tested against a temporary directory
standing in for ``/sys/class/net/lo``, ``/proc/sys/net/core`` and ``/proc/net/softnet_stat``.
"""

from __future__ import annotations

import signal

import pytest

from bench import loopback


class Fake:
    """A stand-in /sys and /proc: two receive queues, the backlog sysctl and softnet_stat."""

    def __init__(self, root):
        self.queues, self.backlog = root / "queues", root / "backlog"
        self.softnet = root / "softnet"
        for name in ("rx-0", "rx-1"):
            (self.queues / name).mkdir(parents=True)
            (self.queues / name / "rps_cpus").write_text("0\n")
        self.backlog.write_text("1000\n")
        self.drops(0)

    def drops(self, n: int) -> None:
        self.softnet.write_text(f"00000010 {n:08x} 00000000\n00000020 00000000 00000000\n")

    def steer(self, mode="client", clients=1000, client_cores=frozenset({1}), server_cores=(0,)):
        return loopback.steer(mode, set(client_cores), set(server_cores), clients,
                              self.queues, self.backlog, self.softnet)

    def values(self):
        return [p.read_text().strip() for p in sorted(self.queues.glob("rx-*/rps_cpus"))] + [
            self.backlog.read_text().strip()]


@pytest.fixture
def fake(tmp_path):
    return Fake(tmp_path)


def test_cpu_mask_in_rps_cpus_format():
    assert loopback.cpu_mask({1}) == "2"
    assert loopback.cpu_mask({1, 2, 3}) == "e"
    assert loopback.cpu_mask({31}) == "80000000"
    assert loopback.cpu_mask({1, 40}) == "100,00000002"


def test_client_mode_writes_mask_and_backlog_and_restores_once(fake):
    before = signal.getsignal(signal.SIGTERM)
    steering = fake.steer(clients=10_000)
    assert fake.values() == ["2", "2", "100000"]
    assert signal.getsignal(signal.SIGTERM) == steering._on_signal
    fake.drops(7)
    record = steering.record()
    assert (record["mode"], record["mask"], record["backlog"], record["dropped"]) == (
        "client", "2", 100_000, 7)
    assert sorted(record["previous"].values()) == ["0", "0", "1000"]
    steering.restore()
    assert fake.values() == ["0", "0", "1000"]
    assert signal.getsignal(signal.SIGTERM) == before
    (fake.queues / "rx-0" / "rps_cpus").write_text("f")  # somebody else's setting, after ours
    steering.restore()
    assert fake.values() == ["f", "0", "1000"]


def test_a_larger_backlog_is_left_alone(fake):
    fake.backlog.write_text("500000\n")
    steering = fake.steer(clients=10_000)
    assert (steering.backlog, fake.values()) == (500_000, ["2", "2", "500000"])
    steering.restore()
    assert fake.values() == ["0", "0", "500000"]


def test_sigterm_restores_and_ends_the_run(fake):
    steering = fake.steer()
    with pytest.raises(SystemExit):
        steering._on_signal(signal.SIGTERM, None)
    assert fake.values() == ["0", "0", "1000"]


def test_sender_mode_leaves_the_kernel_default(fake):
    steering = fake.steer("sender")
    assert steering.mode == "sender" and fake.values() == ["0", "0", "1000"]
    fake.drops(3)
    assert steering.record()["dropped"] == 3


def test_unwritable_queue_falls_back_to_sender_and_undoes_the_rest(fake, capsys):
    (fake.queues / "rx-1" / "rps_cpus").unlink()
    (fake.queues / "rx-1" / "rps_cpus").mkdir()  # unwritable even for root, unlike chmod
    steering = fake.steer(clients=10_000)
    assert steering.mode == "sender" and steering.mask is None
    assert (fake.queues / "rx-0" / "rps_cpus").read_text() == "0"
    assert fake.backlog.read_text() == "1000"
    (line,) = capsys.readouterr().err.splitlines()
    assert "include the clients' TCP receive work on the server core" in line


def test_missing_sysfs_or_one_core_falls_back(fake, tmp_path, capsys):
    fake.queues = tmp_path / "absent"
    assert fake.steer().mode == "sender"
    assert fake.steer(client_cores={0}, server_cores={0}).mode == "sender"
    assert len(capsys.readouterr().err.splitlines()) == 2
