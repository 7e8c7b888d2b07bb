"""PASCAL VOC 2007 detection transfer with Fast R-CNN (NAT Table 4, "Detection" column).

    python -m evaluation.voc_detection --model_dir=/tmp/voc_det \
        --init_checkpoint=/path/to/pretrain_model_dir --proposal_workers=2

Protocol (Fast R-CNN, Girshick 2015, as used by NAT and the papers it compares with; NAT
reports 49.4 mAP, 56.8 with ImageNet labels):

- Data: train on VOC 2007 trainval (5011 images, difficult objects left out), test on `test`
  (4952 images); see `evaluation.voc_data`.
- Proposals: selective search in "fast" mode (OpenCV contrib), at most 2000 per image,
  computed once and cached in `--proposal_cache` (default `<model_dir>/proposals`) by
  `--proposal_workers` processes with a progress bar; or read from `--proposals` (a Fast R-CNN
  `.mat`, a `.npz` or a directory of `.npy`, see `evaluation.detection.proposals`).
  `--only_proposals` computes the cache and exits.
- Network (`evaluation.detection.model`): the pretrained AlexNet convs (`--init_checkpoint`;
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
- Report: devkit 11-point AP per class (`evaluation.voc_metrics.detection_ap`) and the mAP,
  printed and written to `<model_dir>/results.json` and `results.md`, and the detections drawn
  on a few test images in `<model_dir>/detections.png`.

Checkpoints `<model_dir>/ckpt-*` hold the network, the optimizer and its step; a rerun resumes
from the latest one (its data stream re-seeded with the step). The flags are written to
`<model_dir>/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from evaluation import cli, voc_data, voc_metrics
from evaluation.detection import data as det_data
from evaluation.detection import inference
from evaluation.detection import model as det_model
from evaluation.detection import proposals as det_proposals
from evaluation.voc_classification import resolve_preprocessing
from models.layers import PREPROCESSINGS


@dataclasses.dataclass(frozen=True)
class VocDetectionConfig:
    """Every setting of a run (the flags, parsed once)."""

    model_dir: str
    init_checkpoint: str = ""
    preprocessing: str = ""  # "" = the pretraining run's config.json, else "sobel"
    proposals: str = ""
    proposal_cache: str = ""  # "" = <model_dir>/proposals
    proposal_workers: int = 0
    compute_proposals: bool = True
    only_proposals: bool = False
    search_mode: str = "fast"
    max_proposals: int = 2000
    scales: tuple[int, ...] = (600,)
    max_size: int = 1000
    test_scale: int = 600
    images_per_batch: int = 2
    rois_per_image: int = 128
    fg_fraction: float = 0.25
    fg_threshold: float = 0.5
    bg_low: float = 0.1
    bg_high: float = 0.5
    flip: bool = True
    pixel_scale: float = 1.0 / 255.0
    learning_rate: float = 1e-3
    lr_steps: tuple[int, ...] = (30000,)
    lr_decay: float = 0.1
    num_steps: int = 40000
    momentum: float = 0.9
    weight_decay: float = 5e-4
    freeze_through: str = "none"
    dropout: float = 0.5
    fc_units: int = 4096
    score_threshold: float = 0.05
    nms_threshold: float = 0.3
    max_per_image: int = 100
    test_roi_chunk: int = 500
    num_test_images: int = 0  # 0 = the whole test split
    num_visualize: int = 4
    shuffle_buffer: int = 256
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 20
    seed: int = 0
    data_dir: str = ""
    manual_dir: str = ""
    download: bool = False

    def validate(self) -> None:
        """Raise ValueError (one line, naming the setting) for an inconsistent config."""
        if self.preprocessing and self.preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing={self.preprocessing!r}: choose one of "
                             f"{', '.join(PREPROCESSINGS)}")
        if self.freeze_through not in det_model.FREEZE_CHOICES:
            raise ValueError(f"freeze_through={self.freeze_through!r}: choose one of "
                             f"{', '.join(det_model.FREEZE_CHOICES)}")
        if self.search_mode not in det_proposals.MODES:
            raise ValueError(f"search_mode={self.search_mode!r}: choose one of "
                             f"{', '.join(det_proposals.MODES)}")
        if not self.scales or min(self.scales) < 63:
            raise ValueError(f"scales={','.join(map(str, self.scales))}: each shorter side "
                             "must be at least 63 pixels")
        if self.test_scale < 63 or self.max_size < max((*self.scales, self.test_scale)):
            raise ValueError(f"test_scale={self.test_scale} must be >= 63 and max_size="
                             f"{self.max_size} at least every scale")
        if not 0 <= self.bg_low <= self.bg_high <= self.fg_threshold <= 1:
            raise ValueError(f"need 0 <= bg_low <= bg_high <= fg_threshold <= 1; got "
                             f"{self.bg_low}, {self.bg_high}, {self.fg_threshold}")
        if not 0 <= self.fg_fraction <= 1:
            raise ValueError(f"fg_fraction={self.fg_fraction} must be in [0, 1]")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps={','.join(map(str, self.lr_steps))} must be increasing "
                             "positive steps")
        for name in ("images_per_batch", "rois_per_image", "num_steps", "max_per_image",
                     "test_roi_chunk", "checkpoint_every", "keep_checkpoints", "log_every",
                     "fc_units", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("proposal_workers", "max_proposals", "num_test_images", "num_visualize"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


# --- pieces -----------------------------------------------------------------------------


def learning_rate_schedule(config: VocDetectionConfig
                           ) -> keras.optimizers.schedules.LearningRateSchedule:
    """lr * lr_decay^(number of lr_steps already passed), as a function of the step (0-based:
    step t uses the rate of iteration t + 1)."""
    boundaries = [s - 1 for s in config.lr_steps] or [config.num_steps]  # none: constant
    values = [config.learning_rate * config.lr_decay ** i for i in range(len(config.lr_steps) + 1)]
    values += values[-1:] * (len(boundaries) + 1 - len(values))
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_train_step(net: keras.Model, optimizer: keras.optimizers.Optimizer,
                    variables: list[keras.Variable], weight_decay: float):
    """A tf.function (batch) -> (classification loss, box loss) applying one SGD step; the
    L2 weight decay `weight_decay * w` is added to the gradient of every kernel."""
    decay = [weight_decay if v.path.endswith("kernel") else 0.0 for v in variables]

    @tf.function(input_signature=[det_data.BATCH_SIGNATURE])
    def step(batch):
        with tf.GradientTape() as tape:
            out = net({k: batch[k] for k in ("images", "rois", "roi_indices")}, training=True)
            cls, box = det_model.detection_loss(out["cls_logits"], out["bbox_deltas"],
                                                batch["labels"], batch["targets"])
            loss = cls + box
        grads = tape.gradient(loss, variables)
        grads = [g + d * v.value if d else g
                 for g, d, v in zip(grads, decay, variables, strict=True)]
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return cls, box

    return step


def proposal_source(config: VocDetectionConfig):
    """The proposals of the run: `--proposals` if set, else the selective-search cache."""
    if config.proposals:
        return det_proposals.load_proposal_file(config.proposals)
    return det_proposals.ProposalCache(config.proposal_cache
                                       or os.path.join(config.model_dir, "proposals"))


def tfds_numpy(dataset: tf.data.Dataset) -> Iterator[dict]:
    """The examples of `dataset` as NumPy structures."""
    return dataset.as_numpy_iterator()


def load_examples(split: str, config: VocDetectionConfig, shuffle: bool = False
                  ) -> tf.data.Dataset:
    """The tfds examples of a split (the test split cut to num_test_images when set)."""
    examples = voc_data.load_split(split, data_dir=config.data_dir or None,
                                   manual_dir=config.manual_dir or None,
                                   download=config.download, shuffle_files=shuffle)
    if split == "test" and config.num_test_images:
        examples = examples.take(config.num_test_images)
    return examples


def prepare_proposals(config: VocDetectionConfig, source, splits: tuple[str, ...]) -> None:
    """Make sure every image of `splits` has proposals: compute the missing ones into the
    cache (selective search) or raise ProposalError naming the first image without any."""
    for split in splits:
        examples = load_examples(split, config)
        if isinstance(source, det_proposals.ProposalCache) and config.compute_proposals:
            ids: list[str] = []

            def images(examples=examples, ids=ids):
                for e in tfds_numpy(examples):
                    ids.append(det_data.image_id_of(e))
                    yield ids[-1], e["image"]

            total = None if split == "test" and config.num_test_images else \
                voc_data.NUM_IMAGES.get(split)
            counts = det_proposals.compute_proposals(
                images(), source, workers=config.proposal_workers, mode=config.search_mode,
                max_proposals=config.max_proposals, total=total)
            logging.info("%s proposals: %d computed, %d cached in %s", split,
                         counts["computed"], counts["cached"], source.directory)
        else:
            filenames = examples.map(lambda e: e["image/filename"]).as_numpy_iterator()
            ids = [det_data.image_id_of({"image/filename": f}) for f in filenames]
        for image_id in ids:
            source.get(image_id)  # raises for a missing or empty entry


def training_stream(config: VocDetectionConfig, source, start_step: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training mini-batches (`evaluation.detection.data`), seeded by (seed, step)."""
    rng = np.random.default_rng([config.seed, start_step])
    examples = load_examples("trainval", config, shuffle=True)
    examples = examples.shuffle(config.shuffle_buffer, seed=config.seed + start_step,
                                reshuffle_each_iteration=True).repeat()
    items = (det_data.detection_image(e, source.get) for e in tfds_numpy(examples))
    return det_data.training_batches(
        items, rng, images_per_batch=config.images_per_batch, scales=config.scales,
        max_size=config.max_size, flip=config.flip, pixel_scale=config.pixel_scale,
        num_rois=config.rois_per_image, fg_fraction=config.fg_fraction,
        fg_threshold=config.fg_threshold, bg_low=config.bg_low, bg_high=config.bg_high)


def evaluate(net: keras.Model, config: VocDetectionConfig, source) -> dict:
    """Detect on the test split and score it with the devkit AP.

    Returns {"map", "per_class": {class: AP (NaN without positives)}, "num_images",
    "num_detections", "examples": the first num_visualize (image, detections)}.
    """
    @tf.function(input_signature=[{k: det_data.BATCH_SIGNATURE[k]
                                   for k in ("images", "rois", "roi_indices")}])
    def net_fn(inputs):
        out = net(inputs, training=False)
        return {"cls_logits": out["cls_logits"], "bbox_deltas": out["bbox_deltas"]}

    examples = load_examples("test", config)
    detections: dict[str, list] = {c: [] for c in voc_data.VOC_CLASSES}
    truth: dict[str, dict] = {c: {} for c in voc_data.VOC_CLASSES}
    shown, count, num_detections = [], 0, 0
    tick = time.time()
    for example in tfds_numpy(examples):
        image_id = det_data.image_id_of(example)
        for name, per_image in voc_data.detection_ground_truth([example]).items():
            truth[name].update(per_image)
        probs, boxes = inference.score_proposals(
            net_fn, example["image"], source.get(image_id), config.test_scale,
            config.max_size, config.pixel_scale, config.test_roi_chunk)
        found = inference.postprocess(probs, boxes, config.score_threshold,
                                      config.nms_threshold, config.max_per_image)
        for k, score, box in found:
            detections[voc_data.VOC_CLASSES[k - 1]].append((image_id, score, box))
        num_detections += len(found)
        if len(shown) < config.num_visualize:
            shown.append((example["image"], found))
        count += 1
        if count % 100 == 0:
            logging.info("tested %d images (%.2f s/image)", count, (time.time() - tick) / 100)
            tick = time.time()
    if not count:
        raise ValueError("the test split is empty")
    per_class = {}
    for name in voc_data.VOC_CLASSES:
        has_positive = any(np.any(~difficult) for _, difficult in truth[name].values())
        per_class[name] = (voc_metrics.detection_ap(detections[name], truth[name])
                           if has_positive else float("nan"))
    present = {c: ap for c, ap in per_class.items() if not np.isnan(ap)}
    return {"map": voc_metrics.mean_ap(present) if present else float("nan"),
            "per_class": per_class, "num_images": count, "num_detections": num_detections,
            "examples": shown}


def draw_detections(examples: list, path: str, min_score: float = 0.3) -> None:
    """A PNG of test images with their detections scoring >= min_score (class and score)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = max(len(examples), 1)
    fig, axes = plt.subplots(1, columns, figsize=(4 * columns, 4), squeeze=False)
    for ax, (image, found) in zip(axes[0], examples, strict=False):
        ax.imshow(image)
        for k, score, (x1, y1, x2, y2) in found:
            if score < min_score:
                continue
            # Devkit boxes are 1-based inclusive; imshow puts pixel i at [i - 0.5, i + 0.5].
            ax.add_patch(plt.Rectangle((x1 - 1.5, y1 - 1.5), x2 - x1 + 1, y2 - y1 + 1,
                                       fill=False, edgecolor="yellow", linewidth=1.5))
            ax.text(x1 - 1.5, y1 - 2, f"{voc_data.VOC_CLASSES[k - 1]} {score:.2f}",
                    color="black", fontsize=7, backgroundcolor="yellow")
        ax.axis("off")
    for ax in axes[0][len(examples):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_table(per_class: dict[str, float]) -> str:
    """The markdown table of the per-class APs (percent) and their mean."""
    present = {c: ap for c, ap in per_class.items() if not np.isnan(ap)}
    return voc_metrics.format_ap_table({"VOC07 11-point AP": present})


# --- the run ----------------------------------------------------------------------------


def run(config: VocDetectionConfig) -> dict:
    """Train and evaluate as the module docstring says; returns the results dict.

    Raises:
      ValueError: a bad setting, an incompatible checkpoint, or missing/empty proposals
        (ProposalError), with a one-line message.
      FileNotFoundError: no checkpoint at init_checkpoint; VOC data not prepared.
    """
    config.validate()
    source = proposal_source(config)
    if config.only_proposals:
        if not isinstance(source, det_proposals.ProposalCache) or config.proposals:
            raise ValueError("only_proposals computes the selective-search cache: set "
                             "--proposal_cache, not --proposals")
        prepare_proposals(config, source, ("trainval", "test"))
        return {"proposal_cache": source.directory}
    preprocessing = resolve_preprocessing(config)
    keras.utils.set_random_seed(config.seed)
    net = det_model.build_detector(preprocessing, dropout=config.dropout,
                                   fc_units=config.fc_units)
    schedule = learning_rate_schedule(config)
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum)
    variables = det_model.set_frozen(net, config.freeze_through)
    optimizer.build(variables)
    manager, resumed = cli.resume(net, optimizer, config.model_dir, config.keep_checkpoints)
    if not resumed and config.init_checkpoint:
        report, fc_note = det_model.load_pretrained(net, config.init_checkpoint)
        logging.info("loaded %d conv weights from %s; %s", len(report.loaded),
                     report.checkpoint, fc_note)

    prepare_proposals(config, source, ("trainval", "test"))
    with tf.io.gfile.GFile(os.path.join(config.model_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(config), "model": "alexnet", "model_kwargs": {
            "preprocessing": preprocessing, "head": "none"}}, f, indent=2)

    start = int(optimizer.iterations.numpy())
    seconds_per_step = None
    if start < config.num_steps:
        step_fn = make_train_step(net, optimizer, variables, config.weight_decay)
        batches = tf.data.Dataset.from_generator(
            lambda: training_stream(config, source, start),
            output_signature=det_data.BATCH_SIGNATURE).prefetch(2)
        batches = iter(batches)
        tick, timed = time.time(), 0
        for step in range(start + 1, config.num_steps + 1):
            cls, box = step_fn(next(batches))
            timed += 1
            if step % config.log_every == 0 or step == config.num_steps:
                seconds_per_step = (time.time() - tick) / timed
                logging.info("step %d loss_cls %.4f loss_box %.4f lr %.3g (%.3f s/step)", step,
                             float(cls), float(box), float(schedule(step - 1)),
                             seconds_per_step)
                tick, timed = time.time(), 0
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                manager.save(checkpoint_number=step)

    results = evaluate(net, config, source)
    examples = results.pop("examples")
    results["step"] = int(optimizer.iterations.numpy())
    results["seconds_per_step"] = seconds_per_step
    table = results_table(results["per_class"])
    with tf.io.gfile.GFile(os.path.join(config.model_dir, "results.json"), "w") as f:
        # A class without test positives has no AP: null (NaN is not JSON).
        json.dump({**results, "map": None if np.isnan(results["map"]) else results["map"],
                   "per_class": {c: None if np.isnan(ap) else ap
                                 for c, ap in results["per_class"].items()}}, f, indent=2)
    summary = (f"VOC07 detection 11-point mAP: {100 * results['map']:.1f} on "
               f"{results['num_images']} test images (step {results['step']})")
    with tf.io.gfile.GFile(os.path.join(config.model_dir, "results.md"), "w") as f:
        f.write(f"# VOC 2007 detection (Fast R-CNN), step {results['step']}\n\n{table}\n\n"
                f"{summary}\n")
    draw_detections(examples, os.path.join(config.model_dir, "detections.png"))
    print(table)
    print(summary)
    return results


# --- flags ------------------------------------------------------------------------------

_DEFAULTS = VocDetectionConfig(model_dir="")
FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the binary's flags (one per config field) in `flag_values`."""
    d = _DEFAULTS
    fv = {"flag_values": flag_values}
    cli.define_voc_run_flags(d, flag_values)
    flags.DEFINE_string("proposals", d.proposals,
                        "Proposal file (.mat of Fast R-CNN, .npz) or directory of .npy "
                        "('' = selective search, cached in --proposal_cache).", **fv)
    flags.DEFINE_string("proposal_cache", d.proposal_cache,
                        "Selective-search cache directory ('' = <model_dir>/proposals).", **fv)
    flags.DEFINE_integer("proposal_workers", d.proposal_workers,
                         "Processes computing selective search (0 = in this process).", **fv)
    flags.DEFINE_bool("compute_proposals", d.compute_proposals,
                      "Compute missing proposals into the cache (else: an error).", **fv)
    flags.DEFINE_bool("only_proposals", d.only_proposals,
                      "Only fill the proposal cache for trainval and test, then exit.", **fv)
    flags.DEFINE_enum("search_mode", d.search_mode, list(det_proposals.MODES),
                      "Selective search mode.", **fv)
    flags.DEFINE_integer("max_proposals", d.max_proposals,
                         "Proposals kept per image (0 = all).", **fv)
    flags.DEFINE_list("scales", [str(s) for s in d.scales],
                      "Training shorter sides (one drawn per image).", **fv)
    flags.DEFINE_integer("max_size", d.max_size, "Longest image side.", **fv)
    flags.DEFINE_integer("test_scale", d.test_scale, "Test shorter side.", **fv)
    flags.DEFINE_integer("images_per_batch", d.images_per_batch, "Images per step.", **fv)
    flags.DEFINE_integer("rois_per_image", d.rois_per_image, "RoIs per image.", **fv)
    flags.DEFINE_float("fg_fraction", d.fg_fraction, "Foreground fraction of the RoIs.", **fv)
    flags.DEFINE_float("fg_threshold", d.fg_threshold, "Foreground: IoU >= this.", **fv)
    flags.DEFINE_float("bg_low", d.bg_low, "Background: IoU >= this ...", **fv)
    flags.DEFINE_float("bg_high", d.bg_high, "... and < this.", **fv)
    flags.DEFINE_bool("flip", d.flip, "Random horizontal flips in training.", **fv)
    flags.DEFINE_float("pixel_scale", d.pixel_scale,
                       "Network input = uint8 pixels * pixel_scale (match pretraining).", **fv)
    flags.DEFINE_float("learning_rate", d.learning_rate, "Initial learning rate.", **fv)
    flags.DEFINE_list("lr_steps", [str(s) for s in d.lr_steps],
                      "Steps after which the lr is multiplied by lr_decay.", **fv)
    flags.DEFINE_float("lr_decay", d.lr_decay, "Learning-rate factor at each lr_step.", **fv)
    flags.DEFINE_integer("num_steps", d.num_steps, "Training iterations.", **fv)
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.", **fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "L2 weight decay on kernels.", **fv)
    flags.DEFINE_enum("freeze_through", d.freeze_through, list(det_model.FREEZE_CHOICES),
                      "Freeze the convs up to this one (none: fine-tune all).", **fv)
    flags.DEFINE_float("dropout", d.dropout, "Dropout after fc6 and fc7.", **fv)
    flags.DEFINE_integer("fc_units", d.fc_units,
                         "Width of fc6/fc7 (4096: AlexNet's, pretrained when available).", **fv)
    flags.DEFINE_float("score_threshold", d.score_threshold, "Test: minimum probability.", **fv)
    flags.DEFINE_float("nms_threshold", d.nms_threshold, "Test: NMS IoU threshold.", **fv)
    flags.DEFINE_integer("max_per_image", d.max_per_image, "Test: detections per image.", **fv)
    flags.DEFINE_integer("test_roi_chunk", d.test_roi_chunk, "Test: RoIs per head call.", **fv)
    flags.DEFINE_integer("num_test_images", d.num_test_images,
                         "Test on the first N test images (0 = all).", **fv)
    flags.DEFINE_integer("num_visualize", d.num_visualize,
                         "Test images drawn in detections.png.", **fv)
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer, "Training shuffle buffer.", **fv)


def _int_list(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"{name}={','.join(values)}: expected comma-separated integers") from None


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> VocDetectionConfig:
    """The frozen config of the parsed flags."""
    return cli.config_from_flags(
        VocDetectionConfig, flag_values, preprocessing=lambda v: v or "",
        scales=lambda v: _int_list("scales", v), lr_steps=lambda v: _int_list("lr_steps", v))


def run_or_exit(config_fn) -> dict:
    """`run(config_fn())`; a bad setting, checkpoint, proposal or data directory exits with
    one line and no traceback."""
    return cli.run_or_exit("voc_detection", run, config_fn)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    run_or_exit(config_from_flags)


if __name__ == "__main__":
    define_flags()
    app.run(main)
