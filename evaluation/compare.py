"""A pretrained network against the same network at random initialisation, and raw pixels.

Protocol: every probe of `evaluation.probe` runs on the SAME label draws (k labelled train
images per class, draw s seeded by (seed, s)) for every network, so each draw gives a pair
(pretrained, random init) and the gap is tested on the paired differences
(`evaluation.report.paired_gap`). Two views of the frozen features:

- linear: a linear probe on the transfer endpoint (NAT Table 3's protocol at small scale);
- knn: 1-nearest-neighbour by cosine similarity on the embedding (NAT Figure 3's view of the
  features: images near each other in the learned space share a class).

Given the random twin with its BN statistics calibrated too (`evaluation.random_init`), both
random-init rows are reported and each view's gap is measured against the stronger of the two
(the higher mean accuracy over the same draws); the table says which.

Raw pixels, through the same classifiers, are the reference rows: a feature extractor that
does not beat them has not learned anything a classifier could not find in the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation import report
from evaluation.features import PIXELS
from evaluation.probe import run_probe
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
    random-init row the gap was measured against)."""

    dataset: str
    labels_per_class: int
    splits: int
    method: str
    rows: tuple[Row, ...]
    gaps: dict[str, report.PairedGap] = field(default_factory=dict)
    against: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "labels_per_class": self.labels_per_class,
                "splits": self.splits,
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
            rows.append([f"{VIEWS[r.view]} on {r.endpoint}", init,
                         f"{100 * r.mean:.1f}% ± {100 * r.std:.1f}"])
        lines = [f"{self.dataset}, {self.labels_per_class} labels per class, the same "
                 f"{self.splits} draws for every row", report.format_table(headers, rows)]
        lines += [f"{VIEWS[view]}: {self.method} pretrained - "
                  f"{self._against(view)} = {gap.describe()}" for view, gap in self.gaps.items()]
        return "\n".join(lines)

    def _against(self, view: str) -> str:
        name = self.against.get(view, "random init")
        return f"{name} (the stronger random-init row)" if name != "random init" else name


def _accuracies(model, endpoints: Sequence[str], view: str, dataset,
                labels_per_class: int, splits: int, seed: int) -> dict[str, tuple]:
    head = "knn" if view == "knn" else "linear"
    result = run_probe(model, list(endpoints), dataset, labels_per_class, splits, seed=seed,
                       head=head)
    return {e.endpoint: tuple(float(a) for a in e.accuracies) for e in result.endpoints}


def compare(pretrained, random_init, dataset, views: dict[str, str],
            labels_per_class: int = 10, splits: int = 5, seed: int = 0,
            method: str = "", calibrated=None) -> Comparison:
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
    """
    randoms = {"random init": random_init} if calibrated is None else {
        AT_INIT: random_init, CALIBRATED: calibrated}
    rows, gaps, against = [], {}, {}
    for view, endpoint in views.items():
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
        trained = _accuracies(pretrained, [endpoint, PIXELS], view, dataset,
                              labels_per_class, splits, seed)
        random = {name: _accuracies(net, [endpoint], view, dataset, labels_per_class, splits,
                                    seed)[endpoint] for name, net in randoms.items()}
        rows.append(Row(view, endpoint, "pretrained", trained[endpoint]))
        rows += [Row(view, endpoint, name, accuracies) for name, accuracies in random.items()]
        rows.append(Row(view, PIXELS, "pixels", trained[PIXELS]))
        against[view] = stronger(random)
        gaps[view] = report.paired_gap(trained[endpoint], random[against[view]], "label draws")
    name = dataset if isinstance(dataset, str) else dataset.name
    return Comparison(name, labels_per_class, splits, method, tuple(rows), gaps, against)
