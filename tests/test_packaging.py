"""``pip install .`` gives a working ``changerelay``: its page and static files come with it.

Slow (it builds a wheel and creates a virtual environment), so it carries the ``packaging`` marker
and runs as its own step of ``.ci/run``, not in the README's test command.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.packaging


def _requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\[=<>!~ ]", line, maxsplit=1)[0].lower())
    return names


def test_every_pinned_runtime_dependency_is_declared_by_the_package():
    pinned = (ROOT / "requirements.txt").read_text().splitlines()
    assert all("==" in line for line in pinned if line.strip() and not line.startswith("#"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    extras = {name for group in project.get("optional-dependencies", {}).values()
              for name in _requirement_names(group)}
    assert _requirement_names(pinned) == declared | extras


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install .`` (not editable). Dependencies come from the test venv
    through a .pth file, so that this checks the package, not the package index."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                    str(ROOT)], check=True, cwd=venv)
    return venv


def test_installed_command_serves_the_page_and_static_files_from_anywhere(installed, tmp_path):
    command = installed / "bin" / "changerelay"
    help_text = subprocess.run([command, "--help"], capture_output=True, text=True, cwd=tmp_path,
                               check=True).stdout
    assert help_text.startswith("usage: changerelay ")
    server = subprocess.Popen(
        [command], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PORT": "0", "MONGO_SRV": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200",
             "PATH": "/usr/bin:/bin"})
    try:
        port = None
        for line in server.stdout:
            match = re.search(r"listening on http://[\d.]+:(\d+)/", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the installed changerelay never started listening"
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/", timeout=10) as page:
            assert page.status == 200 and b"/static/app.js" in page.read()
        with urllib.request.urlopen(base + "/static/changerelay.js", timeout=10) as script:
            assert script.status == 200 and b"export function connect" in script.read()
    finally:
        server.terminate()
        server.wait(10)


def test_installed_package_runs_as_a_module_too(installed, tmp_path):
    result = subprocess.run([installed / "bin" / "python", "-m", "changerelay", "token",
                             "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: changerelay token")
