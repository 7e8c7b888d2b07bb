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
- --mixed_precision=bf16|fp16 computes the network in bfloat16 / float16 (float32 variables,
  BN statistics, logits and loss; dynamic loss scaling for fp16: models/precision.py);
- the test split is read once, at the end; the result is the mean ± std test accuracy
  over --seeds. Each seed fixes the label draw, the validation carve, the classifier's init,
  the batch order and the augmentation; with --compare_scratch the same seeds also train
  the network from scratch, and both are reported side by side (SC Tables 1-3).

Writes config.json, finetune.json (every figure) and finetune.md to --output_dir (default
`<init>/finetune`, or `runs/finetune_<model>_scratch` with --init=none).

Example:

  python -m evaluation.finetune --init=runs/sc_nin_mnist_digits --dataset=digits \
      --labels_per_class=10 --seeds=0,1,2 --compare_scratch
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from data import LABELLED_DATASETS
from models import MODEL_NAMES, PRECISIONS, cli
from models.cli import UsageError, option

# TensorFlow loads after the flags are checked (models/cli.py).
tf = cli.lazy_import("tensorflow")
keras = cli.lazy_import("keras")
labelled = cli.lazy_import("data.labelled")
report = cli.lazy_import("evaluation.report")
precision = cli.lazy_import("models.precision")

PROGRAM = "evaluation.finetune"
# Labels per class of the SC protocol (0: every train label).
PROTOCOL_LABELS = {"stl10": 0, "cifar10": 400, "mnist": 0, "digits": 10, "imagenet2012": 0}
MIRROR = {"stl10": True, "cifar10": True, "imagenet2012": True, "mnist": False, "digits": False}
NONE = "none"


@dataclass(frozen=True)
class FinetuneConfig:
    """The flags of `python -m evaluation.finetune` (and the SC run's final table)."""

    init: str = option("", "Pretrained weights: a training run folder or a checkpoint prefix; "
                       "'none' trains from scratch.")
    model: str = option("", "Model name (default: the model of --init's config.json).")
    model_kwargs: str = option("{}", "JSON keyword arguments of build_model.")
    dataset: str = option("digits", "Labelled dataset.", choices=LABELLED_DATASETS)
    data_dir: str | None = option(None, "tfds data_dir.")
    manual_dir: str | None = option(None, "tfds manual_dir.")
    stl10_dir: str | None = option(None, "STL-10 stl10_binary folder (read instead of tfds).")
    labels_per_class: int | None = option(None, "Labels per class (0: all; default: the "
                                          "protocol's: stl10 all, cifar10 400, mnist all, "
                                          "digits 10).", lower=0)
    seeds: tuple[int, ...] = option((0, 1, 2), "Seeds; one run each.")
    compare_scratch: bool = option(False, "Also train from scratch with the same seeds.")
    learning_rate: float = option(0.01, "Initial SGD learning rate.", lower=0.0)
    momentum: float = option(0.9, "SGD momentum.", lower=0.0)
    weight_decay: float = option(5e-4, "Decoupled weight decay.", lower=0.0)
    batch_size: int = option(128, "Batch size.", lower=1)
    epochs: int = option(100, "Most epochs.", lower=1)
    patience: int = option(5, "Epochs without a better validation loss before a cut.", lower=1)
    max_cuts: int = option(3, "Stop after this many 10x cuts.", lower=0)
    translate: int | None = option(None, "Largest translation in pixels (default: H / 16).",
                                   lower=0)
    mirror: bool | None = option(None, "Random horizontal mirroring (default: per dataset).")
    val_fraction: float = option(0.1, "Fraction of each class held out for validation.",
                                 lower=0.0, upper=0.9)
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
        try:
            kwargs = json.loads(self.model_kwargs or "{}")
        except json.JSONDecodeError as error:
            raise UsageError(f"--model_kwargs is not JSON: {error}") from None
        if not isinstance(kwargs, dict):
            raise UsageError("--model_kwargs must be a JSON object")
        return kwargs

    @property
    def labels(self) -> int:
        """Labels per class: the flag, or the protocol's for the dataset."""
        if self.labels_per_class is None:
            return PROTOCOL_LABELS[self.dataset]
        return self.labels_per_class

    @property
    def mirrored(self) -> bool:
        return MIRROR[self.dataset] if self.mirror is None else self.mirror

    @property
    def out(self) -> str:
        if self.output_dir:
            return self.output_dir
        if self.init != NONE:
            from models.runs import run_folder

            return os.path.join(run_folder(self.init), "finetune")
        return os.path.join("runs", f"finetune_{self.model or 'model'}_scratch")

    @property
    def source(self):
        return labelled.LabelledSource(self.dataset, self.data_dir, self.manual_dir,
                                       self.stl10_dir)


# --------------------------------------------------------------------------------------------
# model


def model_spec(cfg: FinetuneConfig) -> tuple[str, dict]:
    """(model name, build_model kwargs) of the classifier: the pretraining model of --init's
    config.json (or --model), with a softmax head over the dataset's classes."""
    from models.runs import model_spec as run_model_spec
    from models.runs import pretraining_config

    name, kwargs = cfg.model, cfg.overrides()
    config = pretraining_config(cfg.init) if cfg.init != NONE else None
    if config is not None:
        stored_name, stored = run_model_spec(config)
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
    from models.runs import backbone_layers
    from models.weights import load_weights

    keras.utils.set_random_seed(seed)
    model = build_model(name, precision=mixed_precision, **kwargs)
    if init is None:
        return model, None
    loaded = load_weights(model, init, require=backbone_layers(name, **kwargs))
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
    labels = labelled.load_labels(source, "train")
    if cfg.labels:
        chosen = labelled.per_class_draw(labels, cfg.labels, np.random.default_rng([seed, 0]),
                                         source.num_classes, f"{cfg.dataset} train")
    else:
        chosen = np.arange(len(labels))
    x, y = labelled.load_arrays(source, "train", input_shape, chosen)
    fit, val = labelled.split_validation(y, cfg.val_fraction, np.random.default_rng([seed, 1]))
    return Labelled(x[fit], y[fit], x[val], y[val])


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
                  translate: int, mirror: bool):
    """One epoch of augmented (images, labels) batches, in an order fixed by (seed, epoch):
    `data.pretrain.translate_and_flip`, seeded by (seed, epoch, index)."""
    from data.pretrain import translate_and_flip

    order = np.random.default_rng([seed, 2, epoch]).permutation(len(y))
    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order], order.astype(np.int64)))

    def apply(image, label, index):
        stateless = tf.stack([tf.constant(seed * 100_003 + epoch, tf.int64), index])
        return translate_and_flip(image, translate, mirror, stateless, stateless + 1), label

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


def train(model, data: Labelled, cfg: FinetuneConfig, seed: int
          ) -> tuple[int, tuple[dict, ...]]:
    """Fine-tune every trainable variable; returns (best epoch, per-epoch history).

    The plateau rule watches the validation loss (the training loss without validation).
    """
    optimizer = precision.loss_scaled(
        keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay or None), cfg.mixed_precision)
    optimizer.build(model.trainable_variables)
    translate = cfg.translate
    if translate is None:
        translate = max(1, round(model.input_shape[1] / 16))

    @tf.function(reduce_retracing=True)
    def step(x, y):
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            logits = model(x, training=True)["logits"]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            target = precision.scale_loss(optimizer, loss)
        gradients = precision.unscaled_gradients(optimizer, tape, target, variables)
        precision.apply_gradients(optimizer, gradients, variables)
        return loss

    lr = cfg.learning_rate
    best_loss, best_epoch, best_weights, wait, cuts = np.inf, 0, None, 0, 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        losses = [float(step(x, y)) for x, y in
                  train_batches(data.x_fit, data.y_fit, cfg.batch_size, seed, epoch, translate,
                                cfg.mirrored)]
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
    model, loaded = initial_model(name, kwargs, init, seed, cfg.mixed_precision)
    best_epoch, history = train(model, data, cfg, seed)
    best = history[best_epoch - 1] if best_epoch else history[-1]
    test_indices = np.arange(cfg.max_test_examples) if cfg.max_test_examples else None
    test = labelled.load(cfg.source, "test", model.input_shape[1:], test_indices).batch(256)
    test_loss, test_acc = evaluate(model, test)
    return RunResult(seed, init or NONE, len(loaded.loaded) if loaded else 0, len(history),
                     best_epoch, best["val_loss"], best["val_accuracy"], test_loss, test_acc,
                     history)


def run(cfg: FinetuneConfig) -> tuple[dict[str, list[RunResult]], str]:
    """Every seed, pretrained (unless --init=none) and, with compare_scratch, from scratch.

    Returns ({"pretrained"|"scratch": [RunResult per seed]}, console table)."""
    from models import build_model

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
            results[key].append(run_seed(cfg, name, kwargs, init, seed, data))

    labels = f"{cfg.labels}/class" if cfg.labels else "all"
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
    table = report.write_report(cfg.out, "finetune", payload, headers, rows, title)
    report.write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    return results, f"{title}\n{table}"


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
