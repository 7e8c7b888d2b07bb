"""Pretraining under faults, as a careful user would meet them: two runs on one folder, SIGKILLs
at chosen and random moments across restarts, a full and a read-only disk, an image that
vanishes during training. A run folder must stay one run's, every failure must be one line
with exit status 1, and a run that is killed and restarted must end bitwise equal to one that
was not.

Runs are tiny (digits, batch 256: 4 steps per epoch, 2 epochs, a checkpoint every 2 steps, a
probe every epoch). The uninterrupted reference trains in the background while the killed
run goes through its restarts. Disk faults need a tmpfs this process may mount; where it may
not, those tests are skipped with the mount's own reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from runtime.ownership import release_run
from tests.helpers import (
    ROOT,
    assignment,
    checkpoint_tensors,
    folder_contents,
    is_permutation,
    scalars,
    test_env,
)
from train import pretrain
from train.config import TrainConfig
from train.trainer import Trainer

pytestmark = pytest.mark.slow

TRAINING = ["--batch_size=256", "--nat_dim=16", "--epochs=2", "--steps_per_loop=1",
            "--checkpoint_every=2"]
FLAGS = [*TRAINING, "--probe_every_epochs=1", "--probe_splits=1", "--final_eval=probe"]
STEPS = 8
KILL_SEED = 14
LITTER = re.compile(r".+-\d+_temp|.*\.tempstate\d*|\.tmp-\d+-\d+|\..+\.tmp\d+(\.\w+)?")


def _start(model_dir, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train.pretrain", f"--model_dir={model_dir}", *(flags or FLAGS)],
        cwd=ROOT, env=test_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _litter(model_dir) -> list[str]:
    """Temporaries anywhere under a run folder (what only a dead process leaves)."""
    return sorted(os.path.relpath(os.path.join(root, name), model_dir)
                  for root, dirs, files in os.walk(model_dir) for name in dirs + files
                  if LITTER.fullmatch(name))


def _latest_step(model_dir) -> int:
    latest = tf.train.latest_checkpoint(str(model_dir)) if os.path.isdir(model_dir) else None
    return int(latest.rsplit("-", 1)[1]) if latest else -1


class Background:
    """Processes started now and waited for when first needed."""

    def __init__(self, processes: list[subprocess.Popen]):
        self.processes, self.outputs = processes, None

    def wait(self) -> list[tuple[subprocess.Popen, str, str]]:
        if self.outputs is None:
            self.outputs = [(p, *p.communicate(timeout=900)) for p in self.processes]
        return self.outputs


@pytest.fixture(scope="module")
def two_starts(tmp_path_factory):
    """Two identical runs started at once on one folder (the winner is the reference run):
    (folder, Background)."""
    model_dir = str(tmp_path_factory.mktemp("faults") / "reference")
    return model_dir, Background([_start(model_dir), _start(model_dir)])


@pytest.fixture(scope="module")
def reference(two_starts):
    """The uninterrupted run: (folder, its stdout)."""
    model_dir, background = two_starts
    finished = [(out, err) for p, out, err in background.wait() if p.returncode == 0]
    assert len(finished) == 1, [err[-2000:] for _, _, err in background.wait()]
    return model_dir, finished[0][0]


def _kill_when(process, ready, rng) -> None:
    """SIGKILL `process` when `ready()` first holds: at once if it says "now", else after a
    random pause of up to 0.3 s. A process that ends first is not killed."""
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        state = ready()
        if state:
            if state != "now":
                time.sleep(rng.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(timeout=60)


def _writing(folder: str, test) -> bool:
    """True while `folder` holds a temporary that `test(name)` recognises."""
    return os.path.isdir(folder) and any(test(name) for name in os.listdir(folder))


def _holder(model_dir: str) -> str:
    """The PID an accepted start wrote into the lock file ("" before that)."""
    try:
        with open(os.path.join(model_dir, ".lock")) as f:
            return f.read().strip()
    except OSError:
        return ""


def _refused_while_live(model_dir: str, process, capsys) -> None:
    """Once `process` owns the folder, another process with another seed (whose checkpoints
    would mix with the run's) stops at once and writes nothing."""
    while _holder(model_dir) != str(process.pid):
        assert process.poll() is None, "the run ended before it could be joined"
        time.sleep(0.01)
    tic = time.time()
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["train.pretrain", f"--model_dir={model_dir}", *FLAGS, "--seed=1"])
    assert exit_info.value.code == 1 and time.time() - tic < 30
    assert capsys.readouterr().err == (
        f"train.pretrain: error: {model_dir} is in use by another process (PID {process.pid}): "
        "wait for it to end, or use another --model_dir\n")
    with open(os.path.join(model_dir, "fingerprint.json")) as f:
        assert json.load(f)["seed"] == 0


def test_sigkills_at_chosen_and_random_moments_end_bitwise_equal_to_an_uninterrupted_run(
        two_starts, tmp_path, capsys):
    model_dir = str(tmp_path / "killed")
    export_base = os.path.join(model_dir, "export", "nin_mnist")
    rng = random.Random(KILL_SEED)
    target, delay = rng.randint(3, 6), rng.uniform(1.0, 8.0)
    plan = [  # what each start's kill aims at; ready(start time) says when
        ("a checkpoint being written", lambda t0: "now" if _writing(
            model_dir, lambda n: n.endswith("_temp")) else _latest_step(model_dir) >= 4),
        (f"training after step {target}", lambda t0: _latest_step(model_dir) >= target),
        ("the export being written", lambda t0: "now" if _writing(
            export_base, lambda n: n.startswith(".tmp-")) else False),
        (f"start-up, {delay:.1f} s in", lambda t0: time.time() - t0 > delay),
    ]
    history, outputs = [], []
    for i, (aim, ready) in enumerate(plan):
        process, started = _start(model_dir), time.time()
        if i == 1:
            _refused_while_live(model_dir, process, capsys)
        _kill_when(process, lambda r=ready, t0=started: r(t0), rng)
        outputs.append(process.stdout.read())
        history.append(f"{aim}: exit {process.returncode} at checkpoint "
                       f"{_latest_step(model_dir)}, leaving {_litter(model_dir)}")
        if os.path.exists(os.path.join(model_dir, "checkpoint")):
            assert is_permutation(assignment(model_dir))
    killed = sum(f"exit {-signal.SIGKILL} " in line for line in history)
    assert killed >= 3, history  # a process may end before its moment comes
    final = _start(model_dir)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-2000:]
    outputs.append(out)
    resumes = sum("; resumed " in text for text in outputs)
    removed = [line for text in outputs for line in text.splitlines()
               if line.startswith("removed ")]
    with capsys.disabled():
        print("\n".join(["", *history, f"kills {killed}, resumes {resumes}", *removed]))
    assert _litter(model_dir) == []
    reference_dir, reference_out = _reference(two_starts)
    _assert_same_run(reference_dir, model_dir)

    # Rerunning the finished run recomputes nothing and changes nothing (but the lock file,
    # which names its latest owner).
    before = folder_contents(model_dir)
    again = _start(model_dir)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert (f"the run finished at step {STEPS}: results from results.json, nothing retrained "
            "or exported") in out
    with open(os.path.join(model_dir, "results.json")) as f:
        table = json.load(f)["final_table"]
    assert table and f"\n{table}\n" in out and f"\n{table}\n" in reference_out
    after = folder_contents(model_dir)
    assert after.pop(".lock") == f"{again.pid}\n".encode()
    before.pop(".lock")
    assert after == before


def _reference(two_starts) -> tuple[str, str]:
    """The two runs started at once: exactly one trained, the other stopped with one line
    naming the winner; returns (the winner's folder, its stdout)."""
    model_dir, background = two_starts
    runs = sorted(background.wait(), key=lambda run: run[0].returncode)
    (winner, out, err), (loser, _, refused) = runs
    assert (winner.returncode, loser.returncode) == (0, 1), err[-2000:]
    assert refused == (f"train.pretrain: error: {model_dir} is in use by another process (PID "
                       f"{winner.pid}): wait for it to end, or use another --model_dir\n")
    return model_dir, out


def _assert_same_run(reference_dir: str, model_dir: str) -> None:
    """The final checkpoint, results.json, the probe history and plot and the export of two
    runs are bitwise equal (the run folders' own paths aside)."""
    want = checkpoint_tensors(os.path.join(reference_dir, f"ckpt-{STEPS}"))
    got = checkpoint_tensors(os.path.join(model_dir, f"ckpt-{STEPS}"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    version = os.path.join("export", "nin_mnist", "1")
    for name in ("results.json", "probe_history.json", f"{version}/assets/features.json"):
        with open(os.path.join(model_dir, name)) as a, \
                open(os.path.join(reference_dir, name)) as b:
            assert a.read().replace(model_dir, "<run>") == b.read().replace(reference_dir,
                                                                            "<run>"), name
    variables = os.path.join(version, "variables")
    for name in ("probe.png", *(os.path.join(variables, f) for f in
                                os.listdir(os.path.join(reference_dir, variables)))):
        with open(os.path.join(model_dir, name), "rb") as a, \
                open(os.path.join(reference_dir, name), "rb") as b:
            assert a.read() == b.read(), name
    for folder in (model_dir, reference_dir):
        assert sorted(os.listdir(os.path.join(folder, "export", "nin_mnist"))) == [".lock", "1"]


def test_the_reference_run_probes_exports_and_reports(two_starts):
    model_dir, out = _reference(two_starts)
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    assert results["steps"] == STEPS and results["epochs"] == 2
    rows = results["final"]["probe"]["rows"]
    assert {row["init"] for row in rows} == {"pretrained", "random init, BN at init",
                                             "random init, BN calibrated", "pixels"}
    for view, gap in results["final"]["probe"]["gaps"].items():
        randoms = {r["init"]: r["mean"] for r in rows if r["view"] == view
                   and r["init"].startswith("random init")}
        assert gap["against"] == max(randoms, key=randoms.get)
        assert f"pretrained - {gap['against']} (the stronger" in results["final_table"]
    assert results["final_table"] and f"\n{results['final_table']}\n" in out
    assert [entry[0] for entry in results["probe_history"]] == [1, 2]
    assert all(0.1 < entry[1] <= 1.0 for entry in results["probe_history"])
    assert results["last_loss"] == pytest.approx(scalars(model_dir)["loss"][-1], rel=1e-6)
    with open(os.path.join(model_dir, "probe.png"), "rb") as f:
        assert f.read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["export"] == os.path.join(model_dir, "export", "nin_mnist", "1")
    assert {"loss", "lr", "images_per_sec", "probe/accuracy"} <= set(scalars(model_dir))
    assert _litter(model_dir) == []


# ------------------------------------------------------------------------------- disks


def _mount(path, *options: str) -> None:
    """Mount a tmpfs on `path` with `options`, or skip the test with the mount's reason."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(done.stderr or done.stdout).strip()}); the "
                    "disk faults need one")


def _unmount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _pretrain_in_process(model_dir: str, capsys, *flags: str) -> tuple[int, str, str]:
    """`python -m train.pretrain` run in this process: (exit status, stdout, stderr)."""
    try:
        pretrain.main(["train.pretrain", f"--model_dir={model_dir}", *flags])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    finally:
        release_run(model_dir)
    out, err = capsys.readouterr()
    return status, out, err


def test_a_full_disk_is_one_line_and_the_rerun_with_space_resumes_exactly(two_starts, tmp_path,
                                                                         capsys):
    disk = tmp_path / "disk"
    # Room for the first checkpoints (about 0.5 MB each), not for all of them.
    _mount(disk, "size=1200k")
    try:
        model_dir = str(disk / "run")
        flags = [*TRAINING, "--probe_every_epochs=0", "--final_eval=none", "--export_dir=none"]
        status, _, err = _pretrain_in_process(model_dir, capsys, *flags)
        assert status == 1
        assert err == (f"train.pretrain: error: no space left on the device of {model_dir}; "
                       "free some space and rerun (a run resumes from its last complete "
                       "checkpoint)\n")
        last = _latest_step(model_dir)
        assert 0 < last < STEPS and _litter(model_dir)
        kept = folder_contents(model_dir)
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        status, out, err = _pretrain_in_process(model_dir, capsys, *flags)
        assert status == 0, err
        assert f"resumed {model_dir}/ckpt-{last} at step {last}" in out
        assert f"temporary files of an interrupted process from {model_dir}: ckpt-" in out
        assert _litter(model_dir) == []
        for name in (f"ckpt-{last}.index", f"ckpt-{last}.data-00000-of-00001"):
            assert folder_contents(model_dir)[name] == kept[name]  # never touched
        reference_dir, _ = _reference(two_starts)
        want = checkpoint_tensors(os.path.join(reference_dir, f"ckpt-{STEPS}"))
        got = checkpoint_tensors(os.path.join(model_dir, f"ckpt-{STEPS}"))
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    finally:
        _unmount(disk)


def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    disk = tmp_path / "read_only"
    _mount(disk, "size=1m", "ro")
    try:
        status, _, err = _pretrain_in_process(str(disk / "run"), capsys, *TRAINING)
        assert status == 1
        assert err == (f"train.pretrain: error: cannot write {disk / 'run'}: read-only file "
                       "system; choose a folder you can write to\n")
    finally:
        _unmount(disk)


# ------------------------------------------------------------------------------- data


def test_an_image_deleted_during_training_is_skipped_named_and_the_run_resumes(tmp_path,
                                                                             capsys):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken from the start")
    config = TrainConfig(model_dir=str(tmp_path / "run"), dataset=f"folder:{root}",
                         batch_size=16, epochs=3, nat_dim=8, steps_per_loop=1,
                         checkpoint_every=1, probe_every_epochs=0)
    said = []

    def vandal(model, epochs_done, step, writer, log, chief):  # after epoch 1, a file goes
        # and another breaks
        if epochs_done == 1:
            os.remove(root / "7.png")
            (root / "12.png").write_bytes(b"no longer an image")

    trainer = Trainer(config, tf.distribute.get_strategy(), log=said.append, hooks=[vandal])
    trainer.train()
    trainer.close()
    assert trainer.step == 6 and is_permutation(trainer.nat.assignment.numpy())
    # (while it trains, the trainer logs through its progress bar, on stdout)
    lines = [*said, *capsys.readouterr().out.splitlines()]
    logged = [line.strip() for line in lines if "skipped" in line or "left out" in line]
    assert logged[0] == (f"dataset folder:{root}: 1 unreadable files left out (broken.png); "
                         f"each is listed with its reason in {config.model_dir}/skipped.json")
    refilled = "; batches are refilled from the epoch's other images (listed in skipped.json)"
    assert sorted(logged[1:]) == [
        f"skipped {root}/12.png: Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, "
        f"BMP, WebP required.{refilled}",
        f"skipped {root}/7.png: cannot read: No such file or directory{refilled}"]
    with open(os.path.join(config.model_dir, "skipped.json")) as f:
        recorded = json.load(f)
    assert [(e["path"], e["when"]) for e in recorded] == [
        (f"{root}/12.png", "training"), (f"{root}/7.png", "training"),
        (f"{root}/broken.png", "scan")]
    with open(os.path.join(config.model_dir, "images.txt")) as f:
        assert f.read().splitlines() == sorted(f"{i}.png" for i in range(40))
    # The run stays resumable: the same 40 indices, the same fingerprint, one more epoch.
    shutil.copy(root / "0.png", root / "new.png")  # a new file does not join the run
    more = Trainer(dataclasses.replace(config, epochs=4), tf.distribute.get_strategy(),
                   log=said.append)
    assert more.restored_from.endswith("at step 6") and more.source.num_examples == 40
    more.train()
    more.close()
    assert more.step == 8 and is_permutation(more.nat.assignment.numpy())
