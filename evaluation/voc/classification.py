r"""PASCAL VOC 2007 classification transfer (NAT Table 4, "Classification" columns).

    python -m evaluation.voc.classification --model_dir=runs/voc_cls \
        --pretrained=runs/nat_alexnet --train_layers=fc6-8

Protocol (the voc-classification code of Krahenbuhl et al. 2015, used by BiGAN and NAT):

- Data: trainval (tfds `train+validation`, 5011 images), test on `test` (4952); `data.voc`.
- Network: the pretrained AlexNet (`models.alexnet`, head "none", input crop_size^2, the
  preprocessing of the pretraining run) with conv1..conv5 loaded from the checkpoint, fc6 and
  fc7 loaded when it holds them (`--fc_init=checkpoint`) or re-drawn, and a new 20-way `fc8`
  (float32 logits) after dropout 0.5 on fc7.
- `--train_layers`: `fc8` (only fc8 moves), `fc6-8` (fc6, fc7, fc8 on frozen convs: NAT 56.7
  mAP) or `all` (everything: NAT 65.3). Frozen BN layers run in inference mode, which is the
  same as folding them into the frozen weights.
- Optional data-dependent init (`--fc_init=kmeans`, Krahenbuhl et al. 2015): each of fc6,
  fc7, fc8 in turn gets k-means centroids of its centred inputs (on `--kmeans_images` training
  crops) as unit-norm weight columns, random Gaussian columns where there are more units than
  images, each column scaled so that its pre-activation has unit variance on those crops; fc8's
  bias (fc6/fc7: their BN's moving statistics) centres the pre-activations.
- Training crops: a random square of side s * min(H, W), s ~ U[min_scale, max_scale], at a
  uniformly random position, resized (bilinear) to crop_size, flipped with probability 1/2;
  pixels enter the network as uint8 * pixel_scale.
- Loss: sigmoid cross-entropy over the 20 classes, summed over the classes whose label is 1
  or -1 (a difficult-only label 0 is ignored) and averaged over the batch.
- Solver: SGD, momentum 0.9, batch 16; the gradient is clipped to global norm 10, then L2
  weight decay 1e-6 * w is added for kernels (not biases or BN parameters); lr 1e-3, halved
  every 10k iterations, 80k iterations.
- Test: for each test image, the logits of `--test_crops` (10) random training-style crops
  are summed; the sum is the class score.
- Report: per-class devkit 11-point AP, its mean (`voc07_map`, the headline) and the sklearn
  AP the reference code printed (`sklearn_map`): a table, `results.json` and `results.md`.

The run (resume, checkpoints, config.json, the step loop, results, --mixed_precision) is the
VOC skeleton of `evaluation.voc.common`. Without `--pretrained`: the random-init baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.voc.config import VocRunConfig
from runtime import cli
from runtime.cli import UsageError, option

PROGRAM = "evaluation.voc.classification"
TRAIN_LAYERS: dict[str, tuple[str, ...]] = {
    "fc8": ("fc8",),
    "fc6-8": ("fc6", "fc6_bn", "fc7", "fc7_bn", "fc8"),
    "all": (),  # every layer (the empty tuple means "no restriction")
}
FC_INITS = ("checkpoint", "gaussian", "kmeans")


@dataclass(frozen=True)
class VocClassificationConfig(VocRunConfig):
    """Every setting of a run (the flags, parsed once)."""

    train_layers: str = option("fc6-8", "Layers that train: fc8, fc6-8 (frozen convs) or all.")
    fc_init: str = option("checkpoint", "fc6/fc7 from the checkpoint, redrawn Gaussian, or "
                          "k-means (fc6-8).")
    kmeans_images: int = option(256, "Training crops for k-means init.")
    crop_size: int = option(227, "Square crop side in pixels.")
    min_scale: float = option(0.5, "Smallest crop side / shorter image side.")
    max_scale: float = option(1.0, "Largest crop side / shorter image side.")
    pixel_scale: float = option(1.0 / 255.0, "Network input = uint8 pixels * pixel_scale "
                                "(match pretraining).")
    batch_size: int = option(16, "Training batch size.")
    learning_rate: float = option(1e-3, "Initial learning rate.")
    lr_decay: float = option(0.5, "Learning-rate factor every lr_decay_steps.")
    lr_decay_steps: int = option(10000, "Steps between lr decays.")
    num_steps: int = option(80000, "Training iterations.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(1e-6, "L2 weight decay on kernels.")
    clip_norm: float = option(10.0, "Global gradient-norm clipping.")
    dropout: float = option(0.5, "Dropout after fc6 and fc7.")
    test_crops: int = option(10, "Random crops per test image.")
    test_batch_images: int = option(8, "Test images per batch.")

    def validate(self) -> None:
        """Raise UsageError (one line, naming the setting) for an inconsistent config."""
        super().validate()
        if self.train_layers not in TRAIN_LAYERS:
            raise UsageError(f"train_layers={self.train_layers!r}: choose one of "
                             f"{', '.join(TRAIN_LAYERS)}")
        if self.fc_init not in FC_INITS:
            raise UsageError(f"fc_init={self.fc_init!r}: choose one of {', '.join(FC_INITS)}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise UsageError(f"need 0 < min_scale <= max_scale <= 1; got {self.min_scale}, "
                             f"{self.max_scale}")
        if self.crop_size < 63:
            raise UsageError(f"crop_size={self.crop_size}: AlexNet needs at least 63 pixels")
        self.positive("batch_size", "num_steps", "lr_decay_steps", "test_crops",
                      "test_batch_images", "checkpoint_every", "keep_checkpoints", "log_every",
                      "kmeans_images")


def main(argv=None) -> None:
    cli.main(PROGRAM, VocClassificationConfig, "evaluation.voc.classification_lib:run",
             module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
