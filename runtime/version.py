"""The version of the code that wrote a run: recorded in every run's config.json
(runtime/ownership.py `start_run`), never in its fingerprint, so that updating the code does
not lock a run out.

    {"version": "0.1.0", "commit": "<git HEAD of the repository>[+dirty]"}

"commit" is left out when git, or the repository, is not there (an installed copy, say);
"+dirty" marks tracked files changed since that commit.
"""

from __future__ import annotations

import functools
import os
import subprocess

from runtime import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    """The output of `git -C ROOT <args>`, or None on any failure."""
    try:
        done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> dict:
    """{"version": __version__, "commit": HEAD (+ "+dirty")} of the code running now; never
    raises (module docstring)."""
    out = {"version": __version__}
    commit = _git("rev-parse", "--verify", "HEAD")
    if commit:
        changes = _git("status", "--porcelain", "--untracked-files=no")
        out["commit"] = commit + ("+dirty" if changes else "")
    return out
