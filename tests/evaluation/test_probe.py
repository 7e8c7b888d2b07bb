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
