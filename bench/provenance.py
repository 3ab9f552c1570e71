"""Which code a benchmark measured: its commit, whether it had uncommitted changes, and a hash of it.

Figures are only worth comparing when they say what they measured; the hash
also tells whether the code changed on disk while a long run was going.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The repository root: benchmarks measure the packages beside this folder.
SOURCE = Path(__file__).resolve().parent.parent


def code_fingerprint(packages: Sequence[str]) -> str:
    """A hash of the packages' Python files as they are on disk now."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((SOURCE / package).rglob("*.py")):
            digest.update(str(path.relative_to(SOURCE)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_version(packages: Sequence[str]) -> dict[str, Any]:
    """Where the code under test lives, its commit, and whether it had uncommitted changes."""
    found: dict[str, Any] = {
        "source": str(SOURCE),
        "fingerprint": code_fingerprint(packages),
        "commit": None,
        "dirty": None,
    }
    git = ["git", "-C", str(SOURCE)]
    try:
        found["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--", *packages], capture_output=True, text=True, check=True
        ).stdout.strip()
        found["dirty"] = bool(changes)
    except (OSError, subprocess.CalledProcessError):
        pass
    return found
