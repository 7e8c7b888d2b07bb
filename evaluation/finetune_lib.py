"""`run` of `python -m evaluation.finetune`, whose docstring states the protocol."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import keras
import numpy as np
import tensorflow as tf

from data import labelled
from evaluation import probe, report
from evaluation.finetune import LATER_FLAGS, RESUMABLE, FinetuneConfig
from losses import loss_scale
from losses.divergence import check_finite
from models import build_model
from models.checkpoints import ChosenCheckpoint
from models.runs import backbone_layers
from models.runs import model_spec as run_model_spec
from models.weights import load_weights, read_model_weights
from runtime.cli import UsageError
from runtime.ownership import claim_run, fingerprint_of, start_run
from runtime.progress import Progress
from runtime.run_config import pretraining_config

NEAR_CHANCE = 1.5  # a test accuracy under 1.5 x chance is reported as a failed run
HOLDOUT_SEED = 0  # the holdout of every seed: a probe's of seed 0 (evaluation/probe.py)


# --------------------------------------------------------------------------------------------
# model and data


def labelled_source(cfg: FinetuneConfig) -> labelled.LabelledSource:
    """The labelled dataset of the flags."""
    return labelled.LabelledSource(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)


def model_spec(cfg: FinetuneConfig) -> tuple[str, dict]:
    """(model name, build_model kwargs) of the classifier: the pretraining model of --pretrained's
    config.json (or --model), with a softmax head over the dataset's classes."""
    name, kwargs = cfg.model, cfg.overrides()
    config = pretraining_config(cfg.pretrained)
    if config is not None:
        stored_name, stored = run_model_spec(config)
        stored = {k: v for k, v in stored.items()
                  if k not in ("head", "feature_dim", "num_classes")}
        name, kwargs = name or stored_name, {**stored, **kwargs}
    if not name:
        raise UsageError("--model is required when --pretrained has no config.json")
    kwargs.update(head="softmax", num_classes=labelled.NUM_CLASSES[cfg.dataset])
    return name, kwargs


def initial_model(name: str, kwargs: dict, init: str | ChosenCheckpoint | None, seed: int,
                  mixed_precision: str = "none"):
    """(the network before fine-tuning, the LoadReport or None): built under `seed` (and the
    dtype policy of `mixed_precision`), then (init not None) every variable the checkpoint
    (a path, or the weights `read_model_weights` read) holds is loaded; the backbone layers
    must all be there. With the same seed, a pretrained and a scratch model differ only in the
    loaded variables.
    """
    keras.utils.set_random_seed(seed)
    model = build_model(name, precision=mixed_precision, **kwargs)
    if init is None:
        return model, None
    loaded = load_weights(model, init, require=backbone_layers(name, **kwargs))
    return model, loaded


@dataclass(frozen=True)
class Labelled:
    """The labelled examples of one seed: fit and validation images [N, H, W, C] and labels;
    with --eval_split=validation, the positions in train of the scored holdout."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    holdout: np.ndarray | None = None


def validation_fraction(labels: np.ndarray, cfg: FinetuneConfig) -> float:
    """`val_fraction` when it leaves at least `min_val_per_class` validation examples in every
    class, else 0 (no validation: the plateau rule watches the training loss)."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    return cfg.val_fraction if round(cfg.val_fraction * smallest) >= cfg.min_val_per_class \
        else 0.0


def labelled_data(cfg: FinetuneConfig, input_shape: tuple[int, int, int], seed: int
                  ) -> Labelled:
    """Draw the labelled train examples of `seed` (outside the holdout of --eval_split=
    validation) and hold out the validation set."""
    source = labelled_source(cfg)
    labels = labelled.load_labels(source, "train")
    among, holdout, what = np.arange(len(labels)), None, f"{cfg.dataset} train"
    if cfg.eval_split == "validation":
        holdout = probe.validation_holdout(labels, cfg.holdout_per_class, HOLDOUT_SEED,
                                           source.num_classes, what)
        among, what = np.setdiff1d(among, holdout), f"{what} outside the holdout"
    chosen = among
    if cfg.labels:
        chosen = among[labelled.per_class_draw(labels[among], cfg.labels,
                                               np.random.default_rng([seed, 0]),
                                               source.num_classes, what)]
    x, y = labelled.load_arrays(source, "train", input_shape, chosen)
    fit, val = labelled.split_validation(y, validation_fraction(y, cfg),
                                         np.random.default_rng([seed, 1]))
    return Labelled(x[fit], y[fit], x[val], y[val], holdout)


# --------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class RunResult:
    seed: int
    init: str
    loaded: int
    epochs: int
    best_epoch: int
    converged: bool
    watched: str
    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    history: tuple[dict, ...]


def evaluate(model, batches) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model in inference mode over (x, y) batches."""
    total, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x, training=False)["logits"]
        y = tf.cast(y, tf.int64)
        total += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)))
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == y, tf.int32)))
        count += int(tf.shape(y)[0])
    return total / max(count, 1), correct / max(count, 1)


def _array_batches(x, y, batch_size):
    return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))


def _train_epoch(model, optimizer):
    """One epoch of SGD steps in one tf.function call, stopped before a NaN/Inf loss's step."""
    @tf.function
    def epoch(batches, steps):
        total, bad, bad_loss = tf.constant(0.0), tf.constant(-1), tf.constant(0.0)
        for i in tf.range(steps):
            x, y = next(batches)
            variables = model.trainable_variables
            with tf.GradientTape() as tape:
                logits = model(x, training=True)["logits"]
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
                target = loss_scale.scale_loss(optimizer, loss)
            if not tf.math.is_finite(loss):
                bad, bad_loss = i, loss
                break
            gradients = loss_scale.unscaled_gradients(optimizer, tape, target, variables)
            loss_scale.apply_gradients(optimizer, gradients, variables)
            total += loss
        return total / tf.cast(steps, tf.float32), bad_loss, bad

    return epoch


def train(model, data: Labelled, cfg: FinetuneConfig, seed: int, bar: Progress | None = None,
          what: str = "") -> tuple[int, bool, tuple[dict, ...]]:
    """Fine-tune every trainable variable (module docstring); returns (the epoch whose
    weights are kept, converged, the per-epoch history). A NaN/Inf loss raises NonFiniteLoss."""
    optimizer = loss_scale.loss_scaled(
        keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay or None), cfg.mixed_precision)
    optimizer.build(model.trainable_variables)
    run_epoch = _train_epoch(model, optimizer)
    translate = cfg.translate
    if translate is None:
        translate = max(1, round(model.input_shape[1] / 16))
    batch = min(cfg.batch_size, len(data.y_fit))
    steps = -(-len(data.y_fit) // batch)
    batches = iter(labelled.train_stream(data.x_fit, data.y_fit, batch, seed, cfg.epochs, translate,
                                cfg.mirrored))
    validating = len(data.y_val) > 0
    lr, best_loss, best_epoch, best_weights, wait, cuts = cfg.learning_rate, np.inf, 0, None, 0, 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        train_loss, bad_loss, bad = run_epoch(batches, tf.constant(steps))
        if int(bad) >= 0:  # evaluation/divergence.py
            if bar is not None:
                bar.close()
            check_finite({"cross-entropy": float(bad_loss)}, (epoch - 1) * steps + int(bad) + 1,
                         f"{what or f'fine-tuning, seed {seed}'} (epoch {epoch})", "nothing "
                         "written; try a lower --learning_rate")
        train_loss = float(train_loss)
        val_loss, val_acc = (evaluate(model, _array_batches(data.x_val, data.y_val, 512))
                             if validating else (float("nan"), float("nan")))
        history.append({"epoch": epoch, "learning_rate": lr, "train_loss": train_loss,
                        "val_loss": val_loss, "val_accuracy": val_acc})
        if bar is not None:
            bar.update(epoch, lr=lr, loss=train_loss,
                       **({"val acc": f"{100 * val_acc:.1f}%"} if validating else {}))
        watched = val_loss if validating else train_loss
        if watched < best_loss - 1e-4:
            best_loss, wait = watched, 0
            if validating:
                best_epoch, best_weights = epoch, model.get_weights()
            continue
        wait += 1
        if wait >= cfg.patience:
            if cuts == cfg.max_cuts:
                return _keep(model, best_weights, best_epoch, epoch), True, tuple(history)
            cuts, wait, lr = cuts + 1, 0, lr * 0.1
            optimizer.learning_rate.assign(lr)
    return _keep(model, best_weights, best_epoch, cfg.epochs), False, tuple(history)


def _keep(model, best_weights, best_epoch: int, last_epoch: int) -> int:
    """Restore the chosen weights (if any were chosen); returns the epoch they come from."""
    if best_weights is not None:
        model.set_weights(best_weights)
    return best_epoch if best_weights is not None else last_epoch


def run_seed(cfg: FinetuneConfig, name: str, kwargs: dict,
             init: str | ChosenCheckpoint | None, seed: int, data: Labelled, label: str = ""
             ) -> RunResult:
    """One fine-tuning run: the initial model of (init, seed), training, then the scored
    split (the test split, or the holdout of `data`)."""
    model, loaded = initial_model(name, kwargs, init, seed, cfg.mixed_precision)
    bar = Progress(cfg.epochs, label or f"seed {seed}", unit=" epochs")
    kept, converged, history = train(model, data, cfg, seed, bar, label)
    bar.close()
    split, indices = ("test", np.arange(cfg.max_test_examples) if cfg.max_test_examples
                      else None) if data.holdout is None else ("train", data.holdout)
    test = labelled.load(labelled_source(cfg), split, model.input_shape[1:], indices).batch(256)
    test_loss, test_acc = evaluate(model, test)
    chosen = history[kept - 1]
    return RunResult(seed, loaded.checkpoint if loaded else "random",
                     len(loaded.loaded) if loaded else 0, len(history),
                     kept, converged, "validation" if len(data.y_val) else "training",
                     chosen["val_loss"], chosen["val_accuracy"], test_loss, test_acc, history)


def warnings(results: dict[str, list[RunResult]], num_classes: int,
             scored: str = "test") -> list[str]:
    """One line per run that stopped at the epoch limit or ended near chance (on `scored`)."""
    runs = [(key, r) for key, rs in results.items() for r in rs]
    return ([f"{key} seed {r.seed}: stopped at the {r.epochs}-epoch limit before converging "
             f"(the {r.watched} loss was still improving); raise --epochs"
             for key, r in runs if not r.converged]
            + [f"{key} seed {r.seed}: {scored} accuracy {100 * r.test_accuracy:.1f}% is near "
               f"chance ({100 / num_classes:.0f}%): this run failed"
               for key, r in runs if r.test_accuracy < NEAR_CHANCE / num_classes])


def run(cfg: FinetuneConfig) -> tuple[dict[str, list[RunResult]], str]:
    """Every seed, pretrained (unless --init=random) and, with compare_scratch, from scratch.

    Returns ({"pretrained"|"scratch": [RunResult per seed]}, console text)."""
    later = {f.name: f.default for f in fields(cfg) if f.name in LATER_FLAGS}
    fingerprint = {key: value for key, value in fingerprint_of(cfg, RESUMABLE).items()
                   if key not in later or value != later[key]}  # older folders stay theirs
    with claim_run(cfg.out, fingerprint, "--output_dir") as claim:
        # the splits it reads (a holdout: train only), before any training
        labelled.check_available(labelled_source(cfg), ("train",) if cfg.eval_split ==
                                 "validation" else labelled.SPLITS)
        name, kwargs = model_spec(cfg)
        try:
            input_shape = tuple(build_model(name, **kwargs).input_shape[1:])
        except (TypeError, ValueError) as error:
            raise UsageError(f"--model_kwargs: {error}") from None
        inits, weights = {}, None
        if cfg.init == "pretrained":  # one checkpoint, read once, for every seed
            try:
                weights = read_model_weights(cfg.pretrained)
                initial_model(name, kwargs, weights, cfg.seeds[0])
            except (FileNotFoundError, ValueError) as error:
                raise UsageError(f"--pretrained={cfg.pretrained}: {error}") from None
            inits["pretrained"] = weights
        if cfg.init == "random" or cfg.compare_scratch:
            inits["scratch"] = None
        tic = time.time()
        results = {key: [] for key in inits}
        for seed in cfg.seeds:
            try:
                data = labelled_data(cfg, input_shape, seed)
            except labelled.LabelsPerClassError as error:
                raise UsageError(f"--labels_per_class={cfg.labels}: {error}") from None
            except probe.HoldoutError as error:
                raise UsageError(f"--{error}") from None
            for key, init in inits.items():  # same data, seed and schedule: only the init differs
                results[key].append(run_seed(cfg, name, kwargs, init, seed, data,
                                             f"fine-tuning {key}, seed {seed}"))
        start_run(claim, asdict(cfg))  # complete results: config.json, then them
        text = write_report(cfg, name, kwargs, results, time.time() - tic,
                            weights.record() if weights else None)
    return results, text


def write_report(cfg: FinetuneConfig, name: str, kwargs: dict,
                 results: dict[str, list[RunResult]], seconds: float,
                 checkpoint: dict | None = None) -> str:
    """finetune.json and finetune.md (with `checkpoint`, the {"path", "step"} every pretrained
    seed started from); returns the console text."""
    labels = f"{cfg.labels}/class" if cfg.labels else "all"
    num_classes = labelled.NUM_CLASSES[cfg.dataset]
    validation = cfg.eval_split == "validation"
    scored = "holdout" if validation else "test"
    headers = ["init", "model", "dataset", "labels", "seeds", "converged", "epochs",
               f"{scored} acc % (± sd over {len(cfg.seeds)} seeds)"]
    rows = []
    for key, runs in results.items():
        mean, std = report.mean_std([r.test_accuracy for r in runs])
        rows.append(["pretrained" if key == "pretrained" else "none (scratch)", name,
                     cfg.dataset, labels, str(len(runs)),
                     f"{sum(r.converged for r in runs)}/{len(runs)}",
                     f"{np.mean([r.epochs for r in runs]):.0f}", report.percent(mean, std)])
    title = f"fine-tuning {name} on {cfg.dataset} ({labels} labels, {len(cfg.seeds)} seeds)"
    if validation:
        title += (f", scored on a validation holdout of {cfg.holdout_per_class * num_classes} "
                  "train images")
    notes = warnings(results, num_classes, scored)
    gap = None
    if len(results) == 2:
        gap = report.paired_gap([r.test_accuracy for r in results["pretrained"]],
                                [r.test_accuracy for r in results["scratch"]], "seeds")
    payload = {"config": asdict(cfg), "model": name, "model_kwargs": kwargs, "seconds": seconds,
               "checkpoint": checkpoint, "scored_split": cfg.eval_split,
               "scored_examples": cfg.holdout_per_class * num_classes if validation else None,
               "runs": {key: [asdict(r) for r in runs] for key, runs in results.items()},
               "summary": {key: dict(zip(("mean", "std"),
                                         report.mean_std([r.test_accuracy for r in runs]),
                                         strict=True))
                           for key, runs in results.items()},
               "paired_gap": asdict(gap) if gap else None, "warnings": notes}
    table = report.write_report(cfg.out, "finetune", payload, headers, rows, title)
    lines = [title, table]
    if gap is not None:
        lines.append(f"pretrained - scratch: {gap.describe()}")
    lines += [f"warning: {note}" for note in notes]
    return "\n".join(lines)


def run_and_print(cfg: FinetuneConfig):
    """The binary: `run`, then the table and where it was written."""
    results, text = run(cfg)
    print(text)
    print(f"wrote {cfg.out}/finetune.md and finetune.json")
    return results
