"""The container files say what the README promises. No Docker engine runs here, so these are
checked as files: valid against the Compose specification, and the facts that matter present."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ruamel.yaml import YAML

from tests.support import ROOT

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def compose() -> dict:
    return YAML(typ="safe").load(COMPOSE.read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_compose_file_is_valid_against_the_compose_specification():
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", COMPOSE],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mongodb_is_a_replica_set_initiated_with_the_name_the_relay_uses():
    services = compose()["services"]
    mongo, relay = services["mongo"], services["relay"]
    assert re.fullmatch(r"mongo:8(\.\d+)*", mongo["image"])
    command = mongo["command"]
    replica_set = command[command.index("--replSet") + 1]
    uri = urlsplit(relay["environment"]["MONGO_SRV"])
    assert f"replicaSet={replica_set}" in uri.query
    init = " ".join(mongo["healthcheck"]["test"])
    assert f'_id: "{replica_set}"' in init
    # The member's host is the relay's host: the service name, never the container's hostname.
    assert f'host: "{uri.netloc}"' in init and uri.hostname == "mongo"
    assert relay["depends_on"]["mongo"]["condition"] == "service_healthy"


def test_relay_service_listens_everywhere_but_checks_the_host():
    environment = compose()["services"]["relay"]["environment"]
    assert environment["HOST"] == "0.0.0.0"
    published = compose()["services"]["relay"]["ports"][0].rsplit(":", 2)
    assert f"localhost:{published[1]}" in environment["ALLOWED_HOSTS"].split(",")


def test_image_runs_unprivileged_with_a_readiness_healthcheck():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(args for name, args in steps if name == "ENV")
    assert "HOST=0.0.0.0" in env
    [healthcheck] = [args for name, args in steps if name == "HEALTHCHECK"]
    assert "/readyz" in healthcheck
    [command] = [args for name, args in steps if name == "CMD"]
    assert shlex.split(command.strip("[]").replace(",", " ")) == ["changerelay"]
