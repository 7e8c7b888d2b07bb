r"""Linear, MLP or nearest-neighbour probes on the frozen features of a pretrained network.

Protocol (NAT Sec. 4 and Table 3; `evaluation.probe` has the details):
- the network is loaded from a --pretrained run (its latest checkpoint, or the checkpoint
  prefix given), from a --saved_model, or left at random initialisation (--init=random, the
  baseline: seeded by the run's own seed with --pretrained, so that it is the run's random
  twin, else by --seed). A random init is probed twice (evaluation/random_init.py): with its
  BN statistics at init, and calibrated on the pretraining images (the run's dataset; without
  a run, the --dataset's train images); both rows are reported and the stronger one per
  endpoint is named;
- each --endpoints map is pooled (adaptive average or max) to at most --max_dims features
  (or --pool_size cells a side) and frozen;
- the scored split is the test split (--eval_split=test), or, to search recipes without
  looking at the test split (--eval_split=validation), a holdout of --holdout_per_class train
  images per class, fixed by --seed (the same for every network and every draw); the test
  split is then never read, and the labels below come from the rest of train;
- for each of --splits repetitions, --labels_per_class labelled train examples per class are
  drawn (0: all), a validation set is carved from them, the classifier's hyperparameter is
  chosen on it (linear: the L2 strength; --head=mlp: fc 4096-4096-classes with BN and dropout,
  the epoch; --head=knn: none, k is --knn_k, each neighbour one vote, or with
  --knn_temperature T the weight exp(cosine similarity / T), Wu et al. 2018's k=200, T=0.07),
  and the scored split is read only at the end, once;
- the result is the mean ± std accuracy on the scored split over the repetitions.

Writes to --output_dir (default: `<pretrained run>/probe`, `probe_random` with --init=random,
or `runs/probe_<model>_random` for a bare --model): config.json (the flags), probe.json (every
figure) and probe.md (the table), and prints the table. The folder belongs to one
configuration (runtime/ownership.py): a second process on it stops at once, and a
configuration that differs in anything but `RESUMABLE` (output and data locations, the
extraction batch size) is refused unless the folder is new: --eval_split, --holdout_per_class
and --knn_temperature are configuration. The same configuration recomputes
and rewrites the outputs, for the weights the run holds then (probe.json names the
checkpoint). Nothing is written before the results are complete.

Example (the embedded digits, random init, with raw pixels as a reference row):

  python -m evaluation.linear_probe --model=nin_mnist --init=random --dataset=digits \
      --endpoints=block1,block2,sc,pixels --labels_per_class=10 --splits=5

Searching a k-NN recipe on a holdout of 50 train digits per class (the test split unread):

  python -m evaluation.linear_probe --model=nin_mnist --init=random --dataset=digits \
      --endpoints=sc --head=knn --knn_k=20 --knn_temperature=0.07 --labels_per_class=0 \
      --splits=1 --eval_split=validation --holdout_per_class=50
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from data import LABELLED_DATASETS
from models import MODEL_NAMES
from runtime import cli
from runtime.cli import UsageError, option
from runtime.run_config import run_folder
from runtime.vocabulary import DataLocation, OutputFolder, PretrainedInput

PROGRAM = "evaluation.linear_probe"
HEADS = ("linear", "mlp", "knn")
POOLS = ("avg", "max")
EVAL_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class ProbeConfig(PretrainedInput, DataLocation, OutputFolder):
    """The flags of `python -m evaluation.linear_probe`; the shared ones (--pretrained, --init,
    --data_dir, --manual_dir, --output_dir) are those of runtime/vocabulary.py."""

    saved_model: str = option("", "A SavedModel version folder to probe instead.")
    model: str = option("", "Model name, for --init=random without --pretrained.")
    model_kwargs: str = option("{}", "JSON kwargs of build_model (with --model).")
    endpoints: tuple[str, ...] | None = option(None, "Endpoints to probe (default: the "
                                               "model's transfer endpoint); 'pixels' is the "
                                               "input itself.")
    head: str = option("linear", "Classifier on the frozen features.", choices=HEADS)
    dataset: str = option("digits", "Labelled dataset.", choices=LABELLED_DATASETS)
    stl10_dir: str | None = option(None, "STL-10 stl10_binary folder (for the folds).")
    stl10_folds: bool = option(False, "STL-10: repetition s trains on predefined fold s.")
    labels_per_class: int = option(10, "Labelled train examples per class (0: all).", lower=0)
    splits: int = option(5, "Repetitions (draws of the labelled examples).", lower=1)
    seed: int = option(0, "Seed of the draws and of the classifiers (and of --init=random "
                       "without --pretrained).")
    pool: str = option("avg", "Pooling of feature maps.", choices=POOLS)
    pool_size: int = option(0, "Pool maps to this many cells a side (0: by --max_dims).",
                            lower=0)
    max_dims: int = option(9216, "Largest pooled feature size.", lower=1)
    val_fraction: float = option(0.2, "Fraction of each class's labels kept for validation.",
                                 lower=0.0, upper=0.9)
    mlp_width: int = option(4096, "Width of the MLP's hidden layers.", lower=1)
    mlp_epochs: int = option(30, "Epochs of the MLP head.", lower=1)
    mlp_learning_rate: float = option(0.01, "SGD learning rate of the MLP head.", lower=0.0)
    knn_k: int = option(1, "Neighbours of --head=knn.", lower=1)
    knn_temperature: float = option(0.0, "--head=knn: 0 gives each neighbour one vote; T > 0 "
                                    "the weight exp(cosine similarity / T) (Wu et al. 2018: "
                                    "k=200, T=0.07).", lower=0.0)
    eval_split: str = option("test", "Score on the test split, or on a validation holdout "
                             "carved from train (the test split is then never read).",
                             choices=EVAL_SPLITS)
    holdout_per_class: int = option(1000, "--eval_split=validation: train images per class "
                                    "held out and scored (the same for every network and "
                                    "draw of a --seed).", lower=1)
    batch_size: int = option(256, "Batch size of feature extraction.", lower=1)
    max_test_examples: int = option(0, "Score on the first n test examples (0: all; "
                                    "--eval_split=test only).", lower=0)

    # What may differ between two invocations writing one output folder (module docstring).
    RESUMABLE: ClassVar[tuple[str, ...]] = ("output_dir", "data_dir", "manual_dir", "stl10_dir",
                                            "batch_size")

    def __post_init__(self):
        if self.pretrained and self.saved_model:
            raise UsageError("--pretrained and --saved_model are exclusive; give one")
        if self.saved_model and self.init == "random":
            raise UsageError("--init=random needs --pretrained or --model, not --saved_model")
        if not (self.pretrained or self.saved_model):
            if self.init == "pretrained":
                raise UsageError("--init=pretrained needs --pretrained or --saved_model "
                                 "(or use --init=random with --model; see --help)")
            if self.model not in MODEL_NAMES:
                raise UsageError(f"--model={self.model}: choose one of "
                                 f"{', '.join(MODEL_NAMES)}")
        if self.eval_split == "validation":
            for flag, given in (("max_test_examples", self.max_test_examples),
                                ("stl10_folds", self.stl10_folds)):
                if given:
                    raise UsageError(f"--{flag} applies to --eval_split=test, not "
                                     "--eval_split=validation")
        self.overrides()

    def overrides(self) -> dict:
        return cli.json_object("model_kwargs", self.model_kwargs)

    @property
    def out(self) -> str:
        """The output folder (module docstring)."""
        if self.output_dir:
            return self.output_dir
        if self.pretrained:
            return os.path.join(run_folder(self.pretrained), "probe" if self.init ==
                                "pretrained" else "probe_random")
        if self.saved_model:
            version = os.path.normpath(self.saved_model)
            name = f"{os.path.basename(os.path.dirname(version))}_v{os.path.basename(version)}"
            return os.path.join("runs", f"probe_{name}")
        return os.path.join("runs", f"probe_{self.model}_random")


def main(argv=None) -> None:
    cli.main(PROGRAM, ProbeConfig, "evaluation.linear_probe_lib:run", module_name=PROGRAM,
             doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
