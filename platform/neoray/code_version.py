"""Which code a run ran: recorded in every checkpoint manifest and on every MLflow run, so a
result can be traced to a commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def code_version() -> str:
    """The git commit of the code (with "+dirty" for local changes), else the package version.
    A job submitted to Ray runs without git history: `neoray submit` passes the submitter's
    version in NEORAY_CODE_VERSION."""
    if version := os.environ.get("NEORAY_CODE_VERSION"):
        return version
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=source,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from neoray import __version__

    return __version__
