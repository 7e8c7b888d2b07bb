r"""Supervised fine-tuning of a whole pretrained network: the SC protocol (SC Sec. 5, Tables 1-3).

Protocol (Hoffer, Hubara & Ailon 2017, Sec. 5):
- the network (the pretraining model with its softmax classifier, SC Table 4) starts from
  the pretrained checkpoint (--init=<run folder or checkpoint>; every backbone layer must be
  in it, the classifier starts random) or from scratch (--init=none);
- every layer is trained with the labels: stl10 its 5000 labelled train images (8000 test
  images), cifar10 400 per class (10000 test images), mnist and fashion_mnist all 60000
  (10000 test images), digits 10 per class (599 test digits); --labels_per_class overrides
  (0: every label);
- SGD with momentum from lr 0.01, cut by 10x whenever the watched loss has not improved for
  --patience epochs, and stopped after --max_cuts cuts ("converged") or at --epochs. The
  watched loss (the paper's "measured loss") is:
    * the validation loss, when a stratified --val_fraction of the labels leaves at least
      --min_val_per_class examples of every class for validation; the weights of the epoch
      with the lowest validation loss are kept;
    * otherwise the training loss over all the labels, and the last weights are kept: a few
      validation images cannot choose an epoch (with 10 labels per class, one image each);
- batches of --batch_size, never more than the training examples, so that a few labels still
  get several SGD steps per epoch;
- augmentation: a random translation of up to --translate pixels and, where it preserves the
  label, a horizontal mirror (--mirror; default on except for the digits of mnist, digits);
- --mixed_precision=bf16|fp16 computes the network in bfloat16 / float16 (float32 variables,
  BN statistics, logits and loss; dynamic loss scaling for fp16: losses/loss_scale.py);
- the test split is read once, at the end; the result is the mean ± std test accuracy
  over --seeds. Each seed fixes the label draw, the validation carve, the classifier's init,
  the batch order and the augmentation; with --compare_scratch the same seeds also train
  the network from scratch, both are reported side by side (SC Tables 1-3), and their
  difference is tested paired over the seeds (evaluation/report.py).
- the output warns when a run stopped at --epochs before converging, or ended near chance.

Writes config.json, finetune.json (every figure) and finetune.md to --output_dir (default
`<init>/finetune`, or `runs/finetune_<model>_scratch` with --init=none) once the results are
complete. The folder is one configuration's (runtime/ownership.py): another (differing beyond
RESUMABLE) is refused unless the folder is new; the same one rewrites its outputs. Example:
`python -m evaluation.finetune --init=runs/sc_nin_mnist_digits --compare_scratch --seeds=0,1,2`
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from data import LABELLED_DATASETS
from models import MODEL_NAMES, PRECISIONS
from runtime import cli
from runtime.cli import UsageError, option
from runtime.ownership import claim_run, fingerprint_of, start_run
from runtime.progress import Progress
from runtime.run_config import pretraining_config, run_folder

# TensorFlow loads after the flags are checked (runtime/cli.py).
tf = cli.lazy_import("tensorflow")
keras = cli.lazy_import("keras")
labelled = cli.lazy_import("data.labelled")
report = cli.lazy_import("evaluation.report")
precision = cli.lazy_import("models.precision")
loss_scale = cli.lazy_import("losses.loss_scale")
runs = cli.lazy_import("models.runs")

PROGRAM = "evaluation.finetune"
RESUMABLE = ("output_dir", "data_dir", "manual_dir", "stl10_dir")  # where, not what
# Labels per class of the SC protocol (0: every train label).
PROTOCOL_LABELS = {"stl10": 0, "cifar10": 400, "mnist": 0, "digits": 10, "imagenet2012": 0,
                   "fashion_mnist": 0}
MIRROR = {"stl10": True, "cifar10": True, "imagenet2012": True, "mnist": False, "digits": False,
          "fashion_mnist": False}  # as mnist
NONE = "none"
NEAR_CHANCE = 1.5  # a test accuracy under 1.5 x chance is reported as a failed run


@dataclass(frozen=True)
class FinetuneConfig:
    """The flags of `python -m evaluation.finetune` (and of the SC run's final table)."""

    init: str = option("", "Pretrained weights: a training run folder or a checkpoint prefix; "
                       "'none' trains from scratch.")
    model: str = option("", "Model name (default: the model of --init's config.json).")
    model_kwargs: str = option("{}", "JSON keyword arguments of build_model.")
    dataset: str = option("digits", "Labelled dataset.", choices=LABELLED_DATASETS)
    data_dir: str | None = option(None, "tfds data_dir.")
    manual_dir: str | None = option(None, "tfds manual_dir.")
    stl10_dir: str | None = option(None, "STL-10 stl10_binary folder (read instead of tfds).")
    labels_per_class: int | None = option(None, "Labels per class (0: all; default: the "
                                          "protocol's: stl10 all, cifar10 400, mnist and "
                                          "fashion_mnist all, digits 10).", lower=0)
    seeds: tuple[int, ...] = option((0, 1, 2, 3, 4), "Seeds; one run each.")
    compare_scratch: bool = option(False, "Also train from scratch with the same seeds.")
    learning_rate: float = option(0.01, "Initial SGD learning rate.", lower=0.0)
    momentum: float = option(0.9, "SGD momentum.", lower=0.0)
    weight_decay: float = option(5e-4, "Decoupled weight decay.", lower=0.0)
    batch_size: int = option(32, "Batch size (at most the number of training examples).",
                             lower=1)
    epochs: int = option(300, "Most epochs.", lower=1)
    patience: int = option(10, "Epochs without a better watched loss before a 10x cut.",
                           lower=1)
    max_cuts: int = option(3, "Stop (converged) after this many cuts.", lower=0)
    translate: int | None = option(None, "Largest translation in pixels (default: H / 16).",
                                   lower=0)
    mirror: bool | None = option(None, "Random horizontal mirroring (default: per dataset).")
    val_fraction: float = option(0.1, "Fraction of each class held out for validation.",
                                 lower=0.0, upper=0.9)
    min_val_per_class: int = option(5, "Validation images per class needed to choose an epoch "
                                    "on them (else: the training loss, no carve).", lower=1)
    max_test_examples: int = option(0, "Score on the first n test examples (0: all).", lower=0)
    mixed_precision: str = option("none", "Compute precision of the network: none (float32), "
                                  "bf16 or fp16 (with dynamic loss scaling).",
                                  choices=PRECISIONS)
    output_dir: str = option("", "Where config.json, finetune.json and finetune.md go "
                             "(default: <init>/finetune).")

    def __post_init__(self):
        cli.require("init", self.init)
        cli.check_choice("dataset", self.dataset, LABELLED_DATASETS)
        cli.check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if not self.seeds:
            raise UsageError("--seeds is empty")
        if self.model and self.model not in MODEL_NAMES:
            raise UsageError(f"--model={self.model}: choose one of {', '.join(MODEL_NAMES)}")
        self.overrides()

    def overrides(self) -> dict:
        return cli.json_object("model_kwargs", self.model_kwargs)

    @property
    def labels(self) -> int:
        """Labels per class: the flag, or the protocol's for the dataset."""
        return PROTOCOL_LABELS[self.dataset] if self.labels_per_class is None \
            else self.labels_per_class

    @property
    def mirrored(self) -> bool:
        return MIRROR[self.dataset] if self.mirror is None else self.mirror

    @property
    def out(self) -> str:
        if self.output_dir:
            return self.output_dir
        if self.init != NONE:
            return os.path.join(run_folder(self.init), "finetune")
        return os.path.join("runs", f"finetune_{self.model or 'model'}_scratch")

    @property
    def source(self):
        return labelled.LabelledSource(self.dataset, self.data_dir, self.manual_dir,
                                       self.stl10_dir)


# --------------------------------------------------------------------------------------------
# model and data


def model_spec(cfg: FinetuneConfig) -> tuple[str, dict]:
    """(model name, build_model kwargs) of the classifier: the pretraining model of --init's
    config.json (or --model), with a softmax head over the dataset's classes."""
    name, kwargs = cfg.model, cfg.overrides()
    config = pretraining_config(cfg.init) if cfg.init != NONE else None
    if config is not None:
        stored_name, stored = model_spec(config)
        stored = {k: v for k, v in stored.items()
                  if k not in ("head", "feature_dim", "num_classes")}
        name, kwargs = name or stored_name, {**stored, **kwargs}
    if not name:
        raise UsageError("--model is required when --init has no config.json")
    kwargs.update(head="softmax", num_classes=labelled.NUM_CLASSES[cfg.dataset])
    return name, kwargs


def initial_model(name: str, kwargs: dict, init: str | None, seed: int,
                  mixed_precision: str = "none"):
    """(the network before fine-tuning, the LoadReport or None): built under `seed` (and the
    dtype policy of `mixed_precision`), then (init not None) every variable the checkpoint
    holds is loaded; the backbone layers must all be there. With the same seed, a pretrained
    and a scratch model differ only in the loaded variables.
    """
    from models import build_model
    from models.weights import load_weights

    keras.utils.set_random_seed(seed)
    model = build_model(name, precision=mixed_precision, **kwargs)
    if init is None:
        return model, None
    loaded = load_weights(model, init, require=runs.backbone_layers(name, **kwargs))
    return model, loaded


@dataclass(frozen=True)
class Labelled:
    """The labelled examples of one seed: fit and validation images [N, H, W, C] and labels."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def validation_fraction(labels: np.ndarray, cfg: FinetuneConfig) -> float:
    """`val_fraction` when it leaves at least `min_val_per_class` validation examples in every
    class, else 0 (no validation: the plateau rule watches the training loss)."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    return cfg.val_fraction if round(cfg.val_fraction * smallest) >= cfg.min_val_per_class \
        else 0.0


def labelled_data(cfg: FinetuneConfig, input_shape: tuple[int, int, int], seed: int
                  ) -> Labelled:
    """Draw the labelled train examples of `seed` and hold out the validation set."""
    source = cfg.source
    labels = labelled.load_labels(source, "train")
    if cfg.labels:
        chosen = labelled.per_class_draw(labels, cfg.labels, np.random.default_rng([seed, 0]),
                                         source.num_classes, f"{cfg.dataset} train")
    else:
        chosen = np.arange(len(labels))
    x, y = labelled.load_arrays(source, "train", input_shape, chosen)
    fit, val = labelled.split_validation(y, validation_fraction(y, cfg),
                                         np.random.default_rng([seed, 1]))
    return Labelled(x[fit], y[fit], x[val], y[val])


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
    """A tf.function (batch iterator, steps) -> mean loss: one epoch of SGD steps in one call."""
    @tf.function
    def epoch(batches, steps):
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            x, y = next(batches)
            variables = model.trainable_variables
            with tf.GradientTape() as tape:
                logits = model(x, training=True)["logits"]
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
                target = loss_scale.scale_loss(optimizer, loss)
            gradients = loss_scale.unscaled_gradients(optimizer, tape, target, variables)
            loss_scale.apply_gradients(optimizer, gradients, variables)
            total += loss
        return total / tf.cast(steps, tf.float32)

    return epoch


def train(model, data: Labelled, cfg: FinetuneConfig, seed: int, bar: Progress | None = None
          ) -> tuple[int, bool, tuple[dict, ...]]:
    """Fine-tune every trainable variable (module docstring); returns (the epoch whose
    weights are kept, converged, the per-epoch history)."""
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
        train_loss = float(run_epoch(batches, tf.constant(steps)))
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


def run_seed(cfg: FinetuneConfig, name: str, kwargs: dict, init: str | None, seed: int,
             data: Labelled, label: str = "") -> RunResult:
    """One fine-tuning run: the initial model of (init, seed), training, then the test split."""
    model, loaded = initial_model(name, kwargs, init, seed, cfg.mixed_precision)
    bar = Progress(cfg.epochs, label or f"seed {seed}", unit=" epochs")
    kept, converged, history = train(model, data, cfg, seed, bar)
    bar.close()
    test_indices = np.arange(cfg.max_test_examples) if cfg.max_test_examples else None
    test = labelled.load(cfg.source, "test", model.input_shape[1:], test_indices).batch(256)
    test_loss, test_acc = evaluate(model, test)
    chosen = history[kept - 1]
    return RunResult(seed, init or NONE, len(loaded.loaded) if loaded else 0, len(history),
                     kept, converged, "validation" if len(data.y_val) else "training",
                     chosen["val_loss"], chosen["val_accuracy"], test_loss, test_acc, history)


def warnings(results: dict[str, list[RunResult]], num_classes: int) -> list[str]:
    """One line per run that stopped at the epoch limit or ended near chance."""
    runs = [(key, r) for key, rs in results.items() for r in rs]
    return ([f"{key} seed {r.seed}: stopped at the {r.epochs}-epoch limit before converging "
             f"(the {r.watched} loss was still improving); raise --epochs"
             for key, r in runs if not r.converged]
            + [f"{key} seed {r.seed}: test accuracy {100 * r.test_accuracy:.1f}% is near "
               f"chance ({100 / num_classes:.0f}%): this run failed"
               for key, r in runs if r.test_accuracy < NEAR_CHANCE / num_classes])


def run(cfg: FinetuneConfig) -> tuple[dict[str, list[RunResult]], str]:
    """Every seed, pretrained (unless --init=none) and, with compare_scratch, from scratch.

    Returns ({"pretrained"|"scratch": [RunResult per seed]}, console text)."""
    from models import build_model

    fingerprint = fingerprint_of(cfg, RESUMABLE)
    with claim_run(cfg.out, fingerprint, "--output_dir") as claim:
        name, kwargs = model_spec(cfg)
        try:
            input_shape = tuple(build_model(name, **kwargs).input_shape[1:])
        except (TypeError, ValueError) as error:
            raise UsageError(f"--model_kwargs: {error}") from None
        inits = {}
        if cfg.init != NONE:
            try:
                initial_model(name, kwargs, cfg.init, cfg.seeds[0])
            except (FileNotFoundError, ValueError) as error:
                raise UsageError(f"--init={cfg.init}: {error}") from None
            inits["pretrained"] = cfg.init
        if cfg.init == NONE or cfg.compare_scratch:
            inits["scratch"] = None
        tic = time.time()
        results = {key: [] for key in inits}
        for seed in cfg.seeds:
            try:
                data = labelled_data(cfg, input_shape, seed)
            except labelled.LabelsPerClassError as error:
                raise UsageError(f"--labels_per_class={cfg.labels}: {error}") from None
            for key, init in inits.items():  # same data, seed and schedule: only the init differs
                results[key].append(run_seed(cfg, name, kwargs, init, seed, data,
                                             f"fine-tuning {key}, seed {seed}"))
        start_run(claim, asdict(cfg))  # complete results: config.json, then them
        text = write_report(cfg, name, kwargs, results, time.time() - tic)
    return results, text


def write_report(cfg: FinetuneConfig, name: str, kwargs: dict,
                 results: dict[str, list[RunResult]], seconds: float) -> str:
    """finetune.json and finetune.md; returns the console text."""
    labels = f"{cfg.labels}/class" if cfg.labels else "all"
    headers = ["init", "model", "dataset", "labels", "seeds", "converged", "epochs",
               f"test acc % (± sd over {len(cfg.seeds)} seeds)"]
    rows = []
    for key, runs in results.items():
        mean, std = report.mean_std([r.test_accuracy for r in runs])
        rows.append(["pretrained" if key == "pretrained" else "none (scratch)", name,
                     cfg.dataset, labels, str(len(runs)),
                     f"{sum(r.converged for r in runs)}/{len(runs)}",
                     f"{np.mean([r.epochs for r in runs]):.0f}", report.percent(mean, std)])
    title = f"fine-tuning {name} on {cfg.dataset} ({labels} labels, {len(cfg.seeds)} seeds)"
    notes = warnings(results, labelled.NUM_CLASSES[cfg.dataset])
    gap = None
    if len(results) == 2:
        gap = report.paired_gap([r.test_accuracy for r in results["pretrained"]],
                                [r.test_accuracy for r in results["scratch"]], "seeds")
    payload = {"config": asdict(cfg), "model": name, "model_kwargs": kwargs, "seconds": seconds,
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


def main(argv=None) -> None:
    cli.main(PROGRAM, FinetuneConfig, run_and_print, module_name=PROGRAM, doc=__doc__,
             argv=argv)


if __name__ == "__main__":
    main()
