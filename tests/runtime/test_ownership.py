"""Ownership of run folders (runtime/ownership.py): lock, fingerprint, clean-up."""

import json
import os
import signal
import subprocess
import sys

import pytest

from runtime.ownership import RunLocked, RunMismatch, abandon_run, claim_run, release_run, start_run
from tests.helpers import ROOT, folder_contents, make_run_dir, test_env

HOLD = ("import sys, time\n"
        "from runtime.ownership import claim_run\n"
        "claim_run(sys.argv[1], {'seed': 0})\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def test_a_second_process_stops_at_once_and_a_killed_owner_leaves_no_lock(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, folder], cwd=ROOT, env=test_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunLocked) as refused:
            claim_run(folder, {"seed": 0})
        assert str(refused.value) == (f"{folder} is in use by another process (PID "
                                      f"{holder.pid}): wait for it to end, or use another "
                                      "--model_dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The OS released the lock of the killed process: nothing stale is left to remove.
    claim = claim_run(folder, {"seed": 0})
    assert claim.fresh
    assert open(os.path.join(folder, ".lock")).read() == f"{os.getpid()}\n"
    release_run(folder)


def test_a_start_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    folder = str(tmp_path / "run")
    claim = claim_run(folder, {"seed": 0, "lr": 0.05, "model_kwargs": {"head": "nat"}})
    start_run(claim, {"seed": 0, "lr": 0.05, "epochs": 3})
    before = folder_contents(folder)
    with pytest.raises(RunMismatch) as refused:
        claim_run(folder, {"seed": 1, "lr": 0.05, "model_kwargs": {"head": "none"},
                           "crop": "pad"})
    assert str(refused.value) == (
        f"{folder} holds a run with other settings (crop: (none) -> \"pad\"; model_kwargs: "
        '{"head": "nat"} -> {"head": "none"}; seed: 0 -> 1): rerun with the recorded '
        "settings, or use another --model_dir")
    assert folder_contents(folder) == before
    # The same settings are accepted; only config.json (the current settings) may change.
    again = claim_run(folder, {"seed": 0, "lr": 0.05, "model_kwargs": {"head": "nat"}})
    assert not again.fresh
    start_run(again, {"seed": 0, "lr": 0.05, "epochs": 5})
    after = folder_contents(folder)
    assert json.loads(after.pop("config.json"))["epochs"] == 5
    before.pop("config.json")
    assert after == before
    release_run(folder)


def test_a_failed_first_start_leaves_no_folder(tmp_path):
    folder = tmp_path / "fresh"

    def fails():
        raise ValueError("dataset folder:x: no such directory")

    with pytest.raises(ValueError, match="no such directory"):
        claim_run(str(folder), fails)
    assert not folder.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    claim = claim_run(str(existing), {"seed": 0})
    abandon_run(claim)  # e.g. the restore failed: the folder is as it was
    assert folder_contents(existing) == {"notes.txt": b"mine"}


def test_a_folder_of_an_earlier_version_is_refused(tmp_path):
    folder, _ = make_run_dir(tmp_path / "old")
    before = folder_contents(folder)
    with pytest.raises(RunMismatch, match=f"^{folder} holds a run without fingerprint.json "
                       r"\(written by an earlier version of the zoo\): use another --output"):
        claim_run(folder, {"seed": 0}, what="--output_dir")
    assert folder_contents(folder) == before


def test_temporaries_of_dead_processes_are_removed_and_named(tmp_path):
    folder = tmp_path / "run"
    (folder / "ckpt-12_temp").mkdir(parents=True)
    (folder / "ckpt-12_temp" / "part-00000-of-00001.data-00000-of-00001.tempstate77").touch()
    (folder / "ckpt-8.index.tempstate123").touch()
    (folder / f"checkpoint.tmp{'ab' * 16}").touch()
    (folder / ".results.json.tmp4242.json").touch()
    (folder / "fingerprint.json").write_text('{"seed": 0}')
    keep = ["fingerprint.json", "ckpt-8.index", "ckpt-8.data-00000-of-00001", "checkpoint",
            "train", "my_temp", "results.json"]
    for name in keep[1:4] + keep[6:]:
        (folder / name).touch()
    for name in keep[4:6]:
        (folder / name).mkdir()
    claim = claim_run(str(folder), {"seed": 0})
    assert claim.removed == (".results.json.tmp4242.json", f"checkpoint.tmp{'ab' * 16}",
                             "ckpt-12_temp", "ckpt-8.index.tempstate123")
    assert sorted(os.listdir(folder)) == sorted([".lock", *keep])
    release_run(str(folder))
