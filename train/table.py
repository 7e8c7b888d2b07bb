r"""NAT and SC on a labelled dataset, over pretraining seeds, through the field's protocols.

    python -m train.table                                # Fashion-MNIST, NAT and SC, seeds 0-2
    python -m train.table --eval_split=validation --seeds=0   # a recipe search's measurement

Every (method, seed) pretrains once with its recipe, `train/configs/<method>_<dataset>.flags`,
in its own run folder `<output_dir>/<method>/seed<k>` (a run of `train.pretrain`: a rerun
resumes or skips it). Each pretrained network is then measured, with its random-init twin
(the same seeded initialisation, read with BN at init and with BN calibrated on the
pretraining images: evaluation/random_init.py), raw pixels, and the same architecture trained
with labels, by:

    linear, all labels      multinomial logistic regression on the frozen `sc` features with
                            every train label, L2 strength chosen on a validation carve
    k-NN, all labels        weighted k-NN over every train image (Wu et al. 2018: k = 200,
                            temperature 0.07) on the L2-normalised embedding (NAT) or the
                            global average of `sc` (SC: the input of NAT's embedding)
    1-NN, all labels        the nearest train image by cosine similarity (NAT Figure 3's view)
    linear, k per class     the linear probe with --few_labels labels per class, --few_splits
                            draws shared by every row
    fine-tuned, k per class the whole network fine-tuned from the pretrained weights, against
                            the same network from scratch with the same seed (SC's protocol;
                            --finetune_labels, 0 = all; scratch with all labels is the
                            supervised network)

Per seed, a frozen view's figure is the mean over its draws; the gap to the stronger
random-init row (the higher mean over the seeds, named) is paired per seed, and the table
gives mean ± sd over the seeds and a paired t-test; a gap inside its spread is reported as
no difference. Features are extracted once per network; the random twins are shared between
methods whose backbones start from the same weights (keyed by a digest of those weights).

--eval_split=validation scores every row on a stratified holdout of --holdout_per_class
train images per class and never reads the test split: the measurement for choosing a recipe.
--eval_split=test (the default) reads the test split once per network, after every choice.

Results are cached per run (`table.json` in the run folder, keyed by the settings and the
checkpoint: train/cached.py) and for the shared rows in `<output_dir>/shared/`, so an
interrupted table resumes where it stopped. Writes `<output_dir>/table.json` (every figure,
per seed), `table.md` and `table.png` (--output_dir: default runs/table_<dataset>).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from data import LABELLED_DATASETS
from runtime import cli
from runtime.cli import UsageError, option
from runtime.vocabulary import DataLocation, OutputFolder
from train.config import METHODS

PROGRAM = "train.table"
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
EVAL_SPLITS = ("test", "validation")


def recipe_path(method: str, dataset: str) -> str:
    """The flagfile of `method` on `dataset`."""
    return os.path.join(CONFIGS, f"{method}_{dataset}.flags")


@dataclass(frozen=True)
class TableConfig(DataLocation, OutputFolder):
    """The flags of `python -m train.table`; --output_dir defaults to runs/table_<dataset>."""

    dataset: str = option("fashion_mnist", "Labelled dataset, pretrained on its train images.",
                          choices=LABELLED_DATASETS)
    methods: tuple[str, ...] = option(METHODS, "Pretraining methods.")
    seeds: tuple[int, ...] = option((0, 1, 2), "Pretraining seeds; each run has its own twin.")
    epochs: int = option(0, "Pretraining epochs (0: the recipe's).", lower=0)
    eval_split: str = option("test", "Split every row is scored on: test, or a holdout "
                             "carved from train (validation).", choices=EVAL_SPLITS)
    holdout_per_class: int = option(1000, "Train images per class held out by "
                                    "--eval_split=validation.", lower=1)
    few_labels: tuple[int, ...] = option((10, 100), "Labels per class of the few-label linear "
                                         "probes.")
    few_splits: int = option(5, "Label draws of each few-label probe.", lower=2)
    knn_k: int = option(200, "Neighbours of the weighted k-NN.", lower=1)
    knn_temperature: float = option(0.07, "Temperature of the weighted k-NN.", lower=0.0)
    finetune_labels: tuple[int, ...] = option((100, 0), "Labels per class of the fine-tuning "
                                              "rows (0: all labels).")
    finetune_epochs: int = option(8, "Most epochs of a fine-tuning with every label (batches "
                                 "of the pretraining's size, about 45 s each on 2 CPU cores; "
                                 "with fewer labels, the fine-tuning binary's schedule).",
                                 lower=1)

    def __post_init__(self):
        for method in self.methods:
            cli.check_choice("methods", method, METHODS)
            if not os.path.isfile(recipe_path(method, self.dataset)):
                raise UsageError(f"--methods={method}: there is no recipe for --dataset="
                                 f"{self.dataset} ({recipe_path(method, self.dataset)})")
        if not self.methods or not self.seeds:
            raise UsageError("--methods and --seeds need at least one value")
        for name in ("few_labels", "finetune_labels"):
            if any(k < 0 for k in getattr(self, name)):
                raise UsageError(f"--{name}: labels per class must be >= 0")
        if 0 in self.few_labels:
            raise UsageError("--few_labels: 0 (all labels) is the table's own linear row")
        if not self.output_dir:
            object.__setattr__(self, "output_dir", os.path.join("runs", f"table_{self.dataset}"))


def main(argv=None) -> None:
    cli.main(PROGRAM, TableConfig, "train.table_lib:run", module_name=PROGRAM, doc=__doc__,
             argv=argv)


if __name__ == "__main__":
    main()
