r"""Supervised fine-tuning of a whole pretrained network: the SC protocol (SC Sec. 5, Tables 1-3).

Protocol (Hoffer, Hubara & Ailon 2017, Sec. 5):
- the network (the pretraining model with its softmax classifier, SC Table 4) starts from
  the pretrained checkpoint (--pretrained=<run folder or checkpoint prefix>; every backbone
  layer must be in it, the classifier starts random) or from scratch (--init=random);
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
  over --seeds. With --eval_split=validation (to search recipes) the runs are scored instead
  on a holdout of --holdout_per_class train images per class (`evaluation.probe`'s holdout
  of seed 0: the same for every seed, init and probe of seed 0), the labels are drawn from
  the rest of train, and the test split is never read. Each seed fixes the label draw, the
  validation carve, the classifier's init, the batch order and the augmentation; with
  --compare_scratch the same seeds also train the network from scratch, both are reported
  side by side (SC Tables 1-3), and their difference is tested paired over the seeds
  (evaluation/report.py).
- the output warns when a run stopped at --epochs before converging, or ended near chance.

Writes config.json, finetune.json (every figure) and finetune.md to --output_dir (default
`<pretrained run>/finetune`; with --init=random `<pretrained run>/finetune_random`, or
`runs/finetune_<model>_scratch` without --pretrained) once the results are
complete. The folder is one configuration's (runtime/ownership.py): another (differing beyond
RESUMABLE) is refused unless the folder is new; the same one rewrites its outputs. Example:
`python -m evaluation.finetune --pretrained=runs/sc_nin_mnist_digits --compare_scratch
--seeds=0,1,2`
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from data import LABELLED_DATASETS
from models import MODEL_NAMES, PRECISIONS
from runtime import cli
from runtime.cli import UsageError, option
from runtime.run_config import run_folder
from runtime.vocabulary import DataLocation, OutputFolder, PretrainedInput

PROGRAM = "evaluation.finetune"
RESUMABLE = ("output_dir", "data_dir", "manual_dir", "stl10_dir")  # where, not what
# Flags younger than some output folders: at their defaults they stay out of the fingerprint.
LATER_FLAGS = ("eval_split", "holdout_per_class")
EVAL_SPLITS = ("test", "validation")
# Labels per class of the SC protocol (0: every train label).
PROTOCOL_LABELS = {"stl10": 0, "cifar10": 400, "mnist": 0, "digits": 10, "imagenet2012": 0,
                   "fashion_mnist": 0}
MIRROR = {"stl10": True, "cifar10": True, "imagenet2012": True, "mnist": False, "digits": False,
          "fashion_mnist": False}  # as mnist


@dataclass(frozen=True)
class FinetuneConfig(PretrainedInput, DataLocation, OutputFolder):
    """The flags of `python -m evaluation.finetune` (and of the SC run's final table); the
    shared ones (--pretrained, --init, --data_dir, --manual_dir, --output_dir) are those of
    runtime/vocabulary.py."""

    model: str = option("", "Model name (default: the model of --pretrained's config.json).")
    model_kwargs: str = option("{}", "JSON keyword arguments of build_model.")
    dataset: str = option("digits", "Labelled dataset.", choices=LABELLED_DATASETS)
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
    max_test_examples: int = option(0, "Score on the first n test examples (0: all; "
                                    "--eval_split=test only).", lower=0)
    eval_split: str = option("test", "Score on the test split, or on a validation holdout "
                             "carved from train (the test split is then never read).",
                             choices=EVAL_SPLITS)
    holdout_per_class: int = option(1000, "--eval_split=validation: train images per class "
                                    "held out and scored (the same for every seed).", lower=1)
    mixed_precision: str = option("none", "Compute precision of the network: none (float32), "
                                  "bf16 or fp16 (with dynamic loss scaling).",
                                  choices=PRECISIONS)

    def __post_init__(self):
        cli.check_choice("dataset", self.dataset, LABELLED_DATASETS)
        cli.check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        cli.check_choice("eval_split", self.eval_split, EVAL_SPLITS)
        if self.eval_split == "validation" and self.max_test_examples:
            raise UsageError("--max_test_examples applies to --eval_split=test, not "
                             "--eval_split=validation")
        if self.init == "pretrained":
            cli.require("pretrained", self.pretrained)
        elif not (self.model or self.pretrained):
            raise UsageError("--init=random needs --model (or a --pretrained run to read it "
                             "from)")
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
        if self.pretrained:
            return os.path.join(run_folder(self.pretrained), "finetune" if self.init ==
                                "pretrained" else "finetune_random")
        return os.path.join("runs", f"finetune_{self.model or 'model'}_scratch")


def main(argv=None) -> None:
    cli.main(PROGRAM, FinetuneConfig, "evaluation.finetune_lib:run_and_print",
             module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
