"""The one retry delay: capped, exponential, jittered, and finite however long failures last."""

from __future__ import annotations

import random

import pytest

from changerelay.backoff import Backoff


def delays(backoff: Backoff, count: int) -> list[float]:
    return [backoff.delay() for _ in range(count)]


def test_each_delay_doubles_within_half_of_its_ceiling_up_to_the_cap():
    random.seed(1)
    backoff = Backoff(base=0.25, cap=10.0)
    for failures, delay in enumerate(delays(backoff, 12), start=1):
        ceiling = min(10.0, 0.25 * 2 ** (failures - 1))
        assert ceiling / 2 <= delay <= ceiling, (failures, delay)
    assert backoff.failures == 12


def test_a_crowd_that_failed_together_spreads_out():
    spread = {round(Backoff(base=1.0, cap=30.0).delay(), 6) for _ in range(50)}
    assert len(spread) > 40


@pytest.mark.parametrize("failures", [1100, 5000])
def test_failures_that_go_on_for_days_still_wait_at_most_the_cap(failures):
    """A MongoDB that is down for hours fails the relay's reopen thousands of times; the
    float 0.25 * 2 ** 1100 overflows, which would end the change-stream loop for good."""
    backoff = Backoff(base=0.25, cap=10.0)
    for _ in range(failures):
        delay = backoff.delay()
    assert 5.0 <= delay <= 10.0


def test_reset_starts_over():
    backoff = Backoff(base=0.5, cap=30.0)
    delays(backoff, 8)
    backoff.reset()
    assert backoff.failures == 0 and backoff.delay() <= 0.5
