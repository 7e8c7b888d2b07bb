"""A pretrained network against the same network at random initialisation, and raw pixels.

Protocol: every probe of `evaluation.probe` runs on the SAME label draws (k labelled train
images per class, draw s seeded by (seed, s)) for every network, so each draw gives a pair
(pretrained, random init) and the gap is tested on the paired differences
(`evaluation.report.paired_gap`). Two views of the frozen features:

- linear: a linear probe on the transfer endpoint (NAT Table 3's protocol at small scale);
- knn: 1-nearest-neighbour by cosine similarity on the embedding (NAT Figure 3's view of the
  features: images near each other in the learned space share a class); `knn` may ask for k
  neighbours, weighted by exp(similarity / T) with a temperature.

The rows are scored on the test split, or (`evaluate_on="validation"`, to search recipes) on
a holdout of `holdout_per_class` train images per class, the same for every row, with the
test split never read (`evaluation.probe`). Each network's features are extracted once for
all its views (`evaluation.probe.extract_probe_features`), or given.

Given the random twin with its BN statistics calibrated too (`evaluation.random_init`), both
random-init rows are reported and each view's gap is measured against the stronger of the two
(the higher mean accuracy over the same draws); the table says which.

Raw pixels, through the same classifiers, are the reference rows: a feature extractor that
does not beat them has not learned anything a classifier could not find in the images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation import report
from evaluation.classifiers import KnnHead
from evaluation.features import PIXELS
from evaluation.probe import HOLDOUT_PER_CLASS, ProbeFeatures, extract_probe_features, run_probe
from evaluation.random_init import AT_INIT, CALIBRATED, stronger

VIEWS = {"linear": "linear probe", "knn": "1-NN (cosine)"}


@dataclass(frozen=True)
class Row:
    """Accuracies of one network through one view, one per label draw."""

    view: str  # a key of VIEWS
    endpoint: str
    init: str  # "pretrained", "random init" (or AT_INIT and CALIBRATED) or "pixels"
    accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


@dataclass(frozen=True)
class Comparison:
    """Every row, and per view the paired gap pretrained - random init (`against`: the
    random-init row the gap was measured against); scored on `scored_split` ("test" or
    "validation": a train holdout) of `scored_examples` images, k-NN as in `knn`."""

    dataset: str
    labels_per_class: int
    splits: int
    method: str
    rows: tuple[Row, ...]
    gaps: dict[str, report.PairedGap] = field(default_factory=dict)
    against: dict[str, str] = field(default_factory=dict)
    scored_split: str = "test"
    scored_examples: int = 0
    knn: KnnHead = field(default_factory=KnnHead)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "labels_per_class": self.labels_per_class,
                "splits": self.splits, "scored_split": self.scored_split,
                "scored_examples": self.scored_examples,
                "knn": {"k": self.knn.k, "temperature": self.knn.temperature},
                "rows": [{"view": r.view, "endpoint": r.endpoint, "init": r.init,
                          "accuracies": list(r.accuracies), "mean": r.mean, "std": r.std}
                         for r in self.rows],
                "gaps": {view: {**gap.__dict__, "text": gap.describe(),
                                "against": self.against.get(view, "random init")}
                         for view, gap in self.gaps.items()}}

    def table(self) -> str:
        """The console table: one row per (view, network), then the paired gaps."""
        headers = ["features", "init", f"accuracy (mean ± sd over {self.splits} label draws)"]
        rows = []
        for r in self.rows:
            init = f"{self.method} pretrained" if r.init == "pretrained" else r.init
            rows.append([f"{self.view_name(r.view)} on {r.endpoint}", init,
                         f"{100 * r.mean:.1f}% ± {100 * r.std:.1f}"])
        holdout = (f", scored on a validation holdout of {self.scored_examples} train images"
                   if self.scored_split == "validation" else "")
        lines = [f"{self.dataset}, {self.labels_per_class} labels per class, the same "
                 f"{self.splits} draws for every row{holdout}",
                 report.format_table(headers, rows)]
        lines += [f"{self.view_name(view)}: {self.method} pretrained - "
                  f"{self._against(view)} = {gap.describe()}" for view, gap in self.gaps.items()]
        return "\n".join(lines)

    def view_name(self, view: str) -> str:
        """VIEWS[view], with the k-NN's k and temperature when they are not 1 and None."""
        if view != "knn" or self.knn == KnnHead():
            return VIEWS[view]
        weights = "" if self.knn.temperature is None else f", T={self.knn.temperature:g}"
        return f"{self.knn.k}-NN (cosine{weights})"

    def _against(self, view: str) -> str:
        name = self.against.get(view, "random init")
        return f"{name} (the stronger random-init row)" if name != "random init" else name


def _accuracies(features: ProbeFeatures, endpoints: Sequence[str], view: str, dataset,
                labels_per_class: int, splits: int, seed: int,
                knn: KnnHead) -> tuple[dict[str, tuple], int]:
    """({endpoint: accuracy per draw}, scored examples) of one view of one network."""
    head = "knn" if view == "knn" else "linear"
    result = run_probe(None, list(endpoints), dataset, labels_per_class, splits, seed=seed,
                       head=head, knn=knn, features=features)
    return ({e.endpoint: tuple(float(a) for a in e.accuracies) for e in result.endpoints},
            result.scored_examples)


def compare(pretrained, random_init, dataset, views: dict[str, str],
            labels_per_class: int = 10, splits: int = 5, seed: int = 0,
            method: str = "", calibrated=None, *, evaluate_on: str = "test",
            holdout_per_class: int = HOLDOUT_PER_CLASS, knn: KnnHead | None = None,
            features: Mapping[str, ProbeFeatures] | None = None) -> Comparison:
    """Probe both networks and the pixels through each view.

    Args:
      pretrained, random_init: the same architecture, trained and at its initialisation.
      dataset: a labelled dataset (a name of data.LABELLED_DATASETS, or a
        data.labelled.LabelledSource: the dataset where it is, e.g. a run's --data_dir).
      views: {view: endpoint}, e.g. {"linear": "sc", "knn": "embedding"}.
      labels_per_class, splits, seed: the label draws (as in `evaluation.probe.run_probe`).
      method: the pretraining method, for the table.
      calibrated: the random-init network with its BN statistics calibrated, or None. Given,
        `random_init` is the AT_INIT row, this one the CALIBRATED row, and each gap is taken
        against the stronger of the two.
      evaluate_on, holdout_per_class: the scored split (as in `run_probe`).
      knn: the k-NN of the knn view (default: 1 neighbour, one vote).
      features: {row init ("pretrained", "random init", AT_INIT, CALIBRATED): that network's
        `extract_probe_features`}, reused instead of extracting (the pretrained one must hold
        the pixels too); the others are extracted here, once per network.
    """
    knn = knn or KnnHead()
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    randoms = {"random init": random_init} if calibrated is None else {
        AT_INIT: random_init, CALIBRATED: calibrated}
    extracted = dict(features or {})
    for name, net in {"pretrained": pretrained, **randoms}.items():
        if extracted.get(name) is None:  # every view's endpoint at once, on the draws only
            wanted = [*views.values(), *([PIXELS] if name == "pretrained" else [])]
            extracted[name] = extract_probe_features(
                net, list(dict.fromkeys(wanted)), dataset, evaluate_on=evaluate_on,
                holdout_per_class=holdout_per_class, seed=seed,
                labels_per_class=labels_per_class, splits=splits)
    rows, gaps, against, scored = [], {}, {}, 0
    for view, endpoint in views.items():
        trained, scored = _accuracies(extracted["pretrained"], [endpoint, PIXELS], view,
                                      dataset, labels_per_class, splits, seed, knn)
        random = {name: _accuracies(extracted[name], [endpoint], view, dataset,
                                    labels_per_class, splits, seed, knn)[0][endpoint]
                  for name in randoms}
        rows.append(Row(view, endpoint, "pretrained", trained[endpoint]))
        rows += [Row(view, endpoint, name, accuracies) for name, accuracies in random.items()]
        rows.append(Row(view, PIXELS, "pixels", trained[PIXELS]))
        against[view] = stronger(random)
        gaps[view] = report.paired_gap(trained[endpoint], random[against[view]], "label draws")
    name = dataset if isinstance(dataset, str) else dataset.name
    return Comparison(name, labels_per_class, splits, method, tuple(rows), gaps, against,
                      evaluate_on, scored, knn)
