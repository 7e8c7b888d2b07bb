"""Frozen features: a zoo model and its export give the same pooled features."""

import numpy as np
import tensorflow as tf

from evaluation.features import PIXELS, endpoint_names, extract_features
from models import build_model
from serving.client import SavedModelClient
from serving.export_lib import export_features


def test_export_features_match_the_keras_model(tmp_path):
    model = build_model("nin_mnist", input_shape=(8, 8, 1), head="none")
    path = export_features(model, str(tmp_path), "tiny", {"sc": "none", "block1": "none"})
    client = SavedModelClient(path)
    assert client.input_shape == (None, 8, 8, 1)
    assert set(endpoint_names(client)) == {"sc", "block1", PIXELS}
    x = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(client(x)["sc"].numpy(), model(x)["sc"].numpy(), atol=1e-5)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(3)))
    out = extract_features(client, ["sc", PIXELS], ds, pool_size=1)
    np.testing.assert_allclose(out.values["sc"], model(x)["sc"].numpy().mean(axis=(1, 2)),
                               atol=1e-5)
    np.testing.assert_allclose(out.values[PIXELS], x.mean(axis=(1, 2)), atol=1e-6)
    assert out.shapes == {"sc": (1, 1, 64), PIXELS: (1, 1, 1)}
    np.testing.assert_array_equal(out.labels, np.arange(3))
    keras_out = extract_features(model, ["sc"], ds, pool_size=1)
    np.testing.assert_allclose(keras_out.values["sc"], out.values["sc"], atol=1e-5)
