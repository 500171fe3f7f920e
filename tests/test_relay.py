"""The relay's periodic jobs, on a real Relay that is not started: no socket, no MongoDB."""

from __future__ import annotations

import time

from changerelay import config as cfg
from changerelay.app import Relay
from changerelay.auth import Claims
from changerelay.catchup import Job
from tests.support import token


class Rider:
    """A client still catching up from MongoDB, whose token expired a minute ago."""

    def __init__(self, expires: float):
        self.claims = Claims(expires, None, None)
        self.peer = "rider"
        self.expired = False

    def expire(self):
        self.expired = True


def relay(**environ) -> Relay:
    return Relay(cfg.load([], environ, dotenv_path=None))


async def test_an_expired_token_ends_a_client_that_is_still_catching_up():
    """``exp`` is enforced on every connection, not only on those already live in the hub."""
    secured = relay(AUTH_JWT_SECRET="s" * 32)
    late, fresh = Rider(time.time() - 60), Rider(time.time() + 60)
    job = Job(token(0), ("peer rider",))
    job.add(late, token(0))
    job.add(fresh, token(0))
    secured.catchup.jobs.append(job)
    secured.expire_tokens()
    assert late.expired and not fresh.expired


async def test_without_auth_no_token_is_checked():
    open_relay = relay()
    rider = Rider(time.time() - 60)
    job = Job(token(0), ("peer rider",))
    job.add(rider, token(0))
    open_relay.catchup.jobs.append(job)
    open_relay.expire_tokens()
    assert not rider.expired
