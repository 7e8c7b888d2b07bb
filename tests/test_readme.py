"""Every command of the README runs as written.

The README's ```bash blocks are read in order. Each command is a line with its `\\`
continuations (an inline `# ...` comment is dropped):
- `pip install ... && X`: X is run (this suite runs after the requirements are installed);
- `python -m pytest ...`: not run (it is this suite);
- after a comment line `# needs <what>`, up to the next blank line of the block: the command
  needs data, a server or hours of compute this machine does not have. A `python -m` command
  is run with `--check_flags` (its flags and flagfiles are checked; nothing is loaded or
  written); any other is not run;
- anything else is run in a fresh copy of the repository's top level (symlinks, with a
  `runs/` of its own), in README order, so later commands use the runs of earlier ones. It
  must exit with status 0, write nothing to stderr (no library noise), and create every path
  listed by a `# writes:` comment line right after it.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.helpers import ROOT, test_env


def readme_commands(text: str) -> list[dict]:
    """[{"command", "needs", "writes"}] of the README's bash blocks, in order."""
    commands, in_block, needs, pending = [], False, None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block, needs, pending = stripped == "```bash", None, ""
            continue
        if not in_block:
            continue
        if not stripped:
            needs = None
        elif stripped.startswith("# needs"):
            needs = stripped[len("# needs"):].strip(" :")
        elif stripped.startswith("# writes:") and commands:
            commands[-1]["writes"] += stripped[len("# writes:"):].split()
        elif not stripped.startswith("#"):
            pending += re.sub(r"\s+#.*$", "", stripped)
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            commands.append({"command": " ".join(pending.split()), "needs": needs,
                             "writes": []})
            pending = ""
    return commands


def _runnable(entry: dict) -> str | None:
    """The shell command to run for a README entry, or None when it is not run."""
    command = entry["command"]
    if command.startswith("pip install") and "&&" in command:
        command = command.split("&&", 1)[1].strip()
    if command.startswith("python -m pytest"):
        return None
    if entry["needs"] is not None:
        return command + " --check_flags" if command.startswith("python -m ") else None
    return command


with open(os.path.join(ROOT, "README.md")) as _f:
    COMMANDS = readme_commands(_f.read())
RUNS = [(entry, command) for entry in COMMANDS if (command := _runnable(entry)) is not None]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A fresh checkout's top level: every tracked top-level entry linked, runs/ empty."""
    folder = tmp_path_factory.mktemp("clone")
    for name in os.listdir(ROOT):
        if name not in ("runs", ".git", ".pytest_cache", ".ruff_cache") and \
                not name.startswith("__"):
            os.symlink(os.path.join(ROOT, name), folder / name)
    return folder


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    runnable = [c["command"] for c in COMMANDS]
    assert runnable[0] == "pip install -r requirements.txt && python -m train.pretrain"
    assert runnable[1] == "pip install -q -r requirements-dev.txt && python -m pytest -q"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert runnable[1] in f.read()


@pytest.mark.slow
@pytest.mark.parametrize("entry, command", RUNS,
                         ids=[f"{i:02d}-" + " ".join(c.split()[:4]) for i, (_, c) in
                              enumerate(RUNS)])
def test_readme_command(entry, command, sandbox):
    done = subprocess.run(command, shell=True, cwd=sandbox, env=test_env(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-2500:]}"
    assert done.stderr == "", f"{command} wrote to stderr:\n{done.stderr[-2500:]}"
    missing = [path for path in entry["writes"] if not os.path.exists(sandbox / path)]
    assert not missing, f"{command} did not write {missing}"
