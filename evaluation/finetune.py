r"""Supervised fine-tuning of a whole pretrained network: the SC protocol (SC Sec. 5, Tables 1-3).

Protocol (Hoffer, Hubara & Ailon 2017, Sec. 5):
- the network (the pretraining model with its softmax classifier, SC Table 4) starts from
  the pretrained checkpoint (--init=<model_dir or checkpoint>; every backbone layer must be
  in it, the classifier starts random) or from scratch (--init=none);
- every layer is trained with the labels:
    stl10    the 5000 labelled train images, tested on the 8000 test images;
    cifar10  400 labels per class (4000), tested on the 10000 test images;
    mnist    all 60000 labels, tested on the 10000 test images;
    digits   --labels_per_class per class (default 10), tested on the 599 test digits;
  (--labels_per_class overrides the count; 0 is every label);
- a stratified --val_fraction of the labelled examples is held out for validation;
- SGD with momentum at lr 0.01, cut by 10x when the validation loss has not improved for
  --patience epochs, stopped after --max_cuts cuts or --epochs; the weights of the epoch
  with the lowest validation loss are kept;
- augmentation: a random translation of up to --translate pixels (reflect padding, then a
  random crop) and, where it is label-preserving, a horizontal mirror (--mirror; default on
  for stl10, cifar10 and imagenet2012, off for the digits of mnist and digits);
- the test split is read once, at the end; the result is the mean ± std test accuracy
  over --seeds. Each seed fixes the label draw, the validation carve, the classifier's init,
  the batch order and the augmentation; with --compare_scratch the same seeds also train
  the network from scratch, and both are reported side by side (SC Tables 1-3).

Writes config.json, finetune.json (every figure) and finetune.md to --output_dir.

Example:

  python -m evaluation.finetune --init=/tmp/sc_mnist --dataset=digits --labels_per_class=10 \
      --seeds=0,1,2 --compare_scratch --output_dir=/tmp/finetune
"""

from __future__ import annotations

import os

# Before TensorFlow loads: its C++ start-up chatter would bury the one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import time
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from evaluation import cli as shared_cli
from evaluation import datasets, probe, report
from models import MODELS, build_model
from models.weights import LoadReport, load_weights

PROGRAM = "finetune"
# Labels per class of the SC protocol (0: every train label).
PROTOCOL_LABELS = {"stl10": 0, "cifar10": 400, "mnist": 0, "digits": 10, "imagenet2012": 0}
MIRROR = {"stl10": True, "cifar10": True, "imagenet2012": True, "mnist": False, "digits": False}
NONE = "none"

def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the binary's flags in `fv` (the global FLAGS when run as a program)."""
    flags.DEFINE_string("init", None, "Pretrained weights: a training model_dir or a checkpoint "
                        "prefix; 'none' trains from scratch.", flag_values=fv)
    flags.DEFINE_string("model", None, "Model name (default: the model of --init's config.json).",
                        flag_values=fv)
    flags.DEFINE_string("model_kwargs", "{}", "JSON keyword arguments of build_model.",
                        flag_values=fv)
    flags.DEFINE_enum("dataset", "digits", datasets.DATASETS, "Labelled dataset.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "tfds data_dir.", flag_values=fv)
    flags.DEFINE_string("manual_dir", None, "tfds manual_dir.", flag_values=fv)
    flags.DEFINE_string("stl10_dir", None, "STL-10 stl10_binary folder (read instead of tfds).",
                        flag_values=fv)
    flags.DEFINE_integer("labels_per_class", None, "Labels per class (0: all; default: the "
                         "protocol's: stl10 all, cifar10 400, mnist all, digits 10).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one run each.", flag_values=fv)
    flags.DEFINE_bool("compare_scratch", False, "Also train from scratch with the same seeds.",
                      flag_values=fv)
    flags.DEFINE_float("learning_rate", 0.01, "Initial SGD learning rate.", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay.", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("epochs", 100, "Most epochs.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("patience", 5, "Epochs without a better validation loss before a cut.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_cuts", 3, "Stop after this many 10x cuts.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("translate", None, "Largest translation in pixels (default: H / 16).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("mirror", None, "Random horizontal mirroring (default: per dataset).",
                      flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of each class held out for validation.",
                       lower_bound=0.0, upper_bound=0.9, flag_values=fv)
    flags.DEFINE_integer("max_test_examples", 0, "Score on the first n test examples (0: all).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where config.json, finetune.json and finetune.md go.",
                        flag_values=fv)
    flags.mark_flag_as_required("init", flag_values=fv)
    flags.mark_flag_as_required("output_dir", flag_values=fv)


class UsageError(Exception):
    """Bad input, reported as one line naming the flag."""


@dataclass(frozen=True)
class FinetuneConfig:
    init: str
    model: str | None
    model_kwargs: dict
    dataset: str
    data_dir: str | None
    manual_dir: str | None
    stl10_dir: str | None
    labels_per_class: int
    seeds: tuple[int, ...]
    compare_scratch: bool
    learning_rate: float
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    patience: int
    max_cuts: int
    translate: int | None
    mirror: bool
    val_fraction: float
    max_test_examples: int
    output_dir: str

    @classmethod
    def from_flags(cls, values) -> FinetuneConfig:
        try:
            kwargs = json.loads(values.model_kwargs)
        except json.JSONDecodeError as error:
            raise UsageError(f"--model_kwargs is not JSON: {error}") from None
        try:
            seeds = tuple(int(s) for s in values.seeds)
        except ValueError:
            raise UsageError(f"--seeds must be integers; got {','.join(values.seeds)}") from None
        if not seeds:
            raise UsageError("--seeds is empty")
        labels = values.labels_per_class
        return cls(
            init=values.init, model=values.model, model_kwargs=kwargs, dataset=values.dataset,
            data_dir=values.data_dir, manual_dir=values.manual_dir, stl10_dir=values.stl10_dir,
            labels_per_class=PROTOCOL_LABELS[values.dataset] if labels is None else labels,
            seeds=seeds, compare_scratch=values.compare_scratch,
            learning_rate=values.learning_rate, momentum=values.momentum,
            weight_decay=values.weight_decay, batch_size=values.batch_size,
            epochs=values.epochs, patience=values.patience, max_cuts=values.max_cuts,
            translate=values.translate,
            mirror=MIRROR[values.dataset] if values.mirror is None else values.mirror,
            val_fraction=values.val_fraction, max_test_examples=values.max_test_examples,
            output_dir=values.output_dir)

    @property
    def source(self) -> datasets.Source:
        return datasets.Source(self.dataset, self.data_dir, self.manual_dir, self.stl10_dir)


# --------------------------------------------------------------------------------------------
# model


def model_spec(cfg: FinetuneConfig) -> tuple[str, dict]:
    """(model name, build_model kwargs) of the classifier: the pretraining model of --init's
    config.json (or --model), with a softmax head over the dataset's classes."""
    name, kwargs = cfg.model, dict(cfg.model_kwargs)
    if cfg.init != NONE and tf.io.gfile.exists(os.path.join(cfg.init, "config.json")):
        config = probe.read_model_config(cfg.init)
        stored = {k: v for k, v in config["model_kwargs"].items()
                  if k not in ("head", "feature_dim", "num_classes")}
        name, kwargs = name or config["model"], {**stored, **kwargs}
    if name is None:
        raise UsageError("--model is required when --init has no config.json")
    if name not in MODELS:
        raise UsageError(f"--model={name}: choose one of {', '.join(sorted(MODELS))}")
    kwargs.update(head="softmax", num_classes=datasets.NUM_CLASSES[cfg.dataset])
    return name, kwargs


def initial_model(name: str, kwargs: dict, init: str | None, seed: int
                  ) -> tuple[keras.Model, LoadReport | None]:
    """The network before fine-tuning: built under `seed`, then (init not None) every variable
    the checkpoint holds is loaded; the backbone layers must all be there.

    With the same seed, a pretrained and a scratch model differ only in the loaded variables.
    """
    keras.utils.set_random_seed(seed)
    model = build_model(name, **kwargs)
    if init is None:
        return model, None
    loaded = load_weights(model, init, require=probe.backbone_layers(name, **kwargs))
    return model, loaded


# --------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Labelled:
    """The labelled examples of one seed: fit and validation images [N, H, W, C] and labels."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def labelled_data(cfg: FinetuneConfig, input_shape: tuple[int, int, int], seed: int
                  ) -> Labelled:
    """Draw the labelled train examples of `seed` and hold out the validation set."""
    source = cfg.source
    labels = datasets.load_labels(source, "train")
    if cfg.labels_per_class:
        chosen = datasets.per_class_draw(labels, cfg.labels_per_class,
                                         np.random.default_rng([seed, 0]), source.num_classes,
                                         f"{cfg.dataset} train")
    else:
        chosen = np.arange(len(labels))
    x, y = datasets.load_arrays(source, "train", input_shape, chosen)
    fit, val = datasets.split_validation(y, cfg.val_fraction, np.random.default_rng([seed, 1]))
    return Labelled(x[fit], y[fit], x[val], y[val])


def augment(image: tf.Tensor, seed: tf.Tensor, translate: int, mirror: bool) -> tf.Tensor:
    """[H, W, C] -> [H, W, C]: a translation by up to `translate` pixels in each axis (reflect
    padding, then a random crop) and, if `mirror`, a left-right flip with probability 1/2.
    `seed` is a stateless seed [2]."""
    shape = tf.shape(image)
    if translate:
        padded = tf.pad(image, [[translate, translate], [translate, translate], [0, 0]],
                        mode="REFLECT")
        image = tf.image.stateless_random_crop(padded, shape, seed)
    if mirror:
        image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    return image


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
                  translate: int, mirror: bool) -> tf.data.Dataset:
    """One epoch of augmented (images, labels) batches, in an order fixed by (seed, epoch)."""
    order = np.random.default_rng([seed, 2, epoch]).permutation(len(y))
    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order], order.astype(np.int64)))

    def apply(image, label, index):
        stateless = tf.stack([tf.constant(seed * 100_003 + epoch, tf.int64), index])
        return augment(image, stateless, translate, mirror), label

    return ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)


# --------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class RunResult:
    seed: int
    init: str
    loaded: int
    epochs: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    history: tuple[dict, ...]


def evaluate(model: keras.Model, batches) -> tuple[float, float]:
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


def train(model: keras.Model, data: Labelled, cfg: FinetuneConfig, seed: int
          ) -> tuple[int, tuple[dict, ...]]:
    """Fine-tune every trainable variable; returns (best epoch, per-epoch history).

    The plateau rule watches the validation loss (the training loss without validation).
    """
    optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay or None)
    optimizer.build(model.trainable_variables)
    translate = cfg.translate
    if translate is None:
        translate = max(1, round(model.input_shape[1] / 16))

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)["logits"]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    lr = cfg.learning_rate
    best_loss, best_epoch, best_weights, wait, cuts = np.inf, 0, None, 0, 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        losses = [float(step(x, y)) for x, y in
                  train_batches(data.x_fit, data.y_fit, cfg.batch_size, seed, epoch, translate,
                                cfg.mirror)]
        train_loss = float(np.mean(losses))
        if len(data.y_val):
            val_loss, val_acc = evaluate(model, _array_batches(data.x_val, data.y_val, 512))
        else:
            val_loss, val_acc = train_loss, float("nan")
        history.append({"epoch": epoch, "learning_rate": lr, "train_loss": train_loss,
                        "val_loss": val_loss, "val_accuracy": val_acc})
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, best_weights, wait = val_loss, epoch, model.get_weights(), 0
            continue
        wait += 1
        if wait >= cfg.patience:
            if cuts == cfg.max_cuts:
                break
            cuts, wait, lr = cuts + 1, 0, lr * 0.1
            optimizer.learning_rate.assign(lr)
    if best_weights is not None:
        model.set_weights(best_weights)
    return best_epoch, tuple(history)


def run_seed(cfg: FinetuneConfig, name: str, kwargs: dict, init: str | None, seed: int,
             data: Labelled) -> RunResult:
    """One fine-tuning run: the initial model of (init, seed), training, then the test split."""
    model, loaded = initial_model(name, kwargs, init, seed)
    best_epoch, history = train(model, data, cfg, seed)
    best = history[best_epoch - 1] if best_epoch else history[-1]
    test_indices = np.arange(cfg.max_test_examples) if cfg.max_test_examples else None
    test = datasets.load(cfg.source, "test", model.input_shape[1:], test_indices).batch(256)
    test_loss, test_acc = evaluate(model, test)
    return RunResult(seed, init or NONE, len(loaded.loaded) if loaded else 0, len(history),
                     best_epoch, best["val_loss"], best["val_accuracy"], test_loss, test_acc,
                     history)


def run(cfg: FinetuneConfig) -> tuple[dict[str, list[RunResult]], str]:
    """Every seed, pretrained (unless --init=none) and, with compare_scratch, from scratch.

    Returns ({"pretrained"|"scratch": [RunResult per seed]}, console table)."""
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
    report.write_json(os.path.join(cfg.output_dir, "config.json"), asdict(cfg))

    tic = time.time()
    results = {key: [] for key in inits}
    for seed in cfg.seeds:
        try:
            data = labelled_data(cfg, input_shape, seed)
        except datasets.LabelsPerClassError as error:
            raise UsageError(f"--labels_per_class={cfg.labels_per_class}: {error}") from None
        for key, init in inits.items():  # same data, seed and schedule: only the init differs
            results[key].append(run_seed(cfg, name, kwargs, init, seed, data))

    labels = f"{cfg.labels_per_class}/class" if cfg.labels_per_class else "all"
    headers = ["init", "model", "dataset", "labels", "seeds", "epochs", "test acc %",
               "test error %"]
    rows = []
    for key, runs in results.items():
        mean, std = report.mean_std([r.test_accuracy for r in runs])
        rows.append(["pretrained" if key == "pretrained" else "none (scratch)", name,
                     cfg.dataset, labels, str(len(runs)),
                     f"{np.mean([r.epochs for r in runs]):.0f}",
                     report.percent(mean, std), report.percent(1 - mean, std)])
    title = f"fine-tuning {name} on {cfg.dataset} ({labels} labels, {len(cfg.seeds)} seeds)"
    payload = {"config": asdict(cfg), "model": name, "model_kwargs": kwargs,
               "seconds": time.time() - tic,
               "runs": {key: [asdict(r) for r in runs] for key, runs in results.items()},
               "summary": {key: dict(zip(("mean", "std"),
                                         report.mean_std([r.test_accuracy for r in runs]),
                                         strict=True))
                           for key, runs in results.items()}}
    table = report.write_report(cfg.output_dir, "finetune", payload, headers, rows, title)
    return results, f"{title}\n{table}"


def cli(argv: list[str]) -> None:
    """Parse `argv` (argv[0] is the program) into fresh flags and run, as the program does."""
    shared_cli.parse_and_run(PROGRAM, define_flags, main, argv)


def main(argv, fv: flags.FlagValues = flags.FLAGS):
    shared_cli.run_and_print(PROGRAM, argv, lambda: run(FinetuneConfig.from_flags(fv)),
                             (UsageError, ValueError))


if __name__ == "__main__":
    define_flags()
    app.run(main)
