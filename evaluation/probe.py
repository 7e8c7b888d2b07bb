"""Linear and MLP probes on frozen features (NAT Sec. 4, Table 3; DESIGN "Evaluation protocols").

Protocol of `run_probe` for a frozen network f and endpoints e_1..e_m:

1. Labels of the train split are read; for each repetition s = 0..splits-1, k labelled
   examples per class are drawn from train with the generator seeded by (seed, s)
   (`labels_per_class=0`: every train example; STL-10 `stl10_folds`: the predefined fold s).
2. Images of the union of the draws are read once, passed through f in inference mode
   (BN moving statistics, no dropout, no gradient), and each endpoint map [N, h, w, c] is
   pooled to [N, h', w', c] by adaptive average (or max) pooling and flattened. Bin i of an
   axis of length h covers [floor(i h / h'), ceil((i + 1) h / h')). h' = min(h, p) with p the
   stated `pool_size`, or by default the largest p with p * p * c <= `max_dims` (9216 = 6 x 6 x
   256, AlexNet's pool5, about the size Zhang et al. 2016 resize conv maps to). Vector
   endpoints are used as they are.
3. Per repetition, a stratified validation set (fraction `val_fraction` of each class, at
   least one example) is carved from the drawn examples. The classifier's hyperparameters
   are chosen on it; the classifier never sees the test split.
   - linear: multinomial logistic regression (`logistic_regression`) on standardised
     features (mean and std of the fitting examples), L2 strength 1/C with C chosen from
     `LinearHead.cs` by validation accuracy (ties go to the smaller C), then refitted on all
     drawn examples.
   - mlp: the paper's classifier (Krizhevsky et al. 2012, as in NAT Table 3): fc 4096 - BN -
     ReLU - dropout 0.5 - fc 4096 - BN - ReLU - dropout 0.5 - fc classes, trained by SGD with
     momentum on standardised features; the epoch with the best validation accuracy is kept.
4. Only then is the test split read, once, and every classifier is scored on it. The result
   is the accuracy per repetition, with its mean and (population) std.

The network's variables are never written: features come from `model(x, training=False)`
and only the classifier is trained.

`probe(model, endpoint, dataset, labels_per_class, splits)` is the one-number version the
pretraining loop calls every few epochs; on `digits` with `nin_mnist` it takes a few seconds.

Models are keras.Model with a dict of endpoints (see `models`), or a SavedModel
(`SavedModelFeatures`). The endpoint `pixels` is the model input itself, a reference row.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from evaluation import datasets
from models import build_model
from models.weights import LoadReport, load_weights, resolve_checkpoint

PIXELS = "pixels"
HEADS = ("linear", "mlp")
POOLS = ("avg", "max")
MAX_DIMS = 9216


# --------------------------------------------------------------------------------------------
# models


def read_model_config(model_dir: str) -> dict:
    """The `config.json` of a training model_dir: {"model", "model_kwargs", ...}."""
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"no config.json in model_dir {model_dir}")
    with tf.io.gfile.GFile(path) as f:
        config = json.load(f)
    for key in ("model", "model_kwargs"):
        if key not in config:
            raise ValueError(f"{path} has no {key!r}")
    return config


def backbone_layers(name: str, **kwargs) -> tuple[str, ...]:
    """Names of the layers with weights in the model built without a head: the layers a
    pretraining checkpoint must provide."""
    kwargs = {**kwargs, "head": "none"}
    return tuple(layer.name for layer in build_model(name, **kwargs).layers if layer.weights)


def load_model_dir(model_dir: str, **overrides) -> tuple[keras.Model, LoadReport, dict]:
    """Build the model of a training model_dir and load its latest checkpoint.

    `overrides` replace entries of the stored model_kwargs (for example head="softmax",
    num_classes=10). Every backbone layer must be in the checkpoint.

    Raises FileNotFoundError when the directory has no config.json or no checkpoint, and
    ValueError when the checkpoint does not fit the model.
    """
    config = read_model_config(model_dir)
    resolve_checkpoint(model_dir)  # fails before the (possibly large) model is built
    kwargs = {**config["model_kwargs"], **overrides}
    model = build_model(config["model"], **kwargs)
    report = load_weights(model, model_dir, require=backbone_layers(config["model"], **kwargs))
    return model, report, config


class SavedModelFeatures:
    """A SavedModel's signature as a feature extractor: images float [N, H, W, C] in [0, 1]
    -> {endpoint: tensor}.

    The signature takes one image tensor; a uint8 input gets round(255 x), a float input x.
    """

    def __init__(self, path: str, signature: str = "serving_default",
                 input_shape: tuple[int, int, int] | None = None):
        if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
            raise FileNotFoundError(f"no saved_model.pb in {path}")
        self._loaded = tf.saved_model.load(path)
        if signature not in self._loaded.signatures:
            raise ValueError(f"SavedModel {path} has no signature {signature!r}; it has "
                             f"{', '.join(self._loaded.signatures)}")
        self._fn = self._loaded.signatures[signature]
        _, specs = self._fn.structured_input_signature
        if len(specs) != 1:
            raise ValueError(f"signature {signature!r} of {path} takes {len(specs)} inputs; "
                             "expected one image tensor")
        (self._input_name, self._spec), = specs.items()
        shape = tuple(self._spec.shape[1:])
        if input_shape is None:
            if None in shape:
                raise ValueError(f"SavedModel {path} takes images of shape {shape}; state the "
                                 "input shape")
            input_shape = shape
        self.input_shape = (None, *input_shape)
        self.endpoints = tuple(self._fn.structured_outputs)
        self.name = os.path.basename(os.path.normpath(path))

    def __call__(self, images, training: bool = False) -> dict[str, tf.Tensor]:
        del training  # a SavedModel signature is always in inference mode
        x = tf.convert_to_tensor(images, tf.float32)
        if self._spec.dtype == tf.uint8:
            x = tf.cast(tf.clip_by_value(tf.round(x * 255.0), 0.0, 255.0), tf.uint8)
        else:
            x = tf.cast(x, self._spec.dtype)
        return self._fn(**{self._input_name: x})


def endpoint_names(model) -> tuple[str, ...]:
    """The endpoints a model offers, `pixels` included."""
    if isinstance(model, SavedModelFeatures):
        names = model.endpoints
    else:
        output = model.output
        if not isinstance(output, dict):
            raise ValueError(f"model {model.name} does not return a dict of endpoints")
        names = tuple(output)
    return (*names, PIXELS)


def check_endpoints(model, endpoints: Sequence[str]) -> None:
    """Raise ValueError naming the first endpoint the model does not have, and the valid ones."""
    valid = endpoint_names(model)
    for endpoint in endpoints:
        if endpoint not in valid:
            raise ValueError(f"unknown endpoint {endpoint!r} of {model.name}; choose from "
                             f"{', '.join(valid)}")


def model_input_shape(model) -> tuple[int, int, int]:
    """(H, W, C) of the images a model takes."""
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise ValueError(f"model {model.name} has no fixed image input shape: {shape}")
    return tuple(int(d) for d in shape)


# --------------------------------------------------------------------------------------------
# features


def pooled_size(shape: Sequence[int], pool_size: int | None = None, max_dims: int = MAX_DIMS
                ) -> tuple[int, int]:
    """(h', w') for a map of shape (h, w, c): min(h, p), min(w, p) with p = pool_size, or the
    largest p with p * p * c <= max_dims (at least 1)."""
    h, w, c = (int(d) for d in shape)
    if pool_size is None:
        p = max(1, math.isqrt(max(max_dims, 1) // c))
    else:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1; got {pool_size}")
        p = pool_size
    return min(h, p), min(w, p)


def _bins(length: int, out: int) -> list[tuple[int, int]]:
    return [(i * length // out, -((-(i + 1) * length) // out)) for i in range(out)]


def adaptive_pool(x: tf.Tensor, size: tuple[int, int], mode: str = "avg") -> tf.Tensor:
    """[N, h, w, c] -> [N, h', w', c]: mean (or max) over bin (i, j) = rows
    [floor(i h / h'), ceil((i + 1) h / h')) x columns [floor(j w / w'), ceil((j + 1) w / w'))."""
    if mode not in POOLS:
        raise ValueError(f"unknown pool {mode!r}; choose one of {', '.join(POOLS)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    if (h, w) == tuple(size):
        return x
    reduce = tf.reduce_mean if mode == "avg" else tf.reduce_max
    rows = []
    for r0, r1 in _bins(h, size[0]):
        cells = [reduce(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for c0, c1 in _bins(w, size[1])]
        rows.append(tf.stack(cells, axis=1))
    return tf.stack(rows, axis=1)


@dataclass(frozen=True)
class Features:
    """Pooled features of one split: {endpoint: float32 [N, D]}, labels int64 [N], and the
    pooled shape (h', w', c) (or (D,)) of each endpoint."""

    values: dict[str, np.ndarray]
    labels: np.ndarray
    shapes: dict[str, tuple[int, ...]]


def extract_features(model, endpoints: Sequence[str], dataset: tf.data.Dataset, *,
                     pool: str = "avg", pool_size: int | None = None, max_dims: int = MAX_DIMS,
                     batch_size: int = 256) -> Features:
    """Run the frozen model over an unbatched (image, label) dataset and pool the endpoints."""
    check_endpoints(model, endpoints)
    wanted = [e for e in endpoints if e != PIXELS]

    def pooled(x):
        if x.shape.rank == 2:
            return x
        if x.shape.rank != 4:
            raise ValueError(f"endpoint of rank {x.shape.rank}; expected 2 or 4")
        return adaptive_pool(x, pooled_size(x.shape[1:], pool_size, max_dims), pool)

    @tf.function(reduce_retracing=True)
    def forward(images):
        outputs = model(images, training=False) if wanted else {}
        result = {e: pooled(tf.cast(outputs[e], tf.float32)) for e in wanted}
        if PIXELS in endpoints:
            result[PIXELS] = pooled(images)
        return result

    values = {e: [] for e in endpoints}
    labels, shapes = [], {}
    for images, y in dataset.batch(batch_size).prefetch(2):
        out = forward(images)
        for e in endpoints:
            shapes[e] = tuple(out[e].shape[1:])
            values[e].append(out[e].numpy().reshape(len(y), -1))
        labels.append(y.numpy())
    if not labels:
        raise ValueError("no examples to extract features from")
    return Features({e: np.concatenate(v) for e, v in values.items()}, np.concatenate(labels),
                    shapes)


# --------------------------------------------------------------------------------------------
# classifiers


@dataclass(frozen=True)
class LinearHead:
    """Multinomial logistic regression (L-BFGS); C = inverse L2 strength, chosen on validation;
    `default_c` when there is no validation example."""

    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
    default_c: float = 1.0
    max_iter: int = 500


@dataclass(frozen=True)
class MLPHead:
    """fc width - BN - ReLU - dropout - fc width - BN - ReLU - dropout - fc classes."""

    width: int = 4096
    dropout: float = 0.5
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class Fitted:
    """A trained classifier: predict(features [N, D]) -> int64 labels [N]."""

    predict: Callable[[np.ndarray], np.ndarray]
    hyper: dict
    val_accuracy: float | None


def _standardizer(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # constant features (dead units) stay at zero
    return lambda z: ((z - mean) / std).astype(np.float32)


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def logistic_regression(x: np.ndarray, y: np.ndarray, c: float, num_classes: int,
                        max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: W [D, K], b [K] minimising

        sum_i (logsumexp(x_i W + b) - (x_i W + b)[y_i]) + ||W||^2 / (2 C)

    (scikit-learn's objective up to the factor C; b is not penalised), by L-BFGS in float64.
    When N < D the optimum lies in the row space of X: with X X^T = U S^2 U^T (rank r) and
    V = X^T U S^-1 (orthonormal columns), W = V B and ||W|| = ||B||, so the same problem is
    solved on the r coordinates X V = U S.
    """
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, np.float64)
    n, d = x.shape
    onehot = np.eye(num_classes)[np.asarray(y)]
    # Small problems: BLAS threads only contend (with TensorFlow's too) and slow L-BFGS down.
    with threadpool_limits(limits=1 if n * d < 10_000_000 else None):
        basis = None
        if n < d:
            eigenvalues, u = np.linalg.eigh(x @ x.T)
            keep = eigenvalues > 1e-10 * max(eigenvalues.max(), 1e-300)
            s, u = np.sqrt(eigenvalues[keep]), u[:, keep]
            basis = x.T @ (u / s)  # [D, r]
            x = u * s
        w, b = _minimize_logistic(x, onehot, c, max_iter)
    return (w if basis is None else basis @ w), b


def _minimize_logistic(x: np.ndarray, onehot: np.ndarray, c: float, max_iter: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import minimize
    from scipy.special import logsumexp, softmax

    num_classes = onehot.shape[1]
    dims = x.shape[1]

    def objective(theta):
        w = theta[:-num_classes].reshape(dims, num_classes)
        logits = x @ w + theta[-num_classes:]
        residual = softmax(logits, axis=1) - onehot
        loss = np.sum(logsumexp(logits, axis=1) - np.sum(logits * onehot, axis=1))
        grad = np.concatenate([(x.T @ residual + w / c).ravel(), residual.sum(axis=0)])
        return loss + np.sum(w * w) / (2 * c), grad

    theta0 = np.zeros(dims * num_classes + num_classes)
    solution = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                        options={"maxiter": max_iter, "gtol": 1e-6})
    return solution.x[:-num_classes].reshape(dims, num_classes), solution.x[-num_classes:]


def _fit_linear(x, y, c: float, cfg: LinearHead, num_classes: int):
    standardize = _standardizer(x)
    w, b = logistic_regression(standardize(x), y, c, num_classes, cfg.max_iter)
    return lambda z: np.argmax(standardize(z) @ w + b, axis=1).astype(np.int64)


def fit_linear(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               num_classes: int, cfg: LinearHead = LinearHead()) -> Fitted:
    """Choose C on validation, then refit on fit + validation with that C."""
    if len(y_val) == 0:
        return Fitted(_fit_linear(x_fit, y_fit, cfg.default_c, cfg, num_classes),
                      {"C": cfg.default_c}, None)
    scores = [_accuracy(_fit_linear(x_fit, y_fit, c, cfg, num_classes)(x_val), y_val)
              for c in cfg.cs]
    best = int(np.argmax(scores))  # first maximum: the smallest such C
    c = cfg.cs[best]
    predict = _fit_linear(np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val]), c, cfg,
                          num_classes)
    return Fitted(predict, {"C": c}, scores[best])


def mlp_classifier(input_dim: int, num_classes: int, cfg: MLPHead, seed: int) -> keras.Model:
    """The MLP head as a keras.Model: features [N, input_dim] -> logits [N, num_classes]."""
    def dense(units, name, i):
        return keras.layers.Dense(units, kernel_initializer=keras.initializers.HeNormal(seed + i),
                                  name=name)

    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    for i, name in enumerate(("fc1", "fc2")):
        x = dense(cfg.width, name, i)(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        x = keras.layers.Dropout(cfg.dropout, seed=seed + 10 + i, name=f"{name}_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32",
                                kernel_initializer=keras.initializers.GlorotUniform(seed + 2))(x)
    return keras.Model(inputs, logits, name="mlp_probe")


def fit_mlp(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            num_classes: int, cfg: MLPHead = MLPHead(), seed: int = 0) -> Fitted:
    """Train the MLP head; keep the weights of the epoch with the best validation accuracy
    (the last epoch when there is no validation example)."""
    standardize = _standardizer(x_fit)
    xf, xv = standardize(x_fit), standardize(x_val)
    net = mlp_classifier(xf.shape[1], num_classes, cfg, seed)
    optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
    optimizer.build(net.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, net(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, net.trainable_variables),
                                      net.trainable_variables, strict=True))

    @tf.function(reduce_retracing=True)
    def infer(x):
        return tf.argmax(net(x, training=False), axis=-1)

    def predict(z):
        return np.concatenate([infer(z[i:i + 1024]).numpy()
                               for i in range(0, len(z), 1024)]).astype(np.int64)

    rng = np.random.default_rng(seed)
    best_acc, best_epoch, best_weights = -1.0, cfg.epochs, None
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(xf))
        for i in range(0, len(order), cfg.batch_size):
            batch = order[i:i + cfg.batch_size]
            if len(batch) < 2 and len(order) > 1:
                continue  # BN needs two examples
            step(xf[batch], y_fit[batch])
        if len(y_val):
            acc = _accuracy(predict(xv), y_val)
            if acc > best_acc:
                best_acc, best_epoch, best_weights = acc, epoch, net.get_weights()
    if best_weights is not None:
        net.set_weights(best_weights)
    return Fitted(lambda z: predict(standardize(z)), {"epochs": best_epoch},
                  best_acc if len(y_val) else None)


def fit_classifier(head: str, x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, num_classes: int, *, linear: LinearHead = LinearHead(),
                   mlp: MLPHead = MLPHead(), seed: int = 0) -> Fitted:
    """Train the `head` classifier ("linear" or "mlp") on fit, selecting on validation."""
    if head == "linear":
        return fit_linear(x_fit, y_fit, x_val, y_val, num_classes, linear)
    if head == "mlp":
        return fit_mlp(x_fit, y_fit, x_val, y_val, num_classes, mlp, seed)
    raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


# --------------------------------------------------------------------------------------------
# the protocol


@dataclass(frozen=True)
class SplitResult:
    """One repetition: examples used to fit and to validate, the chosen hyperparameters, the
    validation accuracy of the choice (None without validation) and the test accuracy."""

    split: int
    fit_examples: int
    val_examples: int
    hyper: dict
    val_accuracy: float | None
    test_accuracy: float


@dataclass(frozen=True)
class EndpointResult:
    endpoint: str
    shape: tuple[int, ...]
    dims: int
    splits: tuple[SplitResult, ...]

    @property
    def accuracies(self) -> np.ndarray:
        return np.asarray([s.test_accuracy for s in self.splits])

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def std(self) -> float:
        return float(self.accuracies.std())


@dataclass(frozen=True)
class ProbeResult:
    dataset: str
    head: str
    labels_per_class: int
    train_examples: int
    test_examples: int
    endpoints: tuple[EndpointResult, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset, "head": self.head,
            "labels_per_class": self.labels_per_class,
            "train_examples": self.train_examples, "test_examples": self.test_examples,
            "endpoints": [
                {"endpoint": e.endpoint, "shape": list(e.shape), "dims": e.dims,
                 "mean": e.mean, "std": e.std,
                 "splits": [{"split": s.split, "fit_examples": s.fit_examples,
                             "val_examples": s.val_examples, "hyper": s.hyper,
                             "val_accuracy": s.val_accuracy,
                             "test_accuracy": s.test_accuracy} for s in e.splits]}
                for e in self.endpoints
            ],
        }


def draw_splits(labels: np.ndarray, labels_per_class: int, splits: int, seed: int,
                num_classes: int, folds: list[np.ndarray] | None = None,
                what: str = "train") -> list[np.ndarray]:
    """Positions in train of each repetition: k per class drawn with seed (seed, s); all of
    train when k = 0; fold s when `folds` are given."""
    if splits < 1:
        raise ValueError(f"splits must be >= 1; got {splits}")
    if folds is not None:
        if splits > len(folds):
            raise ValueError(f"splits={splits} but there are only {len(folds)} folds")
        return [np.sort(folds[s]) for s in range(splits)]
    if labels_per_class == 0:
        return [np.arange(len(labels), dtype=np.int64)] * splits
    return [datasets.per_class_draw(labels, labels_per_class, np.random.default_rng([seed, s]),
                                    num_classes, what) for s in range(splits)]


def run_probe(model, endpoints: Sequence[str], dataset: str | datasets.Source,
              labels_per_class: int = 10, splits: int = 5, *, head: str = "linear",
              pool: str = "avg", pool_size: int | None = None, max_dims: int = MAX_DIMS,
              val_fraction: float = 0.2, seed: int = 0, stl10_folds: bool = False,
              max_test_examples: int | None = None, batch_size: int = 256,
              linear: LinearHead = LinearHead(), mlp: MLPHead = MLPHead(),
              input_shape: tuple[int, int, int] | None = None) -> ProbeResult:
    """The probe protocol of the module docstring, for several endpoints at once.

    Args:
      model: a keras.Model returning a dict of endpoints, or a SavedModelFeatures.
      endpoints: endpoint names (`pixels` for the input itself).
      dataset: a name of datasets.DATASETS or a datasets.Source.
      labels_per_class: k labelled train examples per class (0: all of train).
      splits: repetitions (each its own draw of k per class).
      stl10_folds: STL-10 only: repetition s trains on the predefined fold s.
      max_test_examples: score on the first n test examples only (quick runs).
      input_shape: the images' (H, W, C); by default the model's input shape.

    Returns a ProbeResult with every split's accuracy.
    """
    source = datasets.as_source(dataset)
    check_endpoints(model, endpoints)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if labels_per_class < 0:
        raise ValueError(f"labels_per_class must be >= 0; got {labels_per_class}")
    shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
    num_classes = source.num_classes

    folds = None
    if stl10_folds:
        if source.name != "stl10":
            raise ValueError(f"stl10_folds applies to stl10, not {source.name}")
        directory = datasets.stl10_directory(source)
        if directory is None:
            raise ValueError("stl10_folds needs the STL-10 binary folder (stl10_dir, or "
                             "manual_dir/stl10_binary) with fold_indices.txt")
        folds = datasets.stl10_folds(directory)
        source = datasets.Source(source.name, source.data_dir, source.manual_dir, directory,
                                 source.prepare)
    train_labels = datasets.load_labels(source, "train")
    draws = draw_splits(train_labels, labels_per_class, splits, seed, num_classes, folds,
                        f"{source.name} train")
    union = np.unique(np.concatenate(draws))
    train = extract_features(model, endpoints, datasets.load(source, "train", shape, union),
                             pool=pool, pool_size=pool_size, max_dims=max_dims,
                             batch_size=batch_size)

    fitted: dict[str, list[tuple[Fitted, int, int]]] = {e: [] for e in endpoints}
    for s, draw in enumerate(draws):
        rows = np.searchsorted(union, draw)
        labels = train.labels[rows]
        fit, val = datasets.split_validation(labels, val_fraction,
                                             np.random.default_rng([seed, s, 1]))
        for e in endpoints:
            x = train.values[e][rows]
            model_s = fit_classifier(head, x[fit], labels[fit], x[val], labels[val],
                                     num_classes, linear=linear, mlp=mlp, seed=seed + s)
            fitted[e].append((model_s, len(fit), len(val)))

    # Every choice is made; the test split is read now, once.
    test_indices = None if max_test_examples is None else np.arange(max_test_examples)
    test = extract_features(model, endpoints,
                            datasets.load(source, "test", shape, test_indices),
                            pool=pool, pool_size=pool_size, max_dims=max_dims,
                            batch_size=batch_size)
    results = []
    for e in endpoints:
        per_split = tuple(
            SplitResult(s, n_fit, n_val, f.hyper, f.val_accuracy,
                        _accuracy(f.predict(test.values[e]), test.labels))
            for s, (f, n_fit, n_val) in enumerate(fitted[e]))
        results.append(EndpointResult(e, train.shapes[e], int(train.values[e].shape[1]),
                                      per_split))
    return ProbeResult(source.name, head, labels_per_class, len(union), len(test.labels),
                       tuple(results))


def probe(model, endpoint: str, dataset: str | datasets.Source, labels_per_class: int,
          splits: int, **kwargs) -> float:
    """Mean test accuracy (in [0, 1]) over `splits` draws of `labels_per_class` labels per class
    of a probe on `endpoint` of the frozen `model`; `kwargs` as in `run_probe`."""
    result = run_probe(model, [endpoint], dataset, labels_per_class, splits, **kwargs)
    return result.endpoints[0].mean
