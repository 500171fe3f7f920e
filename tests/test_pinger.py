"""The WebSockets to ping, a slice per tick (issue 14): a tick costs its slice, not a walk of
every connection."""

from __future__ import annotations

from changerelay.pinger import Pinger


class Peer:
    """Stands in for a WebSocket client: the pinger only files and hands back its clients."""

    closed = False


def test_each_client_is_handed_back_once_per_round_and_a_tick_holds_its_slice_alone():
    pinger: Pinger[Peer] = Pinger(20)
    peers = [Peer() for _ in range(1000)]
    for peer in peers:
        pinger.add(peer)
    ticks = [pinger.tick() for _ in range(20)]
    assert sorted(map(id, (peer for tick in ticks for peer in tick))) == sorted(map(id, peers))
    assert max(map(len, ticks)) < 1000 // 4  # spread over the slices, not one walk of all
    assert [len(t) for t in (pinger.tick() for _ in range(20))] == [len(t) for t in ticks]


def test_a_client_that_left_is_not_handed_back():
    pinger: Pinger[Peer] = Pinger(3)
    stays, leaves = Peer(), Peer()
    pinger.add(stays)
    pinger.add(leaves)
    pinger.discard(leaves)
    pinger.discard(Peer())  # never added: nothing to forget
    assert [peer for _ in range(3) for peer in pinger.tick()] == [stays]
    assert len(pinger) == 1
