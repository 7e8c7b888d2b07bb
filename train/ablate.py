r"""The papers' ablations at small scale, on the embedded digits, each run against its twin.

    python -m train.ablate                                  # every variant, seeds 0, 1, 2
    python -m train.ablate --variants=nat,fixed_p --seeds=0,1,2,3,4 --epochs=60

Variants (nin_mnist; the main job's recipe unless stated):
    nat               NAT, targets re-assigned every 3 epochs (the method)
    every_epoch       re-assigned every epoch (NAT Figure 2, right: too often hurts)
    fixed_p           never re-assigned: the "fixed P" baseline (NAT Sec. 4.1, 26.4% vs 36.0%)
    onehot            one-hot (discrete) targets instead of the sphere (NAT Sec. 4.1, 22%)
    translations      NAT with 2-pixel translations instead of resized crops
    sc                Spatial Contrasting (train/configs/sc_digits.flags)
    sc_flatten        SC with flattened windows instead of averaged ones

Protocol. Every variant pretrains once per seed in its own run folder
(`<output_dir>/<variant>/seed<k>`, a run of `train.pretrain`: a rerun resumes or skips it).
Each pretrained network is then compared with ITS random-init twin (the same seeded
initialisation) on the same label draws (`evaluation.compare`): a linear probe on `sc` and
1-NN (cosine) on the embedding, 10 labels per class, 5 draws. SC has no embedding, so its
second view is fine-tuning (`evaluation.finetune`, the SC protocol) of the SC init against
scratch, with the label draw and every other seed shared. Per seed, the gap is the mean over
the draws of the paired differences; the table reports mean ± sd over the seeds and a paired
t-test over the seeds. A gap inside its spread is reported as no difference. The twin is read
both ways (evaluation/random_init.py): BN at init, and BN calibrated on the train digits; each
view's gap is taken against the stronger of the two over the seeds, and the table says which.

A run's figures are cached in its folder (`ablation.json`), and a seed's scratch fine-tuning
in `scratch/seed<k>/accuracy.json`, each with the settings and the checkpoint it answers
(train/cached.py): a rerun with other --splits, --labels_per_class or a checkpoint trained
further (--epochs) recomputes them.

Writes `<output_dir>/ablation.json` (every figure), `ablation.md` and `ablation.png`
(--output_dir: default runs/ablate).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from runtime import cli
from runtime.cli import UsageError, option
from runtime.vocabulary import OutputFolder

PROGRAM = "train.ablate"
SC_FLAGFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                           "sc_digits.flags")
# variant -> (flagfile or None for the main job's defaults, settings changed)
VARIANTS = {
    "nat": (None, {}),
    "every_epoch": (None, {"nat_reassign_every": 1}),
    "fixed_p": (None, {"nat_reassign_every": 0}),
    "onehot": (None, {"nat_targets": "onehot"}),
    "translations": (None, {"crop": "pad", "crop_pad": 2}),
    "sc": (SC_FLAGFILE, {}),
    "sc_flatten": (SC_FLAGFILE, {"sc_pool": "flatten"}),
}


@dataclass(frozen=True)
class AblateConfig(OutputFolder):
    """The flags of `python -m train.ablate`; --output_dir (runtime/vocabulary.py) defaults to
    runs/ablate."""

    variants: tuple[str, ...] = option(tuple(VARIANTS), "Variants to run (module docstring).")
    seeds: tuple[int, ...] = option((0, 1, 2), "Pretraining seeds; each run has its own twin.")
    epochs: int = option(60, "NAT pretraining epochs.", lower=1)
    sc_epochs: int = option(0, "SC pretraining epochs (0: the flagfile's).", lower=0)
    labels_per_class: int = option(10, "Labels per class of the probes and fine-tuning.",
                                   lower=1)
    splits: int = option(5, "Label draws of the probes.", lower=2)

    def __post_init__(self):
        for name in self.variants:
            cli.check_choice("variants", name, tuple(VARIANTS))
        if not self.variants or not self.seeds:
            raise UsageError("--variants and --seeds need at least one value")
        if not self.output_dir:
            object.__setattr__(self, "output_dir", os.path.join("runs", "ablate"))


def main(argv=None) -> None:
    cli.main(PROGRAM, AblateConfig, "train.ablate_lib:run", module_name=PROGRAM, doc=__doc__,
             argv=argv)


if __name__ == "__main__":
    main()
