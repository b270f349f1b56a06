"""Which code a run used: the commit and a hash of the uncommitted changes, stored with its results."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def code_version() -> dict:
    """The commit the runs used, and a hash of uncommitted changes (so results can be traced)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": hashlib.sha256(diff).hexdigest()[:16] if diff else None}
