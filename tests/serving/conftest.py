"""Fixtures of the serving tests: an export of a tiny network and a folder of images."""

import os

import numpy as np
import pytest
from PIL import Image

from models import build_model
from serving.export_lib import export_features
from tests.helpers import SIZE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """nin_mnist (16x16x1) with two outputs: sc average-pooled and the NAT embedding."""
    model = build_model("nin_mnist", input_shape=(SIZE, SIZE, 1), head="nat", feature_dim=4)
    base = str(tmp_path_factory.mktemp("export"))
    path = export_features(model, base, "digits", {"sc": "avg", "embedding": "none"})
    return model, base, path


@pytest.fixture
def image_folder(tmp_path):
    """Good images (grey PNG, RGB PNG of another size, JPEG), a corrupt file and a dangling
    link, in two folders."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "b.PNG")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        folder / "sub" / "d.jpg", quality=95)
    os.symlink(folder / "missing.png", folder / "sub" / "e.png")
    (folder / "notes.txt").write_text("not listed")
    return folder
