"""PASCAL VOC 2007 metrics, computed exactly as the devkit computes them (pure NumPy).

The VOC 2007 devkit (`VOCevalcls.m`, `VOCevaldet.m`, and the 11-point branch of `VOCap`)
defines the numbers NAT Table 4 reports (Bojanowski & Joulin 2017: 56.7 / 65.3 mAP for VOC07
classification with fc6-8 / all layers trained, 49.4 for detection). Everything here
reproduces that code step by step:

- `voc07_ap`: AP = (1/11) sum_{t in 0:0.1:1} max{precision[i] : recall[i] >= t}, with 0 for a
  threshold no recall reaches. The thresholds are the devkit's `for t=0:0.1:1` exactly as
  MATLAB evaluates it (`matlab_colon`): the colon operator builds the first half of the vector
  as a + k*d and the second half as b - (n-k)*d (MathWorks' documented colon algorithm), so
  the fourth threshold is 3*0.1 = 0.30000000000000004, which a recall of exactly 3/10 (the
  double nearest 0.3) does NOT reach, while 0.6 and 0.7 are computed as 1 - 0.4 and 1 - 3*0.1
  and are the doubles nearest 6/10 and 7/10, which such recalls do reach. This matters
  whenever a class's number of positives is a multiple of 10 (up to 0.04 AP).
- `classification_ap`: VOCevalcls. Labels are 1 / -1 / 0 (0: the image holds only "difficult"
  objects of the class; neither a true nor a false positive). Scores are ranked by a stable
  sort on -score, as MATLAB's `sort` does, so ties keep the input order.
- `detection_ap`: VOCevaldet. Detections are ranked by a stable sort on -score; each is matched
  to the ground-truth box of its image with the largest IoU (`iou_matrix`; first box wins
  ties), with the +1 pixel convention of inclusive integer boxes. IoU >= threshold against an
  unmatched non-difficult box is a TP; against an already matched one an FP; against a difficult box
  it is ignored; below the threshold an FP. Difficult boxes are not positives.
- `sklearn_ap`: the non-interpolated AP of `sklearn.metrics.average_precision_score`
  (sum_n (R_n - R_{n-1}) P_n over distinct score thresholds) on the non-difficult images,
  which the voc-classification reference code printed. It is a different number; report it
  under its own name, never as "the" VOC mAP.

One deviation, for an input the devkit leaves undefined: where a prefix of the ranking holds
only ignored entries, the devkit's precision there is 0/0 = NaN, which MATLAB's `max` skips;
NaN is skipped here too, and a threshold whose precisions are all NaN counts 0 (MATLAB: NaN).
A class without any positive is an error here (the devkit divides by zero).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from sklearn.metrics import average_precision_score

__all__ = [
    "VOC07_THRESHOLDS",
    "classification_ap",
    "detection_ap",
    "format_ap_table",
    "iou_matrix",
    "matlab_colon",
    "mean_ap",
    "precision_recall",
    "print_ap_table",
    "sklearn_ap",
    "voc07_ap",
]


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """The float64 vector MATLAB builds for `a:d:b` (d > 0, b = a + n*d for an integer n), by
    MathWorks' documented colon algorithm: n = (b - a) / d intervals, element k of the first
    half a + k*d, element k of the second half b - (n - k)*d, and for even n the middle
    element (a + b) / 2. (An end that is not a + n*d is left out: the devkit never uses one.)
    """
    if not d > 0:
        raise ValueError(f"matlab_colon needs a positive step; got {d}")
    tolerance = 2.0 * np.finfo(np.float64).eps * max(abs(a), abs(b))
    n = int(np.floor((b - a) / d + tolerance))
    if abs(a + n * d - b) > 4 * n * np.finfo(np.float64).eps * max(abs(a), abs(b), 1.0):
        raise ValueError(f"matlab_colon covers a:d:b with b = a + n*d; got {a}:{d}:{b}")
    out = np.empty(n + 1)
    for k in range(n // 2 + 1):
        out[k] = a + k * d
        out[n - k] = b - k * d
    if n % 2 == 0:
        out[n // 2] = (a + b) / 2
    return out


VOC07_THRESHOLDS = matlab_colon(0.0, 0.1, 1.0)
"""The devkit's `0:0.1:1`: 0.30000000000000004 is its fourth element."""


def voc07_ap(recall, precision) -> float:
    """The VOC 2007 11-point interpolated AP.

    Args:
      recall: [D] recall after each ranked entry (non-decreasing).
      precision: [D] precision after each ranked entry; NaN entries are skipped.

    Returns:
      sum over t in VOC07_THRESHOLDS of max{precision[recall >= t]} / 11, accumulated in that
      order (as the devkit does); a threshold that no recall reaches adds 0.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall and precision differ in length: {recall.size} vs "
                         f"{precision.size}")
    ap = 0.0
    for t in VOC07_THRESHOLDS:
        reached = precision[recall >= t]
        reached = reached[~np.isnan(reached)]
        p = float(reached.max()) if reached.size else 0.0
        ap = ap + p / 11
    return float(ap)


def precision_recall(tp, fp, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative precision and recall of a ranking, as the devkit computes them.

    Args:
      tp, fp: [D] 0/1 flags per ranked entry (an ignored entry has both 0).
      num_positives: the number of positives (> 0).

    Returns:
      (recall, precision), each [D]: recall = cumsum(tp) / num_positives and
      precision = cumsum(tp) / (cumsum(tp) + cumsum(fp)), NaN where that is 0/0.
    """
    if num_positives <= 0:
        raise ValueError("no positives: the AP of a class without positives is undefined")
    tp = np.cumsum(np.asarray(tp, dtype=np.float64))
    fp = np.cumsum(np.asarray(fp, dtype=np.float64))
    recall = tp / num_positives
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (fp + tp)
    return recall, precision


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    if not np.all(np.isin(labels, (-1, 0, 1))):
        raise ValueError("labels must be 1 (positive), -1 (negative) or 0 (difficult)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return scores, labels.astype(np.int64)


def classification_ap(scores, labels) -> float:
    """VOC 2007 classification AP of one class (devkit VOCevalcls, 11-point).

    Args:
      scores: [N] confidence per image.
      labels: [N] 1 (positive), -1 (negative) or 0 (difficult: ignored).

    Returns:
      voc07_ap(recall, precision) of the ranking by a stable sort on -scores, where a label 1
      is a TP, -1 an FP, 0 neither, and recall divides by the number of 1 labels.
    """
    scores, labels = _check_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="stable")
    ranked = labels[order]
    recall, precision = precision_recall(ranked > 0, ranked < 0, int(np.sum(labels > 0)))
    return voc07_ap(recall, precision)


def sklearn_ap(scores, labels) -> float:
    """The AP the voc-classification reference code printed (sklearn's average_precision_score).

    Difficult images (label 0) are dropped, then AP = sum_n (R_n - R_{n-1}) P_n over the
    distinct score values in decreasing order (tied scores form one threshold), R_0 = 0.
    Not interpolated, so it is not the devkit AP.

    Args:
      scores: [N] confidence per image.
      labels: [N] 1, -1 or 0 as in `classification_ap`.
    """
    scores, labels = _check_scores_labels(scores, labels)
    keep = labels != 0
    scores, positive = scores[keep], labels[keep] > 0
    if not positive.any():
        raise ValueError("no positives: the AP of a class without positives is undefined")
    return float(average_precision_score(positive, scores))


def as_boxes(boxes) -> np.ndarray:
    """float64 [N, 4] boxes (x1, y1, x2, y2); ValueError for another shape."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2); got shape {boxes.shape}")
    return boxes


def iou_matrix(a, b) -> np.ndarray:
    """IoU of every box of `a` [N, 4] with every box of `b` [M, 4], inclusive pixel boxes (the
    devkit's +1 convention): [N, M] float64.

    iw = min(x2) - max(x1) + 1 (likewise ih); IoU = iw * ih / (area_a + area_b - iw * ih)
    where iw > 0 and ih > 0, else 0; area = (x2 - x1 + 1)(y2 - y1 + 1).
    """
    a, b = as_boxes(a), as_boxes(b)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    overlap = (iw > 0) & (ih > 0)
    inter = np.where(overlap, iw * ih, 0.0)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(overlap, inter / union, 0.0)


def detection_ap(
    detections: Sequence[tuple[Hashable, float, Sequence[float]]],
    ground_truth: Mapping[Hashable, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
) -> float:
    """VOC 2007 detection AP of one class (devkit VOCevaldet, 11-point).

    Args:
      detections: [(image_id, score, (x1, y1, x2, y2))], boxes in 1-based inclusive pixels.
      ground_truth: {image_id: (boxes [M, 4], difficult [M] bool)} for this class, with every
        test image present (M may be 0).
      iou_threshold: the minimum IoU of a hit (devkit: 0.5, compared with >=).

    Returns:
      voc07_ap of the ranking by a stable sort on -score. Each detection takes the box of its
      image with the largest IoU (`iou_matrix`; the first such box on ties); if that IoU >=
      threshold it is a TP when the box is non-difficult and unmatched (the box becomes
      matched), an FP when it is already matched, and ignored when it is difficult; otherwise
      it is an FP. Recall divides by the number of non-difficult boxes. No detections: 0.

    Raises:
      ValueError: a detection names an image absent from `ground_truth`, a box is malformed,
        or no box of the class is non-difficult.
    """
    boxes, difficult, num_positives = _ground_truth(ground_truth)
    if num_positives == 0:
        raise ValueError("no positives: every ground-truth box of the class is difficult or "
                         "there is none")
    if len(detections) == 0:
        return 0.0
    scores = np.array([float(score) for _, score, _ in detections], dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError("detection scores must be finite")
    order = np.argsort(-scores, kind="stable")
    tp, fp = _match([detections[d] for d in order], boxes, difficult, iou_threshold)
    recall, precision = precision_recall(tp, fp, num_positives)
    return voc07_ap(recall, precision)


def _ground_truth(ground_truth):
    """({image: boxes [M, 4]}, {image: difficult [M]}, number of non-difficult boxes)."""
    boxes, difficult, num_positives = {}, {}, 0
    for image_id, (gt_boxes, gt_difficult) in ground_truth.items():
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        gt_difficult = np.asarray(gt_difficult, dtype=bool).reshape(-1)
        if gt_difficult.size != gt_boxes.shape[0]:
            raise ValueError(f"image {image_id!r}: {gt_boxes.shape[0]} boxes but "
                             f"{gt_difficult.size} difficult flags")
        boxes[image_id], difficult[image_id] = gt_boxes, gt_difficult
        num_positives += int(np.sum(~gt_difficult))
    return boxes, difficult, num_positives


def _match(ranked, boxes, difficult, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """VOCevaldet's matching of detections in rank order: (tp, fp) flags [D]."""
    matched = {image_id: np.zeros(len(flags), dtype=bool) for image_id, flags in difficult.items()}
    tp = np.zeros(len(ranked))
    fp = np.zeros(len(ranked))
    for rank, (image_id, _, box) in enumerate(ranked):
        if image_id not in boxes:
            raise ValueError(f"detection on image {image_id!r}, which has no ground-truth entry")
        box = np.asarray(box, dtype=np.float64).reshape(-1)
        if box.size != 4:
            raise ValueError(f"detection box must be (x1, y1, x2, y2); got {box.tolist()}")
        ious = iou_matrix(box[None], boxes[image_id])[0]
        # The devkit only considers boxes that overlap (iw, ih > 0): a non-overlapping box
        # has IoU 0 here, so a threshold of 0 would still need a real overlap.
        if ious.size and ious.max() > 0 and ious.max() >= iou_threshold:
            j = int(np.argmax(ious))  # first maximum, as the devkit's strict `>` keeps
            if difficult[image_id][j]:
                continue
            if matched[image_id][j]:
                fp[rank] = 1
            else:
                tp[rank] = 1
                matched[image_id][j] = True
        else:
            fp[rank] = 1
    return tp, fp


def _per_class_items(per_class) -> list[tuple[str, float]]:
    if isinstance(per_class, Mapping):
        return [(str(name), float(ap)) for name, ap in per_class.items()]
    return [(str(i), float(ap)) for i, ap in enumerate(per_class)]


def mean_ap(per_class: Mapping[str, float] | Sequence[float]) -> float:
    """The mean of the per-class APs ({class: AP} or a sequence). NaN if any AP is NaN."""
    values = [ap for _, ap in _per_class_items(per_class)]
    if not values:
        raise ValueError("mean_ap of no classes")
    return float(np.mean(values))


def format_ap_table(columns: Mapping[str, Mapping[str, float]], percent: bool = True) -> str:
    """A markdown table: one row per class, one column per metric, and a final "mean" row.

    Args:
      columns: {metric name: {class name: AP}}; every metric lists the same classes.
      percent: print APs as percentages with one decimal (VOC tables do), else 4 decimals.
    """
    if not columns:
        raise ValueError("no metric to print")
    names = list(columns)
    classes = [c for c, _ in _per_class_items(columns[names[0]])]
    for name in names[1:]:
        if [c for c, _ in _per_class_items(columns[name])] != classes:
            raise ValueError(f"metric {name!r} lists other classes than {names[0]!r}")

    def fmt(value: float) -> str:
        return f"{100 * value:.1f}" if percent else f"{value:.4f}"

    lines = ["| class | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(fmt(dict(_per_class_items(columns[n]))[c])
                                              for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{fmt(mean_ap(columns[n]))}**"
                                              for n in names) + " |")
    return "\n".join(lines)


def print_ap_table(columns: Mapping[str, Mapping[str, float]], percent: bool = True) -> None:
    """Print `format_ap_table(columns, percent)`."""
    print(format_ap_table(columns, percent))
