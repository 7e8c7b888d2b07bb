"""The image convention: listing files, decoding, the channel and resize rule."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    decode_jpeg_window,
    decode_pixels,
    list_images,
    resize_to_input,
)
from tests.helpers import jpeg_bytes


def test_resize_to_input_channels_and_identity():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(size=(2, 6, 6, 3)).astype(np.float32)
    same = resize_to_input(rgb, (6, 6, 3)).numpy()
    np.testing.assert_array_equal(same, rgb)
    gray = resize_to_input(rgb, (6, 6, 1)).numpy()
    np.testing.assert_allclose(gray[..., 0], rgb.mean(axis=-1), rtol=1e-6)
    single = resize_to_input(rgb[0], (6, 6, 1)).numpy()
    np.testing.assert_allclose(single, gray[0], rtol=1e-6)
    constant = resize_to_input(np.full((1, 8, 8, 1), 0.25, np.float32), (20, 20, 1))
    np.testing.assert_allclose(constant.numpy(), 0.25, atol=1e-6)
    wide = np.zeros((1, 4, 8, 1), np.float32)
    wide[:, :, 2:6] = 1.0  # the central 4 x 4 square
    crop = resize_to_input(wide, (4, 4, 1), center_crop=True).numpy()
    np.testing.assert_array_equal(crop, np.ones((1, 4, 4, 1)))


def test_resize_to_input_with_shapes_known_only_at_run_time():
    rng = np.random.default_rng(1)
    grey = rng.uniform(size=(2, 5, 7, 1)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])
    def dynamic(x):
        return resize_to_input(x, (5, 7, 3))

    out = dynamic(tf.constant(grey)).numpy()
    np.testing.assert_array_equal(out, np.repeat(grey, 3, axis=-1))  # tiled, not resized
    static = resize_to_input(grey, (9, 4, 3)).numpy()
    np.testing.assert_allclose(
        tf.function(lambda x: resize_to_input(x, (9, 4, 3)), input_signature=[
            tf.TensorSpec([None, None, None, None], tf.float32)])(tf.constant(grey)).numpy(),
        static, atol=1e-6)


def test_list_images_is_sorted_recursive_and_case_blind(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/x.PNG", "a.jpg", "c.webp", "notes.txt", "b/y.jpeg"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.relpath(p, tmp_path) for p in list_images(str(tmp_path))] == [
        "a.jpg", "b/x.PNG", "b/y.jpeg", "c.webp"]
    assert ".webp" in IMAGE_EXTENSIONS
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        list_images(str(tmp_path / "missing"))


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB"),
                                      ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P")])
def test_decode_image_gives_rgb_in_0_1(fmt, mode):
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    decoded = decode_image(tf.constant(buffer.getvalue())).numpy()
    assert decoded.shape == (4, 4, 3) and decoded.dtype == np.float32
    expected = np.asarray(image.convert("RGB"), np.float32) / 255.0
    tolerance = 0.05 if fmt in ("JPEG", "WEBP") else 1e-6
    np.testing.assert_allclose(decoded, expected, atol=tolerance)


@pytest.mark.parametrize("height, width, subsampling, mode", [
    (75, 100, 2, "RGB"), (61, 47, 1, "RGB"), (40, 56, 0, "RGB"), (33, 50, 2, "L")])
def test_a_jpeg_window_is_the_slice_of_the_whole_image(height, width, subsampling, mode):
    raw = tf.constant(jpeg_bytes(height, width, subsampling=subsampling, mode=mode))
    whole = decode_pixels(raw).numpy()
    rng = np.random.default_rng(height)
    boxes = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1)]
    for _ in range(40):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
    for y, x, h, w in boxes:
        window = decode_jpeg_window(raw, tf.constant([y, x, 0]), tf.constant([h, w, -1]))
        np.testing.assert_array_equal(window.numpy(), whole[y:y + h, x:x + w],
                                      err_msg=str((y, x, h, w)))
