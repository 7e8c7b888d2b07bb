"""VOC 2007 metrics: hand-derived vectors, and literal devkit translations as oracles."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from evaluation.voc import metrics as vm

P, N, D = 1, -1, 0


def _ranked(labels):
    """Scores that rank `labels` in the given order (strictly decreasing)."""
    return np.arange(len(labels), 0, -1, dtype=np.float64)


# --- oracles: the devkit's MATLAB, line by line ------------------------------------------


# `for t=0:0.1:1` as MATLAB evaluates it (MathWorks' colon algorithm: a + k*d for the first
# half, b - (n-k)*d for the second, (a+b)/2 in the middle), written out element by element.
DEVKIT_T = [0.0, 0.1, 0.2, 3 * 0.1, 4 * 0.1, (0.0 + 1.0) / 2,
            1.0 - 4 * 0.1, 1.0 - 3 * 0.1, 1.0 - 2 * 0.1, 1.0 - 0.1, 1.0]


def _devkit_ap11(rec, prec):
    ap = 0.0
    for t in DEVKIT_T:
        ps = [p for r, p in zip(rec, prec, strict=True) if r >= t and not np.isnan(p)]
        ap += (max(ps) if ps else 0.0) / 11
    return ap


def _devkit_cls(scores, labels):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    tp = fp = 0
    rec, prec = [], []
    npos = sum(1 for g in labels if g > 0)
    for i in order:
        tp += labels[i] > 0
        fp += labels[i] < 0
        rec.append(tp / npos)
        prec.append(tp / (tp + fp) if tp + fp else float("nan"))
    return _devkit_ap11(rec, prec)


def _devkit_det(detections, gt, thr=0.5):
    det = {i: [False] * len(b) for i, (b, _) in gt.items()}
    npos = sum(int(np.sum(~np.asarray(d, bool))) for _, d in gt.values())
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    tp = fp = 0
    rec, prec = [], []
    for d in order:
        img, _, bb = detections[d]
        ovmax, jmax = -np.inf, -1
        for j, bbgt in enumerate(gt[img][0]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]),
                  min(bb[3], bbgt[3])]
            iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= thr:
            if not gt[img][1][jmax]:
                if not det[img][jmax]:
                    tp += 1
                    det[img][jmax] = True
                else:
                    fp += 1
        else:
            fp += 1
        rec.append(tp / npos)
        prec.append(tp / (tp + fp) if tp + fp else float("nan"))
    return _devkit_ap11(rec, prec)


# --- the 11-point AP ----------------------------------------------------------------------


# Ten positives ranked so that recall lands exactly on 0.3, 0.6 and 0.7 at a precision
# higher than anything after it:
#   rank:   1 2 3 4 5 6 7 8 9 10 11 12-15 16 17 18-21 22
#   label:  P P P N N P P P N N  P  N     P  P  N     P
#   recall after rank 3 = 3/10 (prec 1), rank 8 = 6/10 (prec 6/8), rank 11 = 7/10 (prec 7/11),
#   rank 16 = 8/10 (prec 8/16), rank 17 = 9/10 (prec 9/17), rank 22 = 10/10 (prec 10/22).
# Max precision at recall >= t, with the devkit's thresholds: the fourth is
# 3*0.1 = 0.30000000000000004, which the recall 3/10 of rank 3 does not reach, so
#   t = 0, .1, .2 -> 1;  t = 3*0.1 -> 3/4 (rank 8);  t = .4, .5, .6 -> 3/4;
#   t = .7 -> 7/11 (rank 11: 7/10 reaches 1 - 3*0.1, the double nearest 0.7);
#   t = .8, .9 -> 9/17 (rank 17);  t = 1 -> 5/11.
EXACT_LABELS = [P, P, P, N, N, P, P, P, N, N, P, N, N, N, N, P, P, N, N, N, N, P]
DEVKIT_AP = (3 * 1 + 4 * (3 / 4) + 7 / 11 + 2 * (9 / 17) + 5 / 11) / 11  # 0.7409
# With exact thresholds k/10 the recall 3/10 would reach t = 0.3 (0.7636); with
# np.arange(0, 1.1, 0.1) the thresholds 0.6 and 0.7 are 0.6000000000000001 and
# 0.7000000000000001, which skip ranks 8 and 11.
EXACT_K_OVER_10_AP = (4 * 1 + 3 * (3 / 4) + 7 / 11 + 2 * (9 / 17) + 5 / 11) / 11
ARANGE_AP = (3 * 1 + 3 * (3 / 4) + 7 / 11 + 3 * (9 / 17) + 5 / 11) / 11


def test_devkit_thresholds_on_recall_03_06_07():
    ap = vm.classification_ap(_ranked(EXACT_LABELS), EXACT_LABELS)
    assert ap == pytest.approx(DEVKIT_AP, abs=1e-15)
    assert round(ap, 4) == 0.7409
    assert abs(ap - EXACT_K_OVER_10_AP) > 0.02 and abs(ap - ARANGE_AP) > 0.02
    assert ap == _devkit_cls(_ranked(EXACT_LABELS), EXACT_LABELS)


def test_matlab_colon_matches_the_devkit_thresholds_bit_for_bit():
    assert vm.VOC07_THRESHOLDS.tolist() == DEVKIT_T
    assert vm.VOC07_THRESHOLDS[3] == 0.30000000000000004 and 3 / 10 < vm.VOC07_THRESHOLDS[3]
    assert vm.VOC07_THRESHOLDS[6] == 6 / 10 and vm.VOC07_THRESHOLDS[7] == 7 / 10
    np.testing.assert_array_equal(vm.matlab_colon(1.0, 0.5, 4.0), [1, 1.5, 2, 2.5, 3, 3.5, 4])
    assert vm.matlab_colon(0.0, 0.1, 0.9).tolist() == [0.0, 0.1, 0.2, 3 * 0.1, 4 * 0.1,
                                                        0.9 - 4 * 0.1, 0.9 - 3 * 0.1,
                                                        0.9 - 2 * 0.1, 0.9 - 0.1, 0.9]
    with pytest.raises(ValueError, match="b = a \\+ n\\*d"):
        vm.matlab_colon(0.0, 0.1, 0.95)


def test_voc07_ap_direct():
    # recall 0.3 exactly at precision 1, then recall 1 at precision 0.5: the devkit's fourth
    # threshold (3*0.1 > 0.3) is not reached by 0.3, so t = 0..0.2 -> 1 (3 thresholds) and
    # t = 3*0.1..1 -> 0.5 (8 thresholds).
    assert vm.voc07_ap([0.3, 1.0], [1.0, 0.5]) == pytest.approx((3 + 8 * 0.5) / 11, abs=1e-15)
    # recall never reaches 0.5: t = 0..0.2 -> 0.8, t = 0.3, 0.4 -> 0.6, t = 0.5..1 add 0.
    assert vm.voc07_ap([0.2, 0.4], [0.8, 0.6]) == pytest.approx((3 * 0.8 + 2 * 0.6) / 11,
                                                                abs=1e-15)
    with pytest.raises(ValueError, match="differ in length"):
        vm.voc07_ap([0.1], [1.0, 1.0])


# --- classification --------------------------------------------------------------------


def test_classification_ties_keep_input_order():
    # Equal scores: the stable sort keeps the input order.
    # [N, P] -> precision [0, 1/2] at recall [0, 1] -> AP 1/2;  [P, N] -> precision 1 -> AP 1.
    assert vm.classification_ap([0.5, 0.5], [N, P]) == pytest.approx(0.5, abs=1e-15)
    assert vm.classification_ap([0.5, 0.5], [P, N]) == pytest.approx(1.0, abs=1e-15)


def test_classification_difficult_is_ignored():
    # Ranked by score: D (0.9), N (0.5), P (0.2). D adds neither TP nor FP (precision 0/0 is
    # skipped), so the positive sits at precision 1/2 -> AP 1/2. Counting D as a negative
    # would give 1/3.
    assert vm.classification_ap([0.2, 0.9, 0.5], [P, D, N]) == pytest.approx(0.5, abs=1e-15)


def test_classification_matches_devkit_oracle_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        labels = rng.choice([P, N, D], size=n, p=[0.3, 0.6, 0.1])
        labels[0] = P
        scores = rng.integers(0, 6, size=n).astype(np.float64)  # many ties
        assert vm.classification_ap(scores, labels) == pytest.approx(
            _devkit_cls(list(scores), list(labels)), abs=1e-12)


def test_classification_bad_input():
    with pytest.raises(ValueError, match="no positives"):
        vm.classification_ap([0.1, 0.2], [N, D])
    with pytest.raises(ValueError, match="labels must be"):
        vm.classification_ap([0.1, 0.2], [P, 2])
    with pytest.raises(ValueError, match="differ in length"):
        vm.classification_ap([0.1], [P, N])


def test_sklearn_ap_matches_sklearn_on_non_difficult():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(3, 40))
        labels = rng.choice([P, N, D], size=n)
        labels[0] = P
        scores = rng.integers(0, 5, size=n) + rng.choice([0.0, 0.5], size=n)
        keep = labels != D
        expected = average_precision_score(labels[keep] > 0, scores[keep])
        assert vm.sklearn_ap(scores, labels) == pytest.approx(expected, abs=1e-12)
    # Hand-derived: ranked P, N, P -> (1/2)(1) + (1/2)(2/3) = 5/6 (the devkit says 9/11).
    assert vm.sklearn_ap([3, 2, 1], [P, N, P]) == pytest.approx(5 / 6, abs=1e-15)
    assert vm.classification_ap([3, 2, 1], [P, N, P]) == pytest.approx(
        (6 + 5 * 2 / 3) / 11, abs=1e-15)


# --- detection -------------------------------------------------------------------------


BOX = (1, 1, 10, 10)  # 10 x 10 = 100 pixels with the +1 convention


def _gt(*boxes, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    flags = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return boxes, flags


def test_iou_exactly_half_with_plus_one_is_a_hit():
    # (1,1,10,5) covers 10 x 5 = 50 pixels, all inside BOX: IoU = 50 / 100 = 0.5 exactly.
    # (Without the +1 it would be 36 / 81 = 0.444: a miss.)
    assert vm.iou_matrix([(1, 1, 10, 5)], [BOX])[0, 0] == 0.5
    gt = {"a": _gt(BOX)}
    # (11 terms of 1/11 sum to 1 + 2e-16, as in the devkit.)
    assert vm.detection_ap([("a", 0.9, (1, 1, 10, 5))], gt) == pytest.approx(1.0, abs=1e-15)
    # (1,1,10,4): 40 / 100 = 0.4 -> an FP, and the only positive is never found -> 0.
    assert vm.detection_ap([("a", 0.9, (1, 1, 10, 4))], gt) == 0.0


def test_duplicate_detection_is_a_false_positive():
    # a: BOX; b: another box. Ranked: (a, BOX) TP, (a, BOX) duplicate FP, (b, box) TP.
    # recall [.5, .5, 1], precision [1, .5, 2/3] -> t <= .5: 1 (6 thresholds), t >= .6: 2/3.
    gt = {"a": _gt(BOX), "b": _gt((5, 5, 20, 20))}
    dets = [("a", 0.9, BOX), ("a", 0.8, BOX), ("b", 0.7, (5, 5, 20, 20))]
    assert vm.detection_ap(dets, gt) == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-15)


def test_hit_counts_against_the_best_box_only():
    # Two boxes in one image, IoU(BOX, B2) = 100 / 120. The second detection equals BOX:
    # its best box (IoU 1) is already matched -> FP, even though B2 (IoU .83) is free.
    # recall [.5, .5, 1], precision [1, .5, 2/3] -> 28/33, as with a duplicate.
    b2 = (1, 1, 10, 12)
    gt = {"a": _gt(BOX, b2)}
    dets = [("a", 0.9, BOX), ("a", 0.8, BOX), ("a", 0.7, b2)]
    assert vm.detection_ap(dets, gt) == pytest.approx(28 / 33, abs=1e-15)


def test_difficult_box_is_ignored_and_not_a_positive():
    # a: BOX (non-difficult) and a far difficult box. Ranked: hit on the difficult box
    # (ignored), a miss (FP), a hit on BOX (TP). One positive only.
    # recall [0, 0, 1], precision [nan, 0, 1/2] -> AP 1/2. (Counting the difficult hit as an
    # FP would give 1/3; treating the difficult box as an ordinary positive would give 28/33.)
    far = (50, 50, 60, 60)
    gt = {"a": _gt(BOX, far, difficult=[False, True])}
    dets = [("a", 0.9, far), ("a", 0.8, (30, 30, 40, 40)), ("a", 0.7, BOX)]
    assert vm.detection_ap(dets, gt) == pytest.approx(0.5, abs=1e-15)
    # Only difficult boxes: there is no positive.
    with pytest.raises(ValueError, match="no positives"):
        vm.detection_ap(dets, {"a": _gt(far, difficult=[True])})


def test_detection_ties_keep_input_order():
    # Same score: miss then hit -> precision [0, 1/2] -> 1/2; hit then miss -> 1.
    gt = {"a": _gt(BOX)}
    miss, hit = ("a", 0.5, (30, 30, 40, 40)), ("a", 0.5, BOX)
    assert vm.detection_ap([miss, hit], gt) == pytest.approx(0.5, abs=1e-15)
    assert vm.detection_ap([hit, miss], gt) == pytest.approx(1.0, abs=1e-15)


def test_image_without_ground_truth():
    # b has no box of the class: a detection there is an FP. Ranked FP, TP -> AP 1/2.
    gt = {"a": _gt(BOX), "b": _gt()}
    assert vm.detection_ap([("b", 0.9, BOX), ("a", 0.8, BOX)], gt) == pytest.approx(
        0.5, abs=1e-15)
    with pytest.raises(ValueError, match="no ground-truth entry"):
        vm.detection_ap([("c", 0.9, BOX)], gt)


def test_no_detections_at_all():
    assert vm.detection_ap([], {"a": _gt(BOX)}) == 0.0


def test_detection_matches_devkit_oracle():
    rng = np.random.default_rng(2)
    for _ in range(40):
        gt = {}
        for img in range(4):
            m = int(rng.integers(0, 4))
            xy = rng.integers(1, 30, size=(m, 2))
            wh = rng.integers(3, 15, size=(m, 2))
            gt[img] = (np.c_[xy, xy + wh].astype(np.float64), rng.random(m) < 0.25)
        if sum(int(np.sum(~d)) for _, d in gt.values()) == 0:
            continue
        dets = []
        for _ in range(int(rng.integers(0, 15))):
            img = int(rng.integers(0, 4))
            if len(gt[img][0]) and rng.random() < 0.7:
                box = gt[img][0][rng.integers(len(gt[img][0]))] + rng.integers(-3, 4, size=4)
            else:
                xy = rng.integers(1, 30, size=2)
                box = np.r_[xy, xy + rng.integers(3, 15, size=2)]
            dets.append((img, float(rng.integers(0, 5)), tuple(float(v) for v in box)))
        expected = _devkit_det(dets, gt) if dets else 0.0
        assert vm.detection_ap(dets, gt) == pytest.approx(expected, abs=1e-12)


# --- mean and table --------------------------------------------------------------------


def test_mean_ap_and_table():
    per_class = {"aeroplane": 0.5, "bicycle": 0.25}
    assert vm.mean_ap(per_class) == 0.375
    assert vm.mean_ap([0.5, 0.25]) == 0.375
    table = vm.format_ap_table({"VOC07 11-pt AP": per_class, "sklearn AP": per_class})
    lines = table.splitlines()
    assert lines[0] == "| class | VOC07 11-pt AP | sklearn AP |"
    assert lines[2] == "| aeroplane | 50.0 | 50.0 |"
    assert lines[-1] == "| **mean** | **37.5** | **37.5** |"
    with pytest.raises(ValueError, match="other classes"):
        vm.format_ap_table({"x": per_class, "y": {"cat": 0.1}})
