r"""PASCAL VOC 2007 detection transfer with Fast R-CNN (NAT Table 4, "Detection" column).

    python -m evaluation.voc.detection --model_dir=runs/voc_det \
        --pretrained=runs/nat_alexnet --proposal_workers=2

Protocol (Fast R-CNN, Girshick 2015, as used by NAT and the papers it compares with; NAT
reports 49.4 mAP, 56.8 with ImageNet labels):

- Data: train on VOC 2007 trainval (5011 images, difficult objects left out), test on `test`
  (4952 images); see `data.voc`.
- Proposals: selective search in "fast" mode (OpenCV contrib), at most 2000 per image,
  computed once and cached in `--proposal_cache` (default `<model_dir>/proposals`) by
  `--proposal_workers` processes with a progress bar; or read from `--proposals` (a Fast R-CNN
  `.mat`, a `.npz` or a directory of `.npy`, see `evaluation.voc.fast_rcnn.proposals`).
  `--only_proposals` computes the cache and exits.
- Network (`evaluation.voc.fast_rcnn.model`): the pretrained AlexNet convs (`--pretrained`;
  conv1..conv5 required, fc6/fc7 loaded when present), RoI max-pooling of conv5 to 6 x 6,
  fc6, fc7, a 21-way classifier and per-class box regression. All layers are fine-tuned
  unless `--freeze_through` names the last frozen conv. BN runs in inference mode.
- Training: 2 images per step, 128 RoIs each, 25% foreground (IoU >= 0.5), background IoU in
  [0.1, 0.5); shorter side drawn from `--scales` (600), longer side <= 1000; horizontal flip.
  Loss: softmax cross-entropy + smooth-L1 on normalised box targets (foreground only). SGD,
  momentum 0.9, weight decay 5e-4 on kernels (added to the gradient), lr 1e-3 divided by 10
  at each of `--lr_steps` (30000), 40000 steps.
- Test: one scale (600 / 1000); per class, detections with probability > 0.05, NMS at IoU 0.3,
  then the 100 best of the image over all classes.
- Report: devkit 11-point AP per class (`evaluation.voc.metrics.detection_ap`) and the mAP,
  printed and written to `<model_dir>/results.json` and `results.md`, and the detections drawn
  on a few test images in `<model_dir>/detections.png`.

The run (resume, checkpoints, config.json, the step loop, results files) is the VOC skeleton
of `evaluation.voc.common`.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.voc.config import VocRunConfig
from evaluation.voc.fast_rcnn import proposals as det_proposals
from runtime import cli
from runtime.cli import UsageError, option

PROGRAM = "evaluation.voc.detection"
FREEZE_CHOICES = ("none", "conv1", "conv2", "conv3", "conv4", "conv5")


@dataclass(frozen=True)
class VocDetectionConfig(VocRunConfig):
    """Every setting of a run (the flags, parsed once)."""

    proposals: str = option("", "Proposal file (.mat of Fast R-CNN, .npz) or directory of "
                            ".npy ('' = selective search, cached in --proposal_cache).")
    proposal_cache: str = option("", "Selective-search cache directory ('' = "
                                 "<model_dir>/proposals).")
    proposal_workers: int = option(0, "Processes computing selective search (0 = in this "
                                   "process).")
    compute_proposals: bool = option(True, "Compute missing proposals into the cache (else: "
                                     "an error).")
    only_proposals: bool = option(False, "Only fill the proposal cache for trainval and test, "
                                  "then exit.")
    search_mode: str = option("fast", "Selective search mode.", choices=det_proposals.MODES)
    max_proposals: int = option(2000, "Proposals kept per image (0 = all).")
    scales: tuple[int, ...] = option((600,), "Training shorter sides (one drawn per image).")
    max_size: int = option(1000, "Longest image side.")
    test_scale: int = option(600, "Test shorter side.")
    images_per_batch: int = option(2, "Images per step.")
    rois_per_image: int = option(128, "RoIs per image.")
    fg_fraction: float = option(0.25, "Foreground fraction of the RoIs.")
    fg_threshold: float = option(0.5, "Foreground: IoU >= this.")
    bg_low: float = option(0.1, "Background: IoU >= this ...")
    bg_high: float = option(0.5, "... and < this.")
    flip: bool = option(True, "Random horizontal flips in training.")
    pixel_scale: float = option(1.0 / 255.0, "Network input = uint8 pixels * pixel_scale "
                                "(match pretraining).")
    learning_rate: float = option(1e-3, "Initial learning rate.")
    lr_steps: tuple[int, ...] = option((30000,), "Steps after which the lr is multiplied by "
                                       "lr_decay.")
    lr_decay: float = option(0.1, "Learning-rate factor at each lr_step.")
    num_steps: int = option(40000, "Training iterations.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "L2 weight decay on kernels.")
    freeze_through: str = option("none", "Freeze the convs up to this one (none: fine-tune "
                                 "all).", choices=FREEZE_CHOICES)
    dropout: float = option(0.5, "Dropout after fc6 and fc7.")
    fc_units: int = option(4096, "Width of fc6/fc7 (4096: AlexNet's, pretrained when "
                           "available).")
    score_threshold: float = option(0.05, "Test: minimum probability.")
    nms_threshold: float = option(0.3, "Test: NMS IoU threshold.")
    max_per_image: int = option(100, "Test: detections per image.")
    test_roi_chunk: int = option(500, "Test: RoIs per head call.")
    num_test_images: int = option(0, "Test on the first N test images (0 = all).")
    num_visualize: int = option(4, "Test images drawn in detections.png.")
    shuffle_buffer: int = option(256, "Training shuffle buffer.")
    log_every: int = option(20, "Steps between log lines.")

    def validate(self) -> None:
        """Raise UsageError (one line, naming the setting) for an inconsistent config."""
        super().validate()
        if self.freeze_through not in FREEZE_CHOICES:
            raise UsageError(f"freeze_through={self.freeze_through!r}: choose one of "
                             f"{', '.join(FREEZE_CHOICES)}")
        if self.search_mode not in det_proposals.MODES:
            raise UsageError(f"search_mode={self.search_mode!r}: choose one of "
                             f"{', '.join(det_proposals.MODES)}")
        if not self.scales or min(self.scales) < 63:
            raise UsageError(f"scales={','.join(map(str, self.scales))}: each shorter side "
                             "must be at least 63 pixels")
        if self.test_scale < 63 or self.max_size < max((*self.scales, self.test_scale)):
            raise UsageError(f"test_scale={self.test_scale} must be >= 63 and max_size="
                             f"{self.max_size} at least every scale")
        if not 0 <= self.bg_low <= self.bg_high <= self.fg_threshold <= 1:
            raise UsageError(f"need 0 <= bg_low <= bg_high <= fg_threshold <= 1; got "
                             f"{self.bg_low}, {self.bg_high}, {self.fg_threshold}")
        if not 0 <= self.fg_fraction <= 1:
            raise UsageError(f"fg_fraction={self.fg_fraction} must be in [0, 1]")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s < 1 for s in self.lr_steps):
            raise UsageError(f"lr_steps={','.join(map(str, self.lr_steps))} must be increasing "
                             "positive steps")
        self.positive("images_per_batch", "rois_per_image", "num_steps", "max_per_image",
                      "test_roi_chunk", "checkpoint_every", "keep_checkpoints", "log_every",
                      "fc_units", "shuffle_buffer")
        for name in ("proposal_workers", "max_proposals", "num_test_images", "num_visualize"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 0")


def main(argv=None) -> None:
    cli.main(PROGRAM, VocDetectionConfig, "evaluation.voc.detection_lib:run",
             module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
