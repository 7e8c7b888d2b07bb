"""Every binary that reads a run, as users run it, on a run whose checkpoints are damaged:
past a damaged newest checkpoint it uses the one before, says so in one line and records
which one it used; with none intact, or a damaged prefix named explicitly, one line and exit 1.

One tiny pretraining run (two checkpoints, steps 4 and 8) is made once for the module; each
test damages a copy of it.
"""

import glob
import json
import os
import shutil
import subprocess

import pytest

from models.checkpoints import check_checkpoint, read_checkpoint
from tests.helpers import run_module

pytestmark = pytest.mark.slow

QUICK = ["--batch_size=256", "--nat_dim=16", "--steps_per_loop=2", "--export_dir=none",
         "--final_eval=none", "--probe_every_epochs=0", "--crop=pad"]
TRUNCATED = ("truncated: Read less bytes than requested, reading "
             "_CHECKPOINTABLE_OBJECT_GRAPH")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained") / "run"
    made = run_module("train.pretrain", f"--model_dir={folder}", "--epochs=2", *QUICK,
                      timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    assert sorted(os.path.basename(p) for p in glob.glob(f"{folder}/*.index")) == [
        "ckpt-4.index", "ckpt-8.index"]
    return folder


def _copy(pretrained, tmp_path) -> str:
    run = tmp_path / "run"
    shutil.copytree(pretrained, run, ignore=shutil.ignore_patterns(".lock"))
    return str(run)


def _truncate(prefix):
    os.truncate(f"{prefix}.data-00000-of-00001", 200000)


def _flip(prefix):
    path = f"{prefix}.data-00000-of-00001"
    with open(path, "r+b") as f:
        f.seek(1000)
        data = f.read(8)
        f.seek(1000)
        f.write(bytes(b ^ 0xFF for b in data))


def _read(run, reader, out) -> subprocess.CompletedProcess:
    args = {
        "evaluation.linear_probe": [f"--pretrained={run}", "--endpoints=sc",
                                    "--labels_per_class=2", "--splits=1",
                                    "--max_test_examples=30", f"--output_dir={out}"],
        "evaluation.finetune": [f"--pretrained={run}", "--labels_per_class=2", "--seeds=0,1",
                                "--epochs=1", "--max_test_examples=30", f"--output_dir={out}"],
        "serving.export": [f"--pretrained={run}", f"--export_base={out}"],
        "train.pretrain": [f"--model_dir={run}", "--epochs=3", *QUICK],
    }[reader]
    return run_module(reader, *args, timeout=600)


def _used(reader, run, out, finished) -> dict:
    """{"path", "step"} of the checkpoint the reader says it used, from its own outputs."""
    if reader == "evaluation.linear_probe":
        return json.loads((out / "probe.json").read_text())["checkpoint"]
    if reader == "evaluation.finetune":
        written = json.loads((out / "finetune.json").read_text())
        assert {r["init"] for r in written["runs"]["pretrained"]} == {
            written["checkpoint"]["path"]}  # both seeds: the one checkpoint
        return written["checkpoint"]
    if reader == "serving.export":
        (asset,) = glob.glob(f"{out}/nin_mnist/1/assets/*.json")
        with open(asset) as f:
            metadata = json.load(f)
        return {"path": metadata["checkpoint"], "step": metadata["checkpoint_step"]}
    line = next(line for line in finished.stdout.splitlines() if " resumed " in line)
    path, step = line.split("; resumed ")[1].split(" at step ")
    return {"path": path, "step": int(step)}


@pytest.mark.parametrize("reader, damage", [
    ("evaluation.linear_probe", _truncate), ("evaluation.finetune", _truncate),
    ("serving.export", _truncate), ("train.pretrain", _truncate),
    ("serving.export", _flip), ("train.pretrain", _flip)])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(pretrained, tmp_path, reader,
                                                                   damage):
    run = _copy(pretrained, tmp_path)
    damage(f"{run}/ckpt-8")
    finished = _read(run, reader, tmp_path / "out")
    assert finished.returncode == 0, finished.stderr[-2000:]
    (line,) = finished.stderr.splitlines()  # the one line, and nothing else
    reason = TRUNCATED if damage is _truncate else "TensorBundle at "
    assert line.startswith(f"warning: skipped damaged checkpoint {run}/ckpt-8 ({reason}")
    assert line.endswith(f"): using {run}/ckpt-4 (step 4) instead")
    if damage is _flip:
        assert "Checksum does not match" in line
    used = _used(reader, run, tmp_path / "out", finished)
    assert {k: used[k] for k in ("path", "step")} == {"path": f"{run}/ckpt-4", "step": 4}
    if reader == "train.pretrain":  # trained on past step 8: its checkpoint is written anew
        check_checkpoint(f"{run}/ckpt-8")
        assert read_checkpoint(run).prefix == f"{run}/ckpt-12"


@pytest.mark.parametrize("reader, flag", [
    ("evaluation.linear_probe", "--pretrained={run}: "), ("train.pretrain", "")])
def test_no_intact_checkpoint_is_one_line_and_exit_1(pretrained, tmp_path, reader, flag):
    run = _copy(pretrained, tmp_path)
    _truncate(f"{run}/ckpt-8")
    _flip(f"{run}/ckpt-4")
    finished = _read(run, reader, tmp_path / "out")
    assert finished.returncode == 1
    (line,) = finished.stderr.splitlines()
    assert line.startswith(f"{reader}: error: {flag.format(run=run)}no intact checkpoint in "
                           f"{run}: all 2 are damaged (newest ckpt-8: {TRUNCATED})")


def test_a_damaged_prefix_named_explicitly_is_one_line_without_fallback(pretrained, tmp_path):
    run = _copy(pretrained, tmp_path)
    _truncate(f"{run}/ckpt-8")
    finished = _read(f"{run}/ckpt-8", "serving.export", tmp_path / "out")
    assert finished.returncode == 1
    assert finished.stderr.splitlines() == [
        f"serving.export: error: checkpoint {run}/ckpt-8 is damaged ({TRUNCATED})"]
