"""The probe protocol: its guarantees (draws, validation, the test split read once, frozen
networks) on data whose answer is known."""

import numpy as np
import pytest

from data import labelled
from evaluation import probe
from evaluation.classifiers import MLPHead
from models import build_model
from runtime.errors import InvalidInput
from tests.helpers import identity_model


def test_probe_on_separable_features_reaches_99_percent(separable):
    result = probe.run_probe(identity_model(), ["feat"], "digits", labels_per_class=5, splits=3)
    (feat,) = result.endpoints
    assert feat.dims == 16 and result.test_examples == 200
    assert all(s.fit_examples + s.val_examples == 50 for s in feat.splits)
    assert all(s.val_examples == 10 for s in feat.splits)  # one per class: round(0.2 * 5)
    assert feat.mean >= 0.99


def test_knn_head_on_separable_features(separable):
    result = probe.run_probe(identity_model(), ["feat"], "digits", labels_per_class=5, splits=2,
                             head="knn")
    assert result.endpoints[0].mean >= 0.99
    assert all(s.hyper == {"k": 1} and s.val_accuracy is None for s in result.endpoints[0].splits)


def test_mlp_head_on_separable_features(separable):
    mlp = MLPHead(width=32, epochs=20, batch_size=16, learning_rate=0.05)
    accuracy = probe.probe(identity_model(), "feat", "digits", 10, 2, head="mlp", mlp=mlp)
    assert accuracy >= 0.95


def test_test_split_is_read_once_after_every_fit(separable):
    probe.run_probe(identity_model(), ["feat", probe.PIXELS], "digits", labels_per_class=4,
                    splits=3)
    test_reads = [i for i, (kind, split) in enumerate(separable) if split == "test"]
    fits = [i for i, (kind, _) in enumerate(separable) if kind == "fit"]
    assert len(fits) == 6  # 3 splits x 2 endpoints
    assert len(test_reads) == 1 and test_reads[0] > max(fits)
    # train images are read once for all splits: features are extracted once
    assert separable.count(("images", "train")) == 1


def test_random_init_probe_runs_end_to_end_on_digits():
    model = build_model("nin_mnist", head="nat", feature_dim=16)
    result = probe.run_probe(model, ["sc", "embedding", probe.PIXELS], "digits",
                             labels_per_class=5, splits=2)
    assert result.test_examples == 599
    assert [e.endpoint for e in result.endpoints] == ["sc", "embedding", "pixels"]
    assert [e.shape for e in result.endpoints] == [(7, 7, 64), (16,), (28, 28, 1)]
    for e in result.endpoints:
        assert len(e.splits) == 2
        assert 0.3 < e.mean <= 1.0  # ten classes: chance is 0.1
    one = probe.probe(model, "sc", "digits", 5, 2)
    assert one == pytest.approx(result.endpoints[0].mean)


def test_frozen_network_does_not_change_during_probing(separable):
    model = build_model("nin_mnist", input_shape=(4, 4, 1), head="nat", feature_dim=8)
    before = [v.numpy().copy() for v in model.variables]
    probe.run_probe(model, ["sc", "embedding"], "digits", labels_per_class=3, splits=2)
    probe.run_probe(model, ["sc"], "digits", labels_per_class=3, splits=1, head="mlp",
                    mlp=MLPHead(width=8, epochs=2))
    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_unknown_endpoint_and_k_too_large_name_the_choices(separable):
    model = identity_model()
    with pytest.raises(InvalidInput, match="unknown endpoint 'conv9' of identity; choose from "
                                         "feat, pixels"):
        probe.run_probe(model, ["conv9"], "digits")
    with pytest.raises(labelled.LabelsPerClassError, match="31 labels per class"):
        probe.run_probe(model, ["feat"], "digits", labels_per_class=31)
    assert ("labels", "test") not in separable and ("images", "test") not in separable


class _Unusable:
    """A stand-in network that fails when called: features given, it must not be."""

    name = "unusable"
    endpoints = ("feat",)
    input_shape = (None, 4, 4, 1)

    def __call__(self, *args, **kwargs):
        raise AssertionError("the network was called")


def test_validation_holdout_is_fixed_disjoint_and_never_reads_test(separable, monkeypatch):
    drawn = []
    draw = labelled.per_class_draw

    def spy(labels, k, rng, num_classes=None, what="the split"):
        positions = draw(labels, k, rng, num_classes, what)
        drawn.append((len(labels), positions))
        return positions

    monkeypatch.setattr(labelled, "per_class_draw", spy)
    train_labels = labelled.load_labels("digits", "train")
    holdout = probe.validation_holdout(train_labels, 10, 3, 10)
    assert np.array_equal(np.bincount(train_labels[holdout]), [10] * 10)
    np.testing.assert_array_equal(holdout, probe.validation_holdout(train_labels, 10, 3, 10))
    drawn.clear()
    result = probe.run_probe(identity_model(), ["feat"], "digits", labels_per_class=4, splits=3,
                             seed=3, evaluate_on="validation", holdout_per_class=10)
    # the holdout draw (all 300), then one draw per split among the other 200
    assert [n for n, _ in drawn] == [300, 200, 200, 200]
    np.testing.assert_array_equal(drawn[0][1], holdout)
    rest = np.setdiff1d(np.arange(300), holdout)
    for _, positions in drawn[1:]:
        assert not np.isin(rest[positions], holdout).any()
    assert ("labels", "test") not in separable and ("images", "test") not in separable
    assert (result.scored_split, result.scored_examples, result.test_examples) == (
        "validation", 100, 0)
    assert result.holdout_per_class == 10 and result.train_examples <= 120
    assert result.to_json()["scored_split"] == "validation" and result.endpoints[0].mean >= 0.99
    # another network (pixels) and other draws see the same holdout
    features = probe.extract_probe_features(identity_model(), ["feat", probe.PIXELS], "digits",
                                            evaluate_on="validation", holdout_per_class=10,
                                            seed=3)
    np.testing.assert_array_equal(features.holdout, holdout)
    np.testing.assert_array_equal(features.train_positions, rest)
    assert np.array_equal(np.bincount(features.scored.labels), [10] * 10)
    assert ("images", "test") not in separable


def test_holdout_too_large_or_with_test_only_options_is_invalid(separable):
    with pytest.raises(probe.HoldoutError,
                       match="holdout_per_class=30: class 0 of digits train has only 30 examples"):
        probe.run_probe(identity_model(), ["feat"], "digits", evaluate_on="validation",
                        holdout_per_class=30)
    with pytest.raises(labelled.LabelsPerClassError, match="train outside the holdout"):
        probe.run_probe(identity_model(), ["feat"], "digits", labels_per_class=21,
                        evaluate_on="validation", holdout_per_class=10)
    with pytest.raises(InvalidInput, match="max_test_examples applies to the test split"):
        probe.run_probe(identity_model(), ["feat"], "digits", evaluate_on="validation",
                        holdout_per_class=10, max_test_examples=5)
    assert ("labels", "test") not in separable and ("images", "test") not in separable


@pytest.mark.parametrize("evaluate_on", ["test", "validation"])
def test_precomputed_features_give_a_fresh_runs_accuracies_without_the_network(
        separable, evaluate_on):
    model, kwargs = identity_model(), dict(seed=1, evaluate_on=evaluate_on,
                                           holdout_per_class=10)
    features = probe.extract_probe_features(model, ["feat", probe.PIXELS], "digits", **kwargs)
    reads = len(separable)
    for k, head, splits in ((3, "linear", 2), (0, "knn", 1), (5, "knn", 3)):
        fresh = probe.run_probe(model, ["feat", probe.PIXELS], "digits", k, splits, head=head,
                                **kwargs)
        reused = probe.run_probe(_Unusable(), ["feat", probe.PIXELS], "digits", k, splits,
                                 head=head, features=features, seed=1)
        assert reused == fresh
    fits = [entry for entry in separable[reads:] if entry[0] == "fit"]
    images = [entry for entry in separable[reads:] if entry[0] == "images"]
    assert len(images) == 3 * 2 and len(fits) == 2 * (2 + 1 + 3) * 2  # fresh runs only read
    with pytest.raises(ValueError, match=r"extracted with pooling=.*'avg'.*, not .*'max'"):
        probe.run_probe(None, ["feat"], "digits", features=features, seed=1, pool="max")
    with pytest.raises(ValueError, match="hold no endpoint embedding; they hold feat, pixels"):
        probe.run_probe(None, ["embedding"], "digits", features=features, seed=1)
    if evaluate_on == "validation":  # the holdout is the seed's
        with pytest.raises(ValueError, match="extracted with seed=1, not 2"):
            probe.run_probe(None, ["feat"], "digits", features=features, seed=2)


def test_features_of_one_draw_serve_only_that_draw(separable):
    features = probe.extract_probe_features(identity_model(), ["feat"], "digits",
                                            labels_per_class=2, splits=2, seed=4)
    assert len(features.train_positions) <= 40 and len(features.scored.labels) == 200
    result = probe.run_probe(None, ["feat"], "digits", 2, 2, seed=4, features=features)
    assert result == probe.run_probe(identity_model(), ["feat"], "digits", 2, 2, seed=4)
    with pytest.raises(ValueError, match="only some of the drawn train examples"):
        probe.run_probe(None, ["feat"], "digits", 3, 2, seed=4, features=features)
