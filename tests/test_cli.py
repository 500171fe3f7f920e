"""The command line: one ``changerelay`` command with the server, ``tail`` and ``token``."""

from __future__ import annotations

import subprocess
import sys

import jwt
import pytest

from changerelay import mint
from tests.support import ROOT, WS

SECRET = "cli-secret-" + "x" * 32


def run(*argv, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.mark.parametrize(("argv", "usage"), [
    (["-m", "changerelay", "--help"], "usage: changerelay [-h]"),
    (["server.py", "--help"], "usage: server.py [-h]"),
    (["-m", "changerelay", "tail", "--help"], "usage: changerelay tail [-h]"),
    (["-m", "changerelay", "token", "--help"], "usage: changerelay token [-h]"),
])
def test_help_names_the_command_it_was_run_as(argv, usage):
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)


def test_token_carries_the_claims_asked_for():
    result = run("-m", "changerelay", "token", "--secret", SECRET, "--sub", "alice",
                 "--ns", "shop.orders,shop.users", "--ns", "audit",
                 "--filter", '{"fullDocument.owner": "alice"}', "--ttl", "60")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["ns"] == ["shop.orders", "shop.users", "audit"]
    assert claims["filter"] == {"fullDocument.owner": "alice"}
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize(("argv", "complaint"), [
    (["--secret", SECRET, "--filter", '{"$where": "1"}'], "--filter"),
    (["--secret", SECRET, "--ttl", "0"], "--ttl"),
    (["--secret", SECRET, "--ns", " , "], "--ns is empty"),
    (["--secret", SECRET, "--algorithm", "RS256"], "--private-key"),
    ([], "--secret"),
])
def test_token_refuses_what_the_relay_would_refuse(argv, complaint):
    result = run("-m", "changerelay", "token", *argv, env={"PATH": "/usr/bin"})
    assert result.returncode == 2
    assert complaint in result.stderr


def test_token_default_secret_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTH_JWT_SECRET", SECRET)
    args = mint.build_parser("changerelay token").parse_args(["--sub", "bob"])
    claims = mint.claims_from(args, now=1_000)
    assert claims == {"iat": 1000, "exp": 4600, "sub": "bob"}


@pytest.mark.e2e
async def test_a_minted_token_is_admitted_and_its_namespaces_enforced(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, AUTH_JWT_SECRET=SECRET)
    relay.wait_ready()
    minted = run("-m", "changerelay", "token", "--secret", SECRET, "--ns", f"{mongo.db}.orders")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    client = await WS.connect(relay.ws_url + "?access_token=" + token)
    mongo.client[mongo.db].other.insert_one({"_id": "not for this token"})
    mongo.client[mongo.db].orders.insert_one({"_id": "for this token"})
    [change] = await client.changes(1)
    assert change["documentKey"] == {"_id": "for this token"}
    refused = relay.get(f"/socket?ns={mongo.db}.other&access_token={token}")
    assert refused.code == 403
