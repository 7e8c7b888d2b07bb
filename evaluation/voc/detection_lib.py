"""`run` of `python -m evaluation.voc.detection`, whose docstring states the protocol."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from data import voc as voc_data
from evaluation.voc import common
from evaluation.voc import metrics as voc_metrics
from evaluation.voc.detection import VocDetectionConfig
from evaluation.voc.fast_rcnn import data as det_data
from evaluation.voc.fast_rcnn import inference
from evaluation.voc.fast_rcnn import model as det_model
from evaluation.voc.fast_rcnn import proposals as det_proposals
from losses import loss_scale
from runtime.cli import UsageError
from runtime.errors import InvalidInput
from runtime.progress import Progress

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
            target = loss_scale.scale_loss(optimizer, loss)
        grads = loss_scale.unscaled_gradients(optimizer, tape, target, variables)
        grads = [g + d * v.value if d else g
                 for g, d, v in zip(grads, decay, variables, strict=True)]
        loss_scale.apply_gradients(optimizer, grads, variables)
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
                    ids.append(voc_data.image_id(e))
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
            ids = [voc_data.image_id({"image/filename": f}) for f in filenames]
        for image_id in ids:
            source.get(image_id)  # raises for a missing or empty entry


def training_stream(config: VocDetectionConfig, source, start_step: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training mini-batches (`evaluation.voc.fast_rcnn.data`), seeded by (seed,
    step)."""
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
    bar = Progress(config.num_test_images or voc_data.NUM_IMAGES["test"], "testing",
                   unit=" images", delay=5.0)
    for example in tfds_numpy(examples):
        image_id = voc_data.image_id(example)
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
        bar.update(count, detections=num_detections)
    bar.close()
    if not count:
        raise InvalidInput("the test split is empty")
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
    # optional: matplotlib loads only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # optional: after choosing the Agg backend

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


class DetectionProtocol:
    """VOC 2007 detection with Fast R-CNN for `evaluation.voc.common.run`."""

    title = "VOC 2007 detection (Fast R-CNN)"

    def __init__(self, config: VocDetectionConfig):
        self.source = proposal_source(config)
        self.examples: list = []

    def build(self, config: VocDetectionConfig, preprocessing: str):
        net = det_model.build_detector(preprocessing, dropout=config.dropout,
                                       fc_units=config.fc_units)
        return (net, learning_rate_schedule(config),
                det_model.set_frozen(net, config.freeze_through))

    def model_kwargs(self, preprocessing: str) -> dict:
        return {"preprocessing": preprocessing, "head": "none"}

    def initialize(self, net, config: VocDetectionConfig) -> None:
        report, fc_note = det_model.load_pretrained(net, config.pretrained)
        logging.info("loaded %d conv weights from %s; %s", len(report.loaded),
                     report.checkpoint, fc_note)

    def prepare(self, net, config: VocDetectionConfig, resumed: bool) -> None:
        prepare_proposals(config, self.source, ("trainval", "test"))

    def train_step(self, net, optimizer, variables, config) -> Callable:
        step = make_train_step(net, optimizer, variables, config.weight_decay)

        def losses(batch):
            cls, box = step(batch)
            return {"loss_cls": cls, "loss_box": box}

        return losses

    def batches(self, config: VocDetectionConfig, start_step: int) -> Iterator:
        stream = tf.data.Dataset.from_generator(
            lambda: training_stream(config, self.source, start_step),
            output_signature=det_data.BATCH_SIGNATURE).prefetch(2)
        return iter(stream)

    def evaluate(self, net, config: VocDetectionConfig) -> dict:
        results = evaluate(net, config, self.source)
        self.examples = results.pop("examples")
        return results

    def report(self, results: dict, config: VocDetectionConfig) -> tuple[str, str]:
        draw_detections(self.examples, os.path.join(config.model_dir, "detections.png"))
        summary = (f"VOC07 detection 11-point mAP: {100 * results['map']:.1f} on "
                   f"{results['num_images']} test images (step {results['step']})")
        return results_table(results["per_class"]), summary


def run(config: VocDetectionConfig) -> dict:
    """Train and evaluate as the module docstring says (or, with only_proposals, fill the
    proposal cache); returns the results dict."""
    config.validate()
    protocol = DetectionProtocol(config)
    if config.only_proposals:
        if not isinstance(protocol.source, det_proposals.ProposalCache) or config.proposals:
            raise UsageError("only_proposals computes the selective-search cache: set "
                             "--proposal_cache, not --proposals")
        prepare_proposals(config, protocol.source, ("trainval", "test"))
        return {"proposal_cache": protocol.source.directory}
    return common.run(protocol, config)
