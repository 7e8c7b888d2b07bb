"""Linear and MLP probes on frozen features (NAT Sec. 4, Table 3; the protocol below).

Protocol of `run_probe` for a frozen network f and endpoints e_1..e_m:

1. Labels of the train split are read; for each repetition s = 0..splits-1, k labelled
   examples per class are drawn from train with the generator seeded by (seed, s)
   (`labels_per_class=0`: every train example; STL-10 `stl10_folds`: the predefined fold s).
2. Images of the union of the draws are read once, passed through f in inference mode and
   pooled (`evaluation.features`: adaptive pooling of each map to at most `max_dims`
   features, or `pool_size` cells a side).
3. Per repetition, a stratified validation set (fraction `val_fraction` of each class, at
   least one example) is carved from the drawn examples. The classifier
   (`evaluation.classifiers`: linear, mlp or knn) chooses its hyperparameter on it and never
   sees the test split.
4. Only then is the test split read, once, and every classifier is scored on it. The result
   is the accuracy per repetition, with its mean and (population) std.

The network's variables are never written: features come from `model(x, training=False)`
and only the classifier is trained.

`probe(model, endpoint, dataset, labels_per_class, splits)` is the one-number version the
pretraining loop calls every few epochs; on `digits` with `nin_mnist` it takes a few seconds.

Models are keras.Model with a dict of endpoints (see `models`), or an export
(`serving.client.SavedModelClient`). The endpoint `pixels` is the model input itself, a
reference row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from data import labelled
from evaluation import classifiers
from evaluation.classifiers import Fitted, KnnHead, LinearHead, MLPHead
from evaluation.features import (
    MAX_DIMS,
    PIXELS,
    check_endpoints,
    extract_features,
    model_input_shape,
)
from runtime.errors import InvalidInput

HEADS = classifiers.HEADS
POOLS = ("avg", "max")


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
            raise InvalidInput(f"splits={splits} but there are only {len(folds)} folds")
        return [np.sort(folds[s]) for s in range(splits)]
    if labels_per_class == 0:
        return [np.arange(len(labels), dtype=np.int64)] * splits
    return [labelled.per_class_draw(labels, labels_per_class, np.random.default_rng([seed, s]),
                                    num_classes, what) for s in range(splits)]


def _with_folds(source: labelled.LabelledSource) -> tuple[labelled.LabelledSource, list]:
    if source.name != "stl10":
        raise InvalidInput(f"stl10_folds applies to stl10, not {source.name}")
    directory = labelled.stl10_directory(source)
    if directory is None:
        raise InvalidInput("stl10_folds needs the STL-10 binary folder (stl10_dir, or "
                           "manual_dir/stl10_binary) with fold_indices.txt")
    folds = labelled.stl10_folds(directory)
    return labelled.LabelledSource(source.name, source.data_dir, source.manual_dir, directory,
                                   source.prepare), folds


@dataclass(frozen=True)
class ProbeSettings:
    """How features are pooled and classified (see `run_probe`)."""

    head: str = "linear"
    pool: str = "avg"
    pool_size: int | None = None
    max_dims: int = MAX_DIMS
    val_fraction: float = 0.2
    batch_size: int = 256
    linear: LinearHead = dataclasses.field(default_factory=LinearHead)
    mlp: MLPHead = dataclasses.field(default_factory=MLPHead)
    knn: KnnHead = dataclasses.field(default_factory=KnnHead)


def run_probe(model, endpoints: Sequence[str], dataset: str | labelled.LabelledSource,
              labels_per_class: int = 10, splits: int = 5, *, seed: int = 0,
              stl10_folds: bool = False, max_test_examples: int | None = None,
              input_shape: tuple[int, int, int] | None = None,
              settings: ProbeSettings | None = None, **overrides) -> ProbeResult:
    """The probe protocol of the module docstring, for several endpoints at once.

    Args:
      model: a keras.Model returning a dict of endpoints, or a SavedModelClient.
      endpoints: endpoint names (`pixels` for the input itself).
      dataset: a name of data.LABELLED_DATASETS or a data.labelled.LabelledSource.
      labels_per_class: k labelled train examples per class (0: all of train).
      splits: repetitions (each its own draw of k per class).
      stl10_folds: STL-10 only: repetition s trains on the predefined fold s.
      max_test_examples: score on the first n test examples only (quick runs).
      input_shape: the images' (H, W, C); by default the model's input shape.
      settings, overrides: the ProbeSettings (fields may be given as keywords).

    Returns a ProbeResult with every split's accuracy.
    """
    settings = dataclasses.replace(settings or ProbeSettings(), **overrides)
    source = labelled.as_source(dataset)
    check_endpoints(model, endpoints)
    if settings.head not in HEADS:
        raise ValueError(f"unknown head {settings.head!r}; choose one of {', '.join(HEADS)}")
    if labels_per_class < 0:
        raise ValueError(f"labels_per_class must be >= 0; got {labels_per_class}")
    shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
    num_classes = source.num_classes
    folds = None
    if stl10_folds:
        source, folds = _with_folds(source)
    train_labels = labelled.load_labels(source, "train")
    draws = draw_splits(train_labels, labels_per_class, splits, seed, num_classes, folds,
                        f"{source.name} train")
    union = np.unique(np.concatenate(draws))
    pooling = dict(pool=settings.pool, pool_size=settings.pool_size, max_dims=settings.max_dims,
                   batch_size=settings.batch_size)
    train = extract_features(model, endpoints, labelled.load(source, "train", shape, union),
                             **pooling)
    fitted = _fit_all(train, union, draws, endpoints, num_classes, seed, settings)
    # Every choice is made; the test split is read now, once.
    test_indices = None if max_test_examples is None else np.arange(max_test_examples)
    test = extract_features(model, endpoints,
                            labelled.load(source, "test", shape, test_indices), **pooling)
    results = []
    for e in endpoints:
        per_split = tuple(
            SplitResult(s, n_fit, n_val, f.hyper, f.val_accuracy,
                        classifiers.accuracy(f.predict(test.values[e]), test.labels))
            for s, (f, n_fit, n_val) in enumerate(fitted[e]))
        results.append(EndpointResult(e, train.shapes[e], int(train.values[e].shape[1]),
                                      per_split))
    return ProbeResult(source.name, settings.head, labels_per_class, len(union),
                       len(test.labels), tuple(results))


def _fit_all(train, union, draws, endpoints, num_classes: int, seed: int,
             settings: ProbeSettings) -> dict[str, list[tuple[Fitted, int, int]]]:
    """Per endpoint, per repetition: (the fitted classifier, fit examples, val examples)."""
    fitted: dict[str, list[tuple[Fitted, int, int]]] = {e: [] for e in endpoints}
    for s, draw in enumerate(draws):
        rows = np.searchsorted(union, draw)
        labels = train.labels[rows]
        fit, val = labelled.split_validation(labels, settings.val_fraction,
                                             np.random.default_rng([seed, s, 1]))
        for e in endpoints:
            x = train.values[e][rows]
            model_s = classifiers.fit_classifier(
                settings.head, x[fit], labels[fit], x[val], labels[val], num_classes,
                linear=settings.linear, mlp=settings.mlp, knn=settings.knn, seed=seed + s)
            fitted[e].append((model_s, len(fit), len(val)))
    return fitted


def probe(model, endpoint: str, dataset: str | labelled.LabelledSource, labels_per_class: int,
          splits: int, **kwargs) -> float:
    """Mean test accuracy (in [0, 1]) over `splits` draws of `labels_per_class` labels per class
    of a probe on `endpoint` of the frozen `model`; `kwargs` as in `run_probe`."""
    result = run_probe(model, [endpoint], dataset, labels_per_class, splits, **kwargs)
    return result.endpoints[0].mean


__all__ = ["HEADS", "PIXELS", "POOLS", "EndpointResult", "ProbeResult", "ProbeSettings",
           "SplitResult", "draw_splits", "probe", "run_probe"]
