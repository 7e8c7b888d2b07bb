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


def test_each_network_is_read_once_and_rows_equal_fresh_probes(separable, monkeypatch):
    from evaluation import probe

    calls = []
    extract = compare.extract_probe_features
    monkeypatch.setattr(compare, "extract_probe_features",
                        lambda net, endpoints, *a, **k: calls.append(tuple(endpoints)) or
                        extract(net, endpoints, *a, **k))
    nets = _net(1.0), _net(3.0)
    result = compare.compare(*nets, "digits", {"linear": "feat", "knn": "embedding"},
                             labels_per_class=4, splits=2, seed=2)
    assert calls == [("feat", "embedding", "pixels"), ("feat", "embedding")]
    assert separable.count(("images", "train")) == separable.count(("images", "test")) == 2
    assert result.scored_split == "test" and result.scored_examples == 200
    for row in result.rows:
        net = nets[1] if row.init == "random init" else nets[0]
        fresh = probe.run_probe(net, [row.endpoint], "digits", 4, 2, seed=2,
                                head="knn" if row.view == "knn" else "linear")
        assert row.accuracies == tuple(fresh.endpoints[0].accuracies)


def test_validation_holdout_knn_settings_and_given_features(separable):
    from evaluation import probe
    from evaluation.classifiers import KnnHead

    knn = KnnHead(k=5, temperature=0.1)
    kwargs = dict(labels_per_class=4, splits=2, seed=2, evaluate_on="validation",
                  holdout_per_class=10, knn=knn)
    nets = _net(1.0), _net(3.0)
    result = compare.compare(*nets, "digits", {"knn": "embedding"}, **kwargs)
    assert ("images", "test") not in separable and ("labels", "test") not in separable
    assert (result.scored_split, result.scored_examples) == ("validation", 100)
    assert result.to_json()["knn"] == {"k": 5, "temperature": 0.1}
    text = result.table()
    assert "scored on a validation holdout of 100 train images" in text
    assert "5-NN (cosine, T=0.1) on embedding" in text
    fresh = probe.run_probe(nets[0], ["embedding"], "digits", 4, 2, seed=2, head="knn",
                            knn=knn, evaluate_on="validation", holdout_per_class=10)
    assert result.rows[0].accuracies == tuple(fresh.endpoints[0].accuracies)
    features = {init: probe.extract_probe_features(net, endpoints, "digits", seed=2,
                                                   evaluate_on="validation",
                                                   holdout_per_class=10)
                for init, net, endpoints in (("pretrained", nets[0], ["embedding", "pixels"]),
                                             ("random init", nets[1], ["embedding"]))}
    reads = len(separable)
    given = compare.compare(None, None, "digits", {"knn": "embedding"}, features=features,
                            **kwargs)
    assert given.rows == result.rows and given.table() == result.table()
    assert separable[reads:] == [("fit", None)] * 6  # 2 draws x 3 rows, nothing read
