"""The pretrained-versus-twin comparison: the same draws for every row, the paired gap."""

import keras
import numpy as np
import pytest

from evaluation import compare
from evaluation.report import paired_gap


def _net(scale: float):
    """A fixed feature extractor: the input scaled, as two endpoints."""
    inputs = keras.Input((4, 4, 1), name="images")
    flat = keras.layers.Flatten()(inputs)
    feat = keras.layers.Rescaling(scale, name="feat")(inputs)
    return keras.Model(inputs, {"feat": feat, "embedding": keras.layers.Dense(
        8, kernel_initializer=keras.initializers.RandomNormal(seed=int(scale)),
        name="embedding")(flat)})


def test_rows_and_gaps_use_the_same_draws(separable):
    result = compare.compare(_net(1.0), _net(3.0), "digits", {"linear": "feat", "knn": "embedding"},
                             labels_per_class=4, splits=3, seed=2, method="nat")
    assert [(r.view, r.endpoint, r.init) for r in result.rows] == [
        ("linear", "feat", "pretrained"), ("linear", "feat", "random init"),
        ("linear", "pixels", "pixels"), ("knn", "embedding", "pretrained"),
        ("knn", "embedding", "random init"), ("knn", "pixels", "pixels")]
    assert all(len(r.accuracies) == 3 for r in result.rows)
    linear = {r.init: r.accuracies for r in result.rows if r.view == "linear"}
    assert result.gaps["linear"] == paired_gap(linear["pretrained"], linear["random init"],
                                               "label draws")
    text = result.table()
    assert "the same 3 draws for every row" in text and "nat pretrained" in text
    assert "1-NN (cosine) on embedding" in text and "linear probe on pixels" in text
    assert "accuracy (mean ± sd over 3 label draws)" in text
    json = result.to_json()
    assert json["gaps"]["knn"]["text"] == result.gaps["knn"].describe()
    with pytest.raises(ValueError, match="unknown view 'svm'"):
        compare.compare(_net(1.0), _net(1.0), "digits", {"svm": "feat"}, 4, 2)


def test_scaling_the_features_changes_no_linear_or_cosine_result(separable):
    # A linear probe on standardised features and cosine neighbours are blind to a scale.
    result = compare.compare(_net(1.0), _net(5.0), "digits", {"linear": "feat"},
                             labels_per_class=4, splits=2)
    rows = {r.init: r for r in result.rows}
    np.testing.assert_allclose(rows["pretrained"].accuracies, rows["random init"].accuracies)
    assert result.gaps["linear"].mean == 0.0 and not result.gaps["linear"].significant


def _blind():
    """A network whose features carry nothing: every image maps to zeros."""
    inputs = keras.Input((4, 4, 1), name="images")
    zero = keras.layers.Rescaling(0.0, name="feat")(inputs)
    return keras.Model(inputs, {"feat": zero, "embedding": keras.layers.Flatten(
        name="embedding")(zero)})


@pytest.mark.parametrize("calibrated_is_stronger", [False, True])
def test_both_random_rows_and_the_gap_against_the_stronger(separable,
                                                           calibrated_is_stronger):
    strong, weak = _net(3.0), _blind()
    at_init, calibrated = (weak, strong) if calibrated_is_stronger else (strong, weak)
    result = compare.compare(_net(1.0), at_init, "digits", {"linear": "feat"},
                             labels_per_class=4, splits=3, seed=2, method="nat",
                             calibrated=calibrated)
    rows = {r.init: r.accuracies for r in result.rows}
    assert list(rows) == ["pretrained", "random init, BN at init",
                          "random init, BN calibrated", "pixels"]
    used = "random init, BN calibrated" if calibrated_is_stronger else "random init, BN at init"
    assert result.against == {"linear": used}
    assert np.mean(rows[used]) > 0.5 and np.mean(rows[used]) > np.mean(
        rows[({"random init, BN at init", "random init, BN calibrated"} - {used}).pop()])
    assert result.gaps["linear"] == paired_gap(rows["pretrained"], rows[used], "label draws")
    assert f"nat pretrained - {used} (the stronger random-init row) = " in result.table()
    assert result.to_json()["gaps"]["linear"]["against"] == used
