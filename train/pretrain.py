r"""Unsupervised pretraining by Noise As Targets (NAT) or Spatial Contrasting (SC).

    python -m train.pretrain                                   # NAT, nin_mnist, embedded digits
    python -m train.pretrain --flagfile=train/configs/sc_digits.flags
    python -m train.pretrain --flagfile=train/configs/nat_alexnet_imagenet.flags \
        --data_dir=/data/tfds --manual_dir=/data/imagenet --model_dir=runs/nat_alexnet \
        --mixed_precision=bf16 --jit_compile                  # on one GPU

Protocol (train/trainer.py): the model is trained without labels on the dataset's images;
checkpoints go to --model_dir every --checkpoint_every steps and at each epoch end, and a
rerun with the same --model_dir resumes. Every --probe_every_epochs epochs a linear probe
measures the frozen features (NAT Figure 2). At the end the feature extractor is exported as a
SavedModel (serving/export.py), in float32 whatever --mixed_precision the network trained in,
and the final table compares the pretrained network with the same network at random init: a
linear probe (--final_eval=probe) or whole-network fine-tuning with labels
(--final_eval=finetune, the SC protocol). The frozen random init is read two ways, its BN
statistics at init and calibrated on the run's images (evaluation/random_init.py); both rows
are shown and each view's gap is taken against the stronger one, named in the table.

The run folder belongs to one process and one set of settings (runtime/ownership.py): a second
process on it, or a restart with a setting that changes the result (train/config.py lists
those a restart may change, e.g. --epochs), stops at once with one line and writes nothing.
probe_history.json, probe.png and results.json are rebuilt from everything the run recorded
(train/records.py); rerunning a finished run retrains and re-exports nothing and reprints its
table from results.json.

train/pretrain_lib.py is the composition root: it builds the strategy, the trainer with its
probe hook, the export and the final table. Bad flags and every failure the user can act on
stop with one line and exit status 1 (runtime/cli.py); `--help` and `--helpfull` exit 0.
"""

from __future__ import annotations

from runtime import cli
from train.config import TrainConfig

PROGRAM = "train.pretrain"


def main(argv=None) -> None:
    cli.main(PROGRAM, TrainConfig, "train.pretrain_lib:run", module_name=PROGRAM, doc=__doc__,
             argv=argv)


if __name__ == "__main__":
    main()
