"""The code version in every run's config.json (runtime/version.py), outside the fingerprint."""

import json
import os
import subprocess

import pytest

import runtime
from runtime import ownership, version
from runtime.ownership import claim_run, release_run, start_run
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def _fresh_cache():
    version.code_version.cache_clear()
    yield
    version.code_version.cache_clear()


def _git(folder, *args) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c",
                           "user.email=t@t", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_config_json_records_the_code_version_and_the_fingerprint_does_not(tmp_path,
                                                                           monkeypatch):
    folder = str(tmp_path / "run")
    claim = claim_run(folder, {"seed": 0})
    start_run(claim, {"seed": 0, "epochs": 1})
    config = json.load(open(os.path.join(folder, "config.json")))
    head = _git(ROOT, "rev-parse", "HEAD")
    assert config["code"]["version"] == runtime.__version__
    assert config["code"]["commit"] in (head, f"{head}+dirty")
    assert json.load(open(os.path.join(folder, "fingerprint.json"))) == {"seed": 0}
    release_run(folder)
    # Other code resumes the run (no RunMismatch) and config.json says which code it was.
    monkeypatch.setattr(ownership, "code_version", lambda: {"version": "9.9.9"})
    claim = claim_run(folder, {"seed": 0})
    start_run(claim, {"seed": 0, "epochs": 2})
    assert json.load(open(os.path.join(folder, "config.json")))["code"] == {"version": "9.9.9"}
    release_run(folder)


def test_the_commit_is_marked_dirty_and_left_out_without_a_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(version, "ROOT", str(repo))
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "run.json").write_text("{}")  # untracked output: still clean
    assert version.code_version() == {"version": runtime.__version__, "commit": head}
    version.code_version.cache_clear()
    (repo / "a.py").write_text("x = 2\n")
    assert version.code_version()["commit"] == f"{head}+dirty"
    version.code_version.cache_clear()
    monkeypatch.setattr(version, "ROOT", str(tmp_path / "nowhere"))
    assert version.code_version() == {"version": runtime.__version__}
    version.code_version.cache_clear()
    monkeypatch.setattr(version, "ROOT", str(repo))
    monkeypatch.setenv("PATH", str(tmp_path / "no-git"))  # git itself missing
    assert version.code_version() == {"version": runtime.__version__}
