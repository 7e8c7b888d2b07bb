"""Linear and MLP probes on frozen features (NAT Sec. 4, Table 3; the protocol below).

Protocol of `run_probe` for a frozen network f and endpoints e_1..e_m:

0. The scored split is the test split (`evaluate_on="test"`), or (`"validation"`, to search
   recipes) a holdout of `holdout_per_class` train examples per class drawn with the generator
   seeded by (seed, *HOLDOUT_STREAM), the same for every network and every draw; the labels
   below are then drawn from the rest of train only, and the test split is never read.
1. Labels of the train split are read; for each repetition s = 0..splits-1, k labelled
   examples per class are drawn from train (outside the holdout) with the generator seeded by
   (seed, s) (`labels_per_class=0`: every such example; STL-10 `stl10_folds`: the predefined
   fold s).
2. Images of the union of the draws are read once, passed through f in inference mode and
   pooled (`evaluation.features`: adaptive pooling of each map to at most `max_dims`
   features, or `pool_size` cells a side).
3. Per repetition, a stratified validation set (fraction `val_fraction` of each class, at
   least one example) is carved from the drawn examples. The classifier
   (`evaluation.classifiers`: linear, mlp or knn) chooses its hyperparameter on it and never
   sees the scored split.
4. Only then is the scored split read, once, and every classifier is scored on it. The result
   is the accuracy per repetition, with its mean and (population) std.

Features extracted once serve many probes: `extract_probe_features` pools a network's train
(outside the holdout) and scored features into a ProbeFeatures; `run_probe(..., features=it)`
then draws, fits and scores without calling the network (any labels_per_class, splits, head),
with the accuracies of a fresh run. The scored split was read early then; step 3 still ignores it.

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
    Features,
    check_endpoints,
    extract_features,
    model_input_shape,
)
from runtime.errors import InvalidInput

HEADS = classifiers.HEADS
POOLS = ("avg", "max")
EVALUATE_ON = ("test", "validation")
HOLDOUT_PER_CLASS = 1000
# the holdout generator's entropy after the seed; no draw (seed, s) or carve (seed, s, 1) has it
HOLDOUT_STREAM = (0, 0, 0, 1)


@dataclass(frozen=True)
class SplitResult:
    """One repetition: examples used to fit and to validate, the chosen hyperparameters, the
    validation accuracy of the choice (None without validation) and the accuracy on the scored
    split (`test_accuracy`: of the test split or the holdout; ProbeResult says which)."""

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
    """Every accuracy of a probe; `scored_split` is "test" or "validation" (the holdout), of
    `scored_examples`; `test_examples` test images were read (0 with the holdout)."""

    dataset: str
    head: str
    labels_per_class: int
    train_examples: int
    test_examples: int
    endpoints: tuple[EndpointResult, ...] = field(default_factory=tuple)
    scored_split: str = "test"
    scored_examples: int = 0
    holdout_per_class: int | None = None

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset, "head": self.head,
            "labels_per_class": self.labels_per_class,
            "train_examples": self.train_examples, "test_examples": self.test_examples,
            "scored_split": self.scored_split, "scored_examples": self.scored_examples,
            "holdout_per_class": self.holdout_per_class,
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
                what: str = "train", among: np.ndarray | None = None) -> list[np.ndarray]:
    """Positions in train of each repetition: k per class drawn with seed (seed, s); all of
    train when k = 0; fold s when `folds` are given. `among` (sorted positions) restricts
    the draws to those examples (the train split outside a validation holdout)."""
    if splits < 1:
        raise ValueError(f"splits must be >= 1; got {splits}")
    if folds is not None:
        if splits > len(folds):
            raise InvalidInput(f"splits={splits} but there are only {len(folds)} folds")
        return [np.sort(folds[s]) for s in range(splits)]
    among = np.arange(len(labels), dtype=np.int64) if among is None else np.asarray(among)
    if labels_per_class == 0:
        return [among] * splits
    return [among[labelled.per_class_draw(labels[among], labels_per_class,
                                          np.random.default_rng([seed, s]), num_classes, what)]
            for s in range(splits)]


class HoldoutError(InvalidInput):
    """A validation holdout of more examples per class than the train split can give."""


def validation_holdout(labels: np.ndarray, holdout_per_class: int, seed: int,
                       num_classes: int, what: str = "train") -> np.ndarray:
    """The validation holdout: `holdout_per_class` positions per class of `labels` (the train
    split), drawn by `data.labelled.per_class_draw` with the generator seeded by
    (seed, *HOLDOUT_STREAM); sorted int64.

    Raises HoldoutError naming the smallest class when none of it would be left to draw."""
    if holdout_per_class < 1:
        raise HoldoutError(f"holdout_per_class must be >= 1; got {holdout_per_class}")
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    smallest = int(np.argmin(counts))
    if counts[smallest] <= holdout_per_class:
        raise HoldoutError(f"holdout_per_class={holdout_per_class}: class {smallest} of {what} "
                           f"has only {counts[smallest]} examples; the validation holdout must "
                           "leave some to draw labels from")
    return labelled.per_class_draw(labels, holdout_per_class,
                                   np.random.default_rng([seed, *HOLDOUT_STREAM]), num_classes,
                                   what)


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


@dataclass(frozen=True)
class ProbeFeatures:
    """A network's pooled features for probes (`extract_probe_features`).

    Attributes:
      dataset, endpoints: what was extracted.
      pooling: {"pool", "pool_size", "max_dims"} of the extraction.
      train_labels: every label of the train split, int64 [N] (the order of `load_labels`).
      train_positions, train: sorted positions in train, and the Features of those examples.
      scored_split: "test" or "validation" (the holdout).
      scored: Features of the scored split.
      holdout: sorted positions in train of the validation holdout (None with "test").
      holdout_per_class, seed: the holdout's size per class (None with "test") and its seed.
      max_test_examples, folds: the test split's first n only (None: all); STL-10's folds.
    """

    dataset: str
    endpoints: tuple[str, ...]
    pooling: dict
    train_labels: np.ndarray
    train_positions: np.ndarray
    train: Features | None
    scored_split: str
    scored: Features | None
    holdout: np.ndarray | None
    holdout_per_class: int | None
    seed: int
    max_test_examples: int | None
    folds: list[np.ndarray] | None

    @property
    def rest(self) -> np.ndarray:
        """Positions in train outside the holdout: the labels are drawn from these."""
        everything = np.arange(len(self.train_labels), dtype=np.int64)
        return everything if self.holdout is None else np.setdiff1d(everything, self.holdout)


def _pooling(settings: ProbeSettings) -> dict:
    return dict(pool=settings.pool, pool_size=settings.pool_size, max_dims=settings.max_dims)


def _prepare(dataset, endpoints: Sequence[str], evaluate_on: str, holdout_per_class: int,
             seed: int, stl10_folds: bool, max_test_examples: int | None,
             settings: ProbeSettings) -> tuple[labelled.LabelledSource, ProbeFeatures]:
    """(the source, a ProbeFeatures without features); reads the train labels only."""
    if evaluate_on not in EVALUATE_ON:
        raise ValueError(f"unknown evaluate_on {evaluate_on!r}; choose one of "
                         f"{', '.join(EVALUATE_ON)}")
    validation = evaluate_on == "validation"
    for name, given in (("stl10_folds", stl10_folds), ("max_test_examples", max_test_examples)):
        if validation and given not in (None, False):
            raise InvalidInput(f"{name} applies to the test split, not to a validation holdout")
    source, folds = _with_folds(labelled.as_source(dataset)) if stl10_folds else (
        labelled.as_source(dataset), None)
    train_labels = labelled.load_labels(source, "train")
    holdout = validation_holdout(train_labels, holdout_per_class, seed, source.num_classes,
                                 f"{source.name} train") if validation else None
    return source, ProbeFeatures(
        source.name, tuple(endpoints), _pooling(settings), train_labels,
        np.zeros(0, np.int64), None, evaluate_on, None, holdout,
        holdout_per_class if validation else None, seed, max_test_examples, folds)


def _draws(plan: ProbeFeatures, labels_per_class: int, splits: int, seed: int,
           num_classes: int) -> list[np.ndarray]:
    what = f"{plan.dataset} train" + (" outside the holdout" if plan.holdout is not None else "")
    return draw_splits(plan.train_labels, labels_per_class, splits, seed, num_classes,
                       plan.folds, what, plan.rest)


def _extract(model, endpoints, source, split: str, shape, indices,
             settings: ProbeSettings) -> Features:
    return extract_features(model, endpoints, labelled.load(source, split, shape, indices),
                            **_pooling(settings), batch_size=settings.batch_size)


def _extract_scored(model, endpoints, source, shape, plan: ProbeFeatures,
                    settings: ProbeSettings) -> Features:
    """The scored split's features: the holdout (from train), or the test split."""
    if plan.holdout is not None:
        return _extract(model, endpoints, source, "train", shape, plan.holdout, settings)
    first = None if plan.max_test_examples is None else np.arange(plan.max_test_examples)
    return _extract(model, endpoints, source, "test", shape, first, settings)


def extract_probe_features(model, endpoints: Sequence[str],
                           dataset: str | labelled.LabelledSource, *, evaluate_on: str = "test",
                           holdout_per_class: int = HOLDOUT_PER_CLASS, seed: int = 0,
                           labels_per_class: int | None = None, splits: int = 1,
                           stl10_folds: bool = False, max_test_examples: int | None = None,
                           input_shape: tuple[int, int, int] | None = None,
                           settings: ProbeSettings | None = None,
                           **overrides) -> ProbeFeatures:
    """Pool the features of `model` once, for any number of `run_probe(..., features=...)`.

    Train features: of every train example outside the holdout (`labels_per_class=None`: any
    later draw can be probed), or of the union of the `splits` draws of `labels_per_class`
    per class that run_probe makes with `seed`. Scored features: of the test split (its first
    `max_test_examples`) or of the holdout. Arguments and settings as in run_probe.
    """
    settings = dataclasses.replace(settings or ProbeSettings(), **overrides)
    check_endpoints(model, endpoints)
    shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
    source, plan = _prepare(dataset, endpoints, evaluate_on, holdout_per_class, seed,
                            stl10_folds, max_test_examples, settings)
    positions = plan.rest if labels_per_class is None else np.unique(np.concatenate(
        _draws(plan, labels_per_class, splits, seed, source.num_classes)))
    train = _extract(model, endpoints, source, "train", shape, positions, settings)
    scored = _extract_scored(model, endpoints, source, shape, plan, settings)
    return dataclasses.replace(plan, train_positions=positions, train=train, scored=scored)


def _check_reuse(features: ProbeFeatures, endpoints: Sequence[str], dataset: str, asked: dict,
                 settings: ProbeSettings) -> None:
    """Raise ValueError when run_probe asks for what `features` were not extracted with."""
    have = {"dataset": features.dataset, "pooling": features.pooling,
            "evaluate_on": features.scored_split, "stl10_folds": features.folds is not None,
            "max_test_examples": features.max_test_examples}
    asked = {**asked, "dataset": dataset, "pooling": _pooling(settings)}
    if features.holdout is not None:  # the holdout is drawn with the seed
        have.update(holdout_per_class=features.holdout_per_class, seed=features.seed)
    for name, value in have.items():
        if asked.get(name) is not None and asked[name] != value:
            raise ValueError(f"the features were extracted with {name}={value!r}, not "
                             f"{asked[name]!r}")
    missing = [e for e in endpoints if e not in features.endpoints]
    if missing:
        raise ValueError(f"the features hold no endpoint {', '.join(missing)}; they hold "
                         f"{', '.join(features.endpoints)}")


def run_probe(model, endpoints: Sequence[str], dataset: str | labelled.LabelledSource,
              labels_per_class: int = 10, splits: int = 5, *, seed: int = 0,
              stl10_folds: bool = False, max_test_examples: int | None = None,
              input_shape: tuple[int, int, int] | None = None,
              settings: ProbeSettings | None = None, evaluate_on: str | None = None,
              holdout_per_class: int | None = None, features: ProbeFeatures | None = None,
              **overrides) -> ProbeResult:
    """The probe protocol of the module docstring, for several endpoints at once.

    Args:
      model: a keras.Model returning a dict of endpoints, or a SavedModelClient (may be None
        with `features`: it is not called then).
      endpoints: endpoint names (`pixels` for the input itself).
      dataset: a name of data.LABELLED_DATASETS or a data.labelled.LabelledSource.
      labels_per_class: k labelled train examples per class (0: all of train).
      splits: repetitions (each its own draw of k per class).
      stl10_folds: STL-10 only: repetition s trains on the predefined fold s.
      max_test_examples: score on the first n test examples only (quick runs).
      input_shape: the images' (H, W, C); by default the model's input shape.
      settings, overrides: the ProbeSettings (fields may be given as keywords).
      evaluate_on: "test" (None: test, or the split `features` hold) or "validation": a
        holdout of `holdout_per_class` (None: HOLDOUT_PER_CLASS) train examples per class.
      features: `extract_probe_features` of this model; the network is not called again.

    Returns a ProbeResult with every split's accuracy.
    """
    settings = dataclasses.replace(settings or ProbeSettings(), **overrides)
    source = labelled.as_source(dataset)
    _check_arguments(model, endpoints, settings.head, labels_per_class)
    if features is None:
        shape = tuple(input_shape) if input_shape is not None else model_input_shape(model)
        source, plan = _prepare(source, endpoints, evaluate_on or "test",
                                HOLDOUT_PER_CLASS if holdout_per_class is None
                                else holdout_per_class, seed, stl10_folds, max_test_examples,
                                settings)
    else:
        _check_reuse(features, endpoints, source.name, {
            "evaluate_on": evaluate_on, "stl10_folds": stl10_folds,
            "max_test_examples": max_test_examples, "holdout_per_class": holdout_per_class,
            "seed": seed}, settings)
        plan = features
    draws = _draws(plan, labels_per_class, splits, seed, source.num_classes)
    union = np.unique(np.concatenate(draws))
    if features is None:
        plan = dataclasses.replace(plan, train_positions=union, train=_extract(
            model, endpoints, source, "train", shape, union, settings))
    elif not np.isin(union, plan.train_positions).all():
        raise ValueError("the features hold only some of the drawn train examples; extract "
                         "them with labels_per_class=None (every train example)")
    fitted = _fit_all(plan.train, plan.train_positions, draws, endpoints, source.num_classes,
                      seed, settings)
    # Every choice is made; the scored split is read now, once (unless given).
    scored = plan.scored if plan.scored is not None else _extract_scored(
        model, endpoints, source, shape, plan, settings)
    return _result(plan, scored, fitted, endpoints, settings.head, labels_per_class, len(union))


def _check_arguments(model, endpoints, head: str, labels_per_class: int) -> None:
    if model is not None:
        check_endpoints(model, endpoints)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if labels_per_class < 0:
        raise ValueError(f"labels_per_class must be >= 0; got {labels_per_class}")


def _result(plan: ProbeFeatures, scored: Features, fitted, endpoints, head: str,
            labels_per_class: int, train_examples: int) -> ProbeResult:
    """Score every fitted classifier on the scored split."""
    results = []
    for e in endpoints:
        per_split = tuple(
            SplitResult(s, n_fit, n_val, f.hyper, f.val_accuracy,
                        classifiers.accuracy(f.predict(scored.values[e]), scored.labels))
            for s, (f, n_fit, n_val) in enumerate(fitted[e]))
        results.append(EndpointResult(e, plan.train.shapes[e],
                                      int(plan.train.values[e].shape[1]), per_split))
    n = len(scored.labels)
    return ProbeResult(plan.dataset, head, labels_per_class, train_examples,
                       n if plan.holdout is None else 0, tuple(results), plan.scored_split, n,
                       plan.holdout_per_class)


def _fit_all(train: Features, positions: np.ndarray, draws, endpoints, num_classes: int,
             seed: int, settings: ProbeSettings) -> dict[str, list[tuple[Fitted, int, int]]]:
    """Per endpoint, per repetition: (the fitted classifier, fit examples, val examples);
    `train` holds the features of the train examples at `positions` (sorted)."""
    fitted: dict[str, list[tuple[Fitted, int, int]]] = {e: [] for e in endpoints}
    for s, draw in enumerate(draws):
        rows = np.searchsorted(positions, draw)
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


__all__ = ["EVALUATE_ON", "HEADS", "HOLDOUT_PER_CLASS", "PIXELS", "POOLS", "EndpointResult",
           "HoldoutError", "ProbeFeatures", "ProbeResult", "ProbeSettings", "SplitResult",
           "draw_splits", "extract_probe_features", "probe", "run_probe", "validation_holdout"]
