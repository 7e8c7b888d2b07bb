"""The run of a PASCAL VOC 2007 transfer protocol, shared by classification and detection.

    config  ->  the pretraining run's preprocessing  ->  the network (seeded)
            ->  SGD with the protocol's schedule; resume from <model_dir>/ckpt-* if any,
                else initialise from --pretrained (a pretraining run or a prefix)
            ->  the protocol's data (and data-dependent init)  ->  <model_dir>/config.json
            ->  the step loop: a log line every --log_every steps, a checkpoint every
                --checkpoint_every steps and at the end
            ->  evaluation on the test split  ->  results.json, results.md, printed table

The settings are `evaluation.voc.config.VocRunConfig`, extended by each protocol's config. A
protocol (`VocProtocol`) supplies what differs: its network, initialisation, data, train
step, evaluation and report. The network is built under the dtype policy of
--mixed_precision, with a loss-scaled optimizer for fp16 (losses/loss_scale.py); the train
steps differentiate `loss_scale.scale_loss` and apply true gradients with
`loss_scale.apply_gradients`. Checkpoints hold the network (by name, models/weights.py), the
optimizer and its step, and the fp16 loss scale; the training stream is re-seeded with the
step, so a resumed run is deterministic (not bit-identical to an uninterrupted one).

The run folder belongs to one process and one configuration (runtime/ownership.py): it is locked,
and every setting but those of `RESUMABLE` (where data and checkpoints go, how often to log
and save, and --num_steps, which extends a run) is compared with the recorded fingerprint
before anything is restored; a refused start writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import typing
from collections.abc import Callable, Iterator

import keras
from absl import logging

from evaluation.voc.config import resolve_preprocessing
from losses import loss_scale
from losses.divergence import check_finite
from models import precision
from models.checkpoints import open_checkpoints
from models.weights import named_variables, read_model_weights
from runtime.files import write_json_atomic, write_text_atomic
from runtime.ownership import claim_run, fingerprint_of, start_run
from runtime.progress import Progress


class VocProtocol(typing.Protocol):
    """What a VOC protocol supplies to `run`."""

    title: str

    def build(self, config, preprocessing: str):
        """(network, learning-rate schedule, trained variables)."""

    def model_kwargs(self, preprocessing: str) -> dict:
        """The build_model kwargs of the AlexNet inside the network (for config.json)."""

    def initialize(self, net, config) -> None:
        """Initialise a fresh (not resumed) network from config.pretrained."""

    def prepare(self, net, config, resumed: bool) -> None:
        """Open the data (and any data-dependent initialisation) before training."""

    def train_step(self, net, optimizer, variables, config) -> Callable:
        """batch -> {loss name: scalar} applying one step."""

    def batches(self, config, start_step: int) -> Iterator:
        """The endless training stream, seeded by (seed, start_step)."""

    def evaluate(self, net, config) -> dict:
        """Results on the test split (JSON-serialisable, NaN allowed)."""

    def report(self, results: dict, config) -> tuple[str, str]:
        """(markdown table, one-line summary); may write figures to the run folder."""


def train_loop(step_fn: Callable, batches: Iterator, manager, schedule, start: int,
               config) -> float | None:
    """Steps start+1 .. num_steps: the losses shown (runtime/progress.py) and logged every
    log_every steps, a checkpoint every checkpoint_every steps and at the last one. Returns the
    mean seconds per step. A NaN/Inf loss stops the loop before anything is saved at its step
    (NonFiniteLoss, one line naming the step and the last good checkpoint)."""

    bar = Progress(config.num_steps, "training", unit=" steps")
    tick, timed, seconds_per_step = time.time(), 0, None
    for step in range(start + 1, config.num_steps + 1):
        losses = step_fn(next(batches))
        values = {k: float(v) for k, v in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bar.close()
            check_finite(values, step, "training", "nothing saved from it on; the last good "
                         f"checkpoint is {manager.latest_checkpoint or 'none'}")
        timed += 1
        if step % config.log_every == 0 or step == config.num_steps:
            seconds_per_step = (time.time() - tick) / timed
            lr = float(schedule(step - 1))
            bar.update(step, **values, lr=lr, **{"s/step": f"{seconds_per_step:.3f}"})
            logging.info("step %d %s lr %.3g (%.3f s/step)", step,
                         " ".join(f"{k} {v:.4f}" for k, v in values.items()), lr,
                         seconds_per_step)
            tick, timed = time.time(), 0
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            manager.save(checkpoint_number=step)
    bar.close()
    return seconds_per_step


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None  # NaN (a class without test positives) is not JSON
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def write_results(config, results: dict, table: str, summary: str, title: str) -> None:
    """results.json (NaN as null) and results.md in the run folder."""
    write_json_atomic(os.path.join(config.model_dir, "results.json"), _jsonable(results))
    write_text_atomic(os.path.join(config.model_dir, "results.md"),
                      f"# {title}, step {results['step']}\n\n{table}\n\n{summary}\n")


def run(protocol: VocProtocol, config) -> dict:
    """Train and evaluate `protocol` as the module docstring says; returns the results.

    Raises UsageError / ValueError for a bad setting or an incompatible checkpoint,
    RunLocked / RunMismatch for a folder in use or of another configuration, and
    FileNotFoundError for a missing checkpoint or unprepared data, each with one line.
    """
    config.validate()
    with claim_run(config.model_dir, fingerprint_of(config, config.RESUMABLE)) as claim:
        net, optimizer, manager, schedule, variables = _start(protocol, config)
        start_run(claim, {**dataclasses.asdict(config), "model": "alexnet",
                          "model_kwargs": protocol.model_kwargs(resolve_preprocessing(config))})
    if claim.removed:
        print(f"removed {len(claim.removed)} temporary files of an interrupted process from "
              f"{config.model_dir}: {', '.join(claim.removed)}")
    start = int(optimizer.iterations.numpy())
    seconds = None
    if start < config.num_steps:
        step_fn = protocol.train_step(net, optimizer, variables, config)
        seconds = train_loop(step_fn, protocol.batches(config, start), manager, schedule,
                             start, config)
    results = protocol.evaluate(net, config)
    results["step"] = int(optimizer.iterations.numpy())
    results["seconds_per_step"] = seconds
    table, summary = protocol.report(results, config)
    write_results(config, results, table, summary, protocol.title)
    print(table)
    print(summary)
    return results


def _start(protocol: VocProtocol, config):
    """The network and optimizer, restored from the latest checkpoint or initialised, and the
    data: (net, optimizer, checkpoint manager, schedule, trained variables). Writes nothing."""
    preprocessing = resolve_preprocessing(config)
    keras.utils.set_random_seed(config.seed)
    with precision.policy_scope(config.mixed_precision):
        net, schedule, variables = protocol.build(config, preprocessing)
    optimizer = loss_scale.loss_scaled(keras.optimizers.SGD(schedule, momentum=config.momentum),
                                      config.mixed_precision)
    optimizer.build(variables)
    _, manager, latest = open_checkpoints(
        config.model_dir, {"model": named_variables(net),
                           **loss_scale.checkpoint_objects(optimizer)},
        config.keep_checkpoints, optional=(loss_scale.LOSS_SCALE_KEY,))
    if latest is not None:
        logging.info("resumed from %s at step %d", latest, int(optimizer.iterations.numpy()))
    elif config.pretrained:  # one checkpoint, read once, for every part of the net it fills
        protocol.initialize(net, dataclasses.replace(
            config, pretrained=read_model_weights(config.pretrained)))
    protocol.prepare(net, config, resumed=latest is not None)
    return net, optimizer, manager, schedule, variables
