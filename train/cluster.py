"""What a run over several workers (`--strategy=multi_worker`, MultiWorkerMirroredStrategy
over TF_CONFIG) adds to the trainer: where each worker checkpoints, the coordinated save on a
termination signal, and the one line of a lost worker.

Checkpoints. The run folder (`model_dir`) must be on a filesystem every worker sees. Every
worker restores the run folder's latest complete checkpoint, so a restart of all workers with
the same command resumes all of them from the same step (and a finished run reruns nothing
on any worker); a collective before the restore checks that they see the same checkpoint
(`check_same_start`). Every worker also saves when the chief does (a save may read values that
need all workers), but only the chief writes into `model_dir`; the other workers write a
throwaway copy into `<model_dir>/.workers/<job>-<index>/` (`checkpoint_dir`), which is removed
when the worker ends and, after a death that left it behind, when that worker starts again.

Termination. `Preemption` wraps TensorFlow's `PreemptionCheckpointHandler`: a SIGTERM to
any worker makes every worker finish its current loop, save a checkpoint at the same step and
stop with one line (`Stopped`, exit status 1). Restarting every worker with the same command
resumes from that checkpoint.

Lost workers. A worker that dies without warning (SIGKILL, a lost machine) stops sending
heartbeats to the cluster's coordination service; the others' next collective is aborted. The
trainer turns that error into one line naming the lost task, the step and the last complete
checkpoint (`lost_worker`, a `WorkerLost`), instead of TensorFlow's traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from collections.abc import Callable

import tensorflow as tf

from runtime.errors import UserError
from runtime.files import read_json
from runtime.ownership import FINGERPRINT_FILE, RunMismatch

WORKERS_DIR = ".workers"
RESTART = "restart every worker with the same command"


class WorkerLost(UserError):
    """A peer stopped responding; the message names it and the checkpoint to resume from."""


class Stopped(UserError):
    """A termination signal stopped the run after every worker saved."""


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and exports."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def _resolver(strategy: tf.distribute.Strategy):
    """The cluster resolver of a multi-worker strategy with a cluster, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return None
    return resolver


def checkpoint_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker's manager writes: `model_dir` on the chief, else an emptied
    `<model_dir>/.workers/<job>-<index>/` (module docstring)."""
    resolver = _resolver(strategy)
    if is_chief(strategy) or resolver is None:
        return model_dir
    path = os.path.join(model_dir, WORKERS_DIR, f"{resolver.task_type}-{resolver.task_id}")
    shutil.rmtree(path, ignore_errors=True)  # a copy a killed process of this task left
    os.makedirs(path)
    return path


def remove_checkpoint_dir(path: str, model_dir: str) -> None:
    """Remove a non-chief's copy (and `.workers/` once it is empty); no-op on the chief."""
    if os.path.normpath(path) == os.path.normpath(model_dir):
        return
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # another worker's copy is still there


def check_same_start(strategy: tf.distribute.Strategy, model_dir: str) -> None:
    """`UserError` when the workers do not see the same latest checkpoint in `model_dir` (a
    folder that is not shared, or not the same folder), before anything is restored; a no-op
    without a cluster. One all-reduce of (s, s^2, 1), s the checkpoint's step (-1 for none):
    the steps are all equal iff n * sum(s^2) == sum(s)^2."""
    if _resolver(strategy) is None:
        return
    latest = tf.train.latest_checkpoint(model_dir)
    step = int(latest.rsplit("-", 1)[1]) if latest else -1
    local = tf.constant([step, step * step, 1], tf.int64)
    try:
        total, squares, n = (int(v) for v in strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(local)), axis=None))
    except tf.errors.OpError as error:  # a peer died while starting
        raise_if_lost(error, strategy, max(step, 0), model_dir)
        raise
    if n * squares != total * total:
        raise UserError(f"the workers see different checkpoints in {model_dir} (this one "
                        f"{latest or 'none'}): --model_dir must be the same folder, on a "
                        "filesystem every worker shares")


class Preemption:
    """The coordinated save-and-stop on a termination signal (module docstring).

    `run(fn, *args)` runs one loop of training steps; before it, when any worker got SIGTERM,
    every worker saves with `save()` at the same loop and raises `Stopped`. `close()` gives
    SIGTERM its former handler back (a signal that came after the last loop then stops the
    process with `Stopped` too). Without a cluster, `run` just calls `fn`.
    """

    def __init__(self, strategy: tf.distribute.Strategy, manager, save: Callable[[], None],
                 step: Callable[[], int], model_dir: str):
        resolver = _resolver(strategy)
        self._handler, self._stopped = None, False
        self._saved_signal = signal.getsignal(signal.SIGTERM)
        self._step, self._model_dir = step, model_dir
        if resolver is None:
            return
        config = tf.distribute.experimental.TerminationConfig(exit_fn=self._stop, save_fn=save)
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            resolver, manager, termination_config=config)
        threading.excepthook = _quiet_watchers(threading.excepthook)

    def _stop(self):
        self._stopped = True
        saved = os.path.join(self._model_dir, f"ckpt-{self._step()}")
        raise Stopped(f"stopped by a termination signal at step {self._step()}, after every "
                      f"worker saved it (the run's checkpoint {saved}): {RESTART} to resume")

    def run(self, fn, *args):
        if self._handler is None:
            return fn(*args)
        return self._handler.run(fn, *args)

    def close(self) -> None:
        if self._handler is None:
            return
        # A signal after the last loop, which no save answered, still stops the process.
        late = self._handler._received_own_sigterm.is_set() and not self._stopped
        signal.signal(signal.SIGTERM, self._saved_signal)
        self._handler = None
        if late:
            self._stop()


def _quiet_watchers(hook):
    """`threading.excepthook` without the traceback of the handler's thread that waits on the
    coordination service, which fails when the worker hosting it dies (the main thread then
    reports the lost worker in one line)."""
    if getattr(hook, "quiet_watchers", False):
        return hook

    def quiet(args):
        if not (isinstance(args.exc_value, tf.errors.OpError)
                and (args.thread.name or "").startswith("PeerTerminationWatcher")):
            hook(args)

    quiet.quiet_watchers = True
    return quiet


_LOST = re.compile(r"unhealthy|heartbeat|Collective ops is aborted|failed to connect|"
                   r"Socket closed|Connection reset|connection refused", re.IGNORECASE)
_TASK = re.compile(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)")


def raise_if_lost(error: BaseException, strategy: tf.distribute.Strategy, step: int,
                  model_dir: str) -> None:
    """Raise the one-line `WorkerLost` when `error` is a collective that failed because a
    peer is gone; return for any other error (or without a cluster)."""
    resolver = _resolver(strategy)
    kinds = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.InternalError,
             tf.errors.CancelledError, tf.errors.DeadlineExceededError)
    text = str(getattr(error, "message", error))
    if resolver is None or not isinstance(error, kinds) or not _LOST.search(text):
        return
    spec, own = resolver.cluster_spec(), (resolver.task_type, int(resolver.task_id))
    after = text.split("unhealthy", 1)[-1]  # the lost tasks are listed after that word
    tasks = [(job, int(i)) for job, i in _TASK.findall(after) if (job, int(i)) != own]
    tasks = tasks or [(job, int(i)) for job, i in _TASK.findall(text) if (job, int(i)) != own]
    if tasks:
        job, index = tasks[0]
        try:
            who = f"{job} {index} ({spec.task_address(job, index)})"
        except (KeyError, ValueError):
            who = f"{job} {index}"
    else:
        who = "another worker"
    latest = tf.train.latest_checkpoint(model_dir) or "none (the run starts afresh)"
    raise WorkerLost(f"{who} stopped responding at step {step}; the last complete checkpoint "
                     f"is {latest}: {RESTART}") from None


def claim(claim_run: Callable, folder: str, fingerprint: Callable[[], dict]):
    """`claim_run(folder, fingerprint)` (runtime/ownership.py) whose refusal, when the number
    of workers changed, says why that number may not change."""
    found: dict = {}

    def measured() -> dict:
        found.update(fingerprint())
        return found

    try:
        return claim_run(folder, measured)
    except RunMismatch as error:
        recorded = read_json(os.path.join(folder, FINGERPRINT_FILE))
        note = worker_count_note(recorded, found.get("workers"))
        if not note:
            raise
        raise RunMismatch(f"{error}{note}") from None


def worker_count_note(recorded: dict | None, workers: int) -> str:
    """The sentence a refused restart adds when the number of workers changed, else ''."""
    if not recorded or "workers" not in recorded or recorded["workers"] == workers:
        return ""
    return (f"; a restart needs the run's cluster size, {recorded['workers']} worker(s), "
            "because each worker reads its own shard of the data and the gradients add up in "
            "an order that both depend on that number (the hosts and ports may change)")
