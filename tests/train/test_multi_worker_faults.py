"""Two-worker pretraining (`--strategy=multi_worker`, two processes on loopback ports) under
faults: a worker killed mid-run, the chief killed while it writes a checkpoint, restarts of
every worker with the same command, a rerun of the finished run, and a termination signal.

A killed worker's peer must stop within seconds with one line naming the lost task; a
restart must resume every worker from the run folder's last complete checkpoint and end
bitwise equal to an uninterrupted run; nothing a worker writes for itself may stay behind.

Runs are tiny (digits, batch 256: 4 steps per epoch, 4 epochs, a checkpoint every 2 steps).
The uninterrupted reference trains while the other run goes through its kills.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import (
    ROOT,
    assignment,
    checkpoint_tensors,
    folder_contents,
    free_ports,
    is_permutation,
    test_env,
)

pytestmark = pytest.mark.slow

FLAGS = ["--batch_size=256", "--nat_dim=16", "--epochs=4", "--steps_per_loop=1",
         "--checkpoint_every=2", "--export_dir=none", "--final_eval=none",
         "--probe_every_epochs=0", "--crop=pad", "--strategy=multi_worker"]
STEPS = 16
SURVIVOR_BOUND = 40  # seconds: the coordination service's 10 s heartbeat timeout, on a busy CPU
LITTER = re.compile(r".+-\d+_temp|.*\.tempstate\d*|\..+\.tmp\d+(\.\w+)?")


class Cluster:
    """The two workers of one run folder, on two loopback ports kept across restarts."""

    def __init__(self, model_dir: str, *extra: str):
        self.model_dir, self.extra = model_dir, extra
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]

    def start(self) -> list[subprocess.Popen]:
        """Both workers, started with the same command as every time before."""
        processes = []
        for index in range(2):
            tf_config = json.dumps({"cluster": {"worker": self.addresses},
                                    "task": {"type": "worker", "index": index}})
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "train.pretrain", f"--model_dir={self.model_dir}",
                 *FLAGS, *self.extra], cwd=ROOT,
                env=test_env(TF_CONFIG=tf_config, PYTHONUNBUFFERED="1"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return processes


def _finish(processes) -> list[tuple[str, str]]:
    """(stdout, stderr) of each worker, which must all exit 0."""
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    return outputs


def _latest_step(model_dir: str) -> int:
    latest = tf.train.latest_checkpoint(model_dir) if os.path.isdir(model_dir) else None
    return int(latest.rsplit("-", 1)[1]) if latest else -1


def _kill_when(process, ready) -> None:
    """SIGKILL `process` as soon as `ready()` holds (polled every 2 ms)."""
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the worker ended before its kill"


def _survivor(process, lost: int, cluster: Cluster, since: float) -> tuple[float, str]:
    """The peer of a killed worker: (seconds until it exited, its one line); it must exit 1
    with one line naming the lost task, the step and the last complete checkpoint."""
    _, err = process.communicate(timeout=300)
    seconds = time.time() - since
    assert process.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    latest = re.escape(tf.train.latest_checkpoint(cluster.model_dir))
    assert re.fullmatch(
        rf"train\.pretrain: error: worker {lost} \({re.escape(cluster.addresses[lost])}\) "
        rf"stopped responding at step \d+; the last complete checkpoint is {latest}: restart "
        r"every worker with the same command", lines[0]), lines[0]
    assert seconds < SURVIVOR_BOUND, (seconds, lines[0])
    return seconds, lines[0]


def _resumed(out: str, model_dir: str) -> int:
    found = re.search(rf"; resumed {re.escape(model_dir)}/ckpt-(\d+) at step (\d+)", out)
    assert found and found.group(1) == found.group(2), out[-2000:]
    return int(found.group(1))


def _leftovers(model_dir: str) -> list[str]:
    """Worker copies and temporaries anywhere under a run folder."""
    found = [os.path.relpath(os.path.join(root, name), model_dir)
             for root, dirs, files in os.walk(model_dir) for name in dirs + files
             if LITTER.fullmatch(name) or name == ".workers"]
    return sorted(found)


def test_lost_workers_and_restarts_end_bitwise_equal_to_an_uninterrupted_run(
        tmp_path, capsys):
    reference = Cluster(str(tmp_path / "reference"))
    killed = Cluster(str(tmp_path / "killed"))
    background = reference.start()
    history = []

    # (b) worker 1 is killed once a checkpoint exists; worker 0 stops with one line.
    workers = killed.start()
    _kill_when(workers[1], lambda: _latest_step(killed.model_dir) >= 2)
    seconds, line = _survivor(workers[0], 1, killed, time.time())
    at = _latest_step(killed.model_dir)
    assert os.listdir(os.path.join(killed.model_dir, ".workers")) == ["worker-1"]  # its copy
    history.append(f"worker 1 killed at checkpoint {at}; worker 0 exited {seconds:.1f} s "
                   f"later: {line}")

    # (c) restart; the chief is killed while it writes a checkpoint (else right after one).
    workers = killed.start()
    caught = []

    def writing_or_later() -> bool:
        names = os.listdir(killed.model_dir)
        if any(n.endswith("_temp") for n in names) and _latest_step(killed.model_dir) > at:
            caught.append(sorted(n for n in names if n.endswith("_temp")))
            return True
        return _latest_step(killed.model_dir) >= at + 6

    _kill_when(workers[0], writing_or_later)
    seconds, line = _survivor(workers[1], 0, killed, time.time())
    assert _resumed(workers[0].stdout.read(), killed.model_dir) == at
    second = _latest_step(killed.model_dir)
    moment = f"while writing {caught[0]}" if caught else "after checkpoint"
    history.append(f"restarted at {at}; worker 0 killed {moment}, the last complete checkpoint "
                   f"{second}; worker 1 exited {seconds:.1f} s later: {line}")

    # Restart: both workers resume from the last complete checkpoint and finish.
    outputs = _finish(killed.start())
    assert [_resumed(out, killed.model_dir) for out, _ in outputs] == [second, second]
    assert _latest_step(killed.model_dir) == STEPS

    # (a) the uninterrupted run, and the comparison: bitwise equal.
    _finish(background)
    assert _latest_step(reference.model_dir) == STEPS
    assert is_permutation(assignment(reference.model_dir))
    with open(os.path.join(reference.model_dir, "results.json")) as f:
        assert json.load(f)["steps"] == STEPS
    want = checkpoint_tensors(os.path.join(reference.model_dir, f"ckpt-{STEPS}"))
    got = checkpoint_tensors(os.path.join(killed.model_dir, f"ckpt-{STEPS}"))
    assert sorted(got) == sorted(want)
    differ = {key: float(np.max(np.abs(got[key].astype(np.float64) - want[key])))
              for key in want if not np.array_equal(got[key], want[key])}
    with capsys.disabled():
        print("\n".join(["", *history, f"tensors that differ from the uninterrupted run: "
                         f"{differ or 'none'}"]))
    assert differ == {}

    # (d) rerunning the finished run trains nothing on either worker and changes nothing.
    before = folder_contents(killed.model_dir)
    outputs = _finish(killed.start())
    assert [_resumed(out, killed.model_dir) for out, _ in outputs] == [STEPS, STEPS]
    assert (f"the run finished at step {STEPS}: results from results.json, nothing retrained "
            "or exported") in outputs[0][0]
    after = folder_contents(killed.model_dir)
    before.pop(".lock"), after.pop(".lock")
    assert after == before

    # (e) no worker copy and no temporary stays behind, in either run folder.
    assert _leftovers(killed.model_dir) == [] and _leftovers(reference.model_dir) == []


def test_a_termination_signal_to_one_worker_makes_every_worker_save_and_stop(tmp_path):
    run = Cluster(str(tmp_path / "run"), "--epochs=50")  # long enough to be signalled mid-run
    workers = run.start()
    deadline = time.time() + 600
    while _latest_step(run.model_dir) < 2 and time.time() < deadline:
        assert all(p.poll() is None for p in workers), workers[0].stderr.read()[-3000:]
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGTERM)
    lines = []
    for process in workers:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 1, err[-3000:]
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
        lines.append(err.strip())
    step = _latest_step(run.model_dir)
    assert 2 < step < 200
    assert lines == [
        f"train.pretrain: error: stopped by a termination signal at step {step}, after every "
        f"worker saved it (the run's checkpoint {run.model_dir}/ckpt-{step}): restart every "
        "worker with the same command to resume"] * 2
    assert is_permutation(assignment(run.model_dir))
    assert _leftovers(run.model_dir) == []
