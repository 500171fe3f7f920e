"""The fair pool of catch-up slots (issue 11 item 10): a per-account limit, and round-robin across
peers, so that one peer's many requests cannot starve another's one."""

from __future__ import annotations

import asyncio
import random

import pytest

from changerelay.fairpool import FairPool


class Requests:
    """Requests for a pool's slots, as tasks; records the order they are granted in."""

    def __init__(self, pool: FairPool):
        self.pool = pool
        self.granted: list[str] = []
        self.tasks: dict[str, asyncio.Task] = {}
        self.accounts: dict[str, tuple] = {}

    def ask(self, name: str, *accounts):
        self.accounts[name] = accounts

        async def request():
            await self.pool.acquire(accounts)
            self.granted.append(name)

        self.tasks[name] = asyncio.get_running_loop().create_task(request())

    def release(self, name: str):
        self.pool.release(self.accounts[name])

    async def settle(self):
        """Let every task that can run, run (each acquire is one await on its own future)."""
        for _ in range(5):
            await asyncio.sleep(0)


async def test_a_peer_with_many_queued_requests_delays_another_by_one_turn_at_most():
    requests = Requests(FairPool(size=1, per_key=10))
    for n in range(1, 6):
        requests.ask(f"a{n}", "A")
    await requests.settle()
    requests.ask("b1", "B")
    requests.ask("c1", "C")
    await requests.settle()
    for name in ("a1", "a2", "b1", "c1", "a3", "a4"):
        requests.release(name)
        await requests.settle()
    assert requests.granted == ["a1", "a2", "b1", "c1", "a3", "a4", "a5"]


async def test_no_account_holds_more_than_its_share_while_others_get_free_slots():
    pool = FairPool(size=4, per_key=2)
    requests = Requests(pool)
    for n in range(1, 5):
        requests.ask(f"a{n}", "A")
    requests.ask("b1", "B")
    await requests.settle()
    assert requests.granted == ["a1", "a2", "b1"]  # a3 and a4 wait: A holds its two
    assert pool.held == 3 and pool.waiting == 2
    requests.release("a1")
    await requests.settle()
    assert requests.granted[-1] == "a3"


async def test_a_token_subject_is_limited_across_addresses():
    requests = Requests(FairPool(size=8, per_key=2))
    for peer in ("P1", "P2", "P3"):
        requests.ask(peer, peer, "sub alice")
    requests.ask("bob", "P3", "sub bob")
    await requests.settle()
    assert requests.granted == ["P1", "P2", "bob"]
    requests.release("P1")
    await requests.settle()
    assert requests.granted[-1] == "P3"


async def test_hostile_peer_with_fifty_requests_does_not_starve_an_honest_one():
    requests = Requests(FairPool(size=2, per_key=1))
    for n in range(50):
        requests.ask(f"h{n}", "hostile")
    await requests.settle()
    requests.ask("honest", "honest")
    await requests.settle()
    assert requests.granted == ["h0", "honest"]  # the free slot went to the honest peer


async def test_a_cancelled_request_leaves_the_queue_and_a_granted_one_gives_its_slot_back():
    pool = FairPool(size=1, per_key=1)
    requests = Requests(pool)
    requests.ask("a", "A")
    requests.ask("b", "B")
    requests.ask("c", "C")
    await requests.settle()
    requests.tasks["b"].cancel()
    await requests.settle()
    assert pool.waiting == 1
    requests.release("a")
    await requests.settle()
    assert requests.granted == ["a", "c"]

    requests.release("c")
    async with pool.hold(("D",)):
        pass  # released on the way out
    waiter = asyncio.get_running_loop().create_task(pool.acquire(("E",)))
    await requests.settle()
    assert pool.held == 1
    async with asyncio.timeout(1):
        await waiter
    pool.release(("E",))
    assert pool.held == 0 and pool.waiting == 0


@pytest.mark.parametrize("seed", range(20))
async def test_random_traffic_keeps_the_limits_and_serves_everyone(seed):
    rng = random.Random(seed)
    size, per_key = rng.randint(1, 4), rng.randint(1, 3)
    pool = FairPool(size, per_key)
    holding: dict[str, int] = {}
    most = [0]
    done = []

    async def client(name, peer):
        async with pool.hold((peer,)):
            holding[peer] = holding.get(peer, 0) + 1
            most[0] = max(most[0], pool.held)
            assert holding[peer] <= per_key and pool.held <= size
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            holding[peer] -= 1
        done.append(name)

    tasks = [asyncio.get_running_loop().create_task(client(n, f"p{rng.randint(0, 5)}"))
             for n in range(60)]
    for task in rng.sample(tasks, 5):
        task.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(done) == 55
    assert pool.held == 0 and pool.waiting == 0
