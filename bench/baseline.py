"""Another revision of the relay to measure beside this one (``--baseline REV``).

``git archive`` of REV goes to a directory of its own under ``bench/results/baselines/``, and this
checkout's ``bench/`` is copied over its own: both sides are measured by the same harness, and
only the relay differs. Nothing is registered in the repository (no ``git worktree``): the
directory is plain files, kept for the next run with the same commit.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "bench" / "results" / "baselines"


def checkout(rev: str) -> Path:
    """The directory holding ``rev``'s tree with this checkout's ``bench/``."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.strip()
    root = BASELINES / commit[:12]
    if not (root / "server.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                           stdout=archive)
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(root, filter="data")
    shutil.rmtree(root / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", root / "bench",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    return root
