"""Pretraining streams: stable indices, batches without repeats, exact resume, folders, tfds."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data import DataError, order
from data.augment import Augment
from data.pretrain import (
    PretrainSource,
    open_source,
    pretrain_dataset,
    steps_per_epoch,
)
from tests.helpers import jpeg_bytes


def _toy_source(n: int = 23, size: int = 6, indexed: bool = True) -> PretrainSource:
    """Image i is filled with the value i / n, so an image tells which index it came from;
    fetched by index, or only streamed."""
    images = (np.arange(n, dtype=np.float32) / n)[:, None, None, None] * np.ones(
        (1, size, size, 1), np.float32)

    def elements():
        return tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), images))

    return PretrainSource("toy", n, (size, size, 1), elements, lambda x: x, fixed_size=True,
                          gather=(lambda indices: tf.gather(images, indices)) if indexed else None)


def _stream(source, global_batch, augment, seed, epochs=5, **kwargs):
    return pretrain_dataset(source, global_batch, augment, seed, epochs, **kwargs)


def _take(ds, count):
    return [(i.numpy(), x.numpy()) for i, x in ds.take(count)]


def test_digits_source_is_the_embedded_train_split():
    source = open_source("digits", (28, 28, 1))
    assert source.num_examples == 1198
    batch = _take(_stream(source, 64, Augment(crop="none"), seed=0), 1)[0]
    assert batch[1].shape == (64, 28, 28, 1)
    assert batch[1].min() >= 0.0 and batch[1].max() <= 1.0
    assert batch[0].dtype == np.int32


def test_batches_never_repeat_an_index_and_epochs_cover_distinct_images():
    source = _toy_source(23)
    ds = _stream(source, 5, Augment(crop="none"), seed=3)
    steps = steps_per_epoch(23, 5)
    assert steps == 4
    batches = _take(ds, 3 * steps)
    assert len(_take(_stream(source, 5, Augment(crop="none"), seed=3, epochs=3), 100)) == 12
    for indices, images in batches:
        assert len(set(indices)) == len(indices)
        # the image really is the one of its index
        np.testing.assert_allclose(images[:, 0, 0, 0], indices / 23, atol=1e-6)
    epochs = [np.concatenate([b[0] for b in batches[e * steps:(e + 1) * steps]])
              for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == steps * 5
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


@pytest.mark.parametrize("indexed, block", [(True, None), (False, 8), (False, 16384)])
def test_resume_continues_the_same_stream(monkeypatch, indexed, block):
    # A global TF seed (the trainer sets one for a seeded init; 0 is the default seed) must not
    # disturb the stream. A streamed source in blocks of 8 < 23 images exercises the shuffle
    # across blocks.
    keras.utils.set_random_seed(0)
    if block:
        monkeypatch.setattr(order, "SHUFFLE_BUFFER", block)
    source = _toy_source(23, indexed=indexed)
    epoch = np.concatenate([b[0] for b in _take(_stream(source, 5, Augment(), seed=7), 4)])
    assert len(set(epoch)) == 20
    augment = Augment(crop="pad", pad=2, flip=True)
    full = _take(_stream(source, 5, augment, seed=7), 10)
    resumed = _take(_stream(source, 5, augment, seed=7, start_step=6), 4)
    for (i_full, x_full), (i_res, x_res) in zip(full[6:], resumed, strict=True):
        np.testing.assert_array_equal(i_full, i_res)
        np.testing.assert_array_equal(x_full, x_res)


def test_pipelines_shard_the_dataset_and_a_global_step_stays_in_one_epoch():
    source = _toy_source(40)
    shards = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                         num_replicas_in_sync=4)
        # global batch 8 over 4 replicas: 2 per replica, 2 replicas per pipeline, 5 steps/epoch
        batches = _take(_stream(source, 8, Augment(crop="none"), 0,
                                         input_context=ctx), 10)
        assert all(len(b[0]) == 2 for b in batches)
        shards.append(np.concatenate([b[0] for b in batches]))
    assert set(shards[0]).isdisjoint(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 40


def test_pad_crop_is_a_translation_of_the_reflect_padded_image():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 8, 8, 1)).astype(np.float32)
    source = PretrainSource("one", 1, (8, 8, 1),
                    lambda: tf.data.Dataset.from_tensor_slices((np.zeros(1, np.int64), image)),
                    lambda x: x, fixed_size=True)
    padded = np.pad(image[0], ((2, 2), (2, 2), (0, 0)), mode="reflect")
    windows = {(r, c): padded[r:r + 8, c:c + 8] for r in range(5) for c in range(5)}
    seen = set()
    for seed in range(40):
        out = _take(_stream(source, 1, Augment(crop="pad", pad=2), seed), 1)[0][1][0]
        match = [k for k, w in windows.items() if np.array_equal(w, out)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 10  # the offsets vary with the seed


def test_short_side_crop_is_a_window_of_the_scaled_image():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (1, 12, 9, 1)).astype(np.float32)  # the shorter side is 9
    source = PretrainSource("one", 1, (8, 8, 1),
                            lambda: tf.data.Dataset.from_tensor_slices(
                                (np.zeros(1, np.int64), image)),
                            lambda x: x, fixed_size=False)
    # scaled so that the shorter side is 10: 12 x 9 -> round(12 * 10 / 9) x 10 = 13 x 10
    scaled = tf.image.resize(image[0], (13, 10), antialias=True).numpy()
    windows = {(r, c): scaled[r:r + 8, c:c + 8] for r in range(6) for c in range(3)}
    seen = set()
    for seed in range(30):
        out = _take(_stream(source, 1, Augment(crop="short_side", short_side=10), seed), 1)
        match = [k for k, w in windows.items() if np.allclose(w, out[0][1][0], atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 5
    with pytest.raises(DataError, match="short_side=7 is smaller than the input 8x8"):
        _stream(source, 1, Augment(crop="short_side", short_side=7), 0)


def test_flip_mirrors_about_half_of_the_images():
    source = _toy_source(200, size=4)
    ramp = np.arange(4, dtype=np.float32)[None, None, :, None] * np.ones((200, 4, 1, 1))
    source = PretrainSource("ramp", 200, (4, 4, 1),
                    lambda: tf.data.Dataset.from_tensor_slices((np.arange(200), ramp)),
                    lambda x: x, fixed_size=True)
    _, images = _take(_stream(source, 200, Augment(crop="none", flip=True), 1), 1)[0]
    flipped = np.all(images[:, 0, :, 0] == [3, 2, 1, 0], axis=1)
    kept = np.all(images[:, 0, :, 0] == [0, 1, 2, 3], axis=1)
    assert np.all(flipped | kept)
    assert 70 < flipped.sum() < 130


def _write_images(root):
    os.makedirs(os.path.join(root, "sub", "deeper"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
        os.path.join(root, "rgb.jpg"))
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8), "L").save(
        os.path.join(root, "sub", "gray.png"))
    Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8), "RGBA").save(
        os.path.join(root, "sub", "rgba.png"))
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(os.path.join(root, "sub", "deeper", "pal.png"))
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(
        os.path.join(root, "sub", "deeper", "white16.png"))
    with open(os.path.join(root, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really an image")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        os.path.join(root, "full.jpg"), quality=95)
    with open(os.path.join(root, "full.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image extension: ignored")


def test_folder_converts_modes_and_skips_unreadable_files(tmp_path):
    root = str(tmp_path / "images")
    _write_images(root)
    source = open_source(f"folder:{root}", (16, 16, 3))
    assert source.num_examples == 6  # rgb, gray, rgba, palette, 16-bit, full
    (corrupt, corrupt_why), (truncated, truncated_why) = source.skipped  # with the reasons
    assert (corrupt, corrupt_why) == (f"{root}/corrupt.png",
                                      f"cannot identify image file '{root}/corrupt.png'")
    assert truncated == f"{root}/truncated.jpg"
    assert truncated_why.startswith("image file is truncated (")
    ds = _stream(source, 6, Augment(crop="none"), seed=0)
    indices, images = _take(ds, 1)[0]
    assert images.shape == (6, 16, 16, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0
    # files are indexed in sorted path order
    assert list(source.paths) == sorted(source.paths)
    white = images[list(indices).index(
        [os.path.basename(p) for p in source.paths].index("white16.png"))]
    np.testing.assert_allclose(white, 1.0, atol=1e-6)
    gray_source = open_source(f"folder:{root}", (16, 16, 1))
    assert _take(_stream(gray_source, 6, Augment(crop="none"), 0), 1)[0][1].shape == (
        6, 16, 16, 1)


def _grey_folder(root, n: int) -> list[str]:
    """n grey 8x8 PNGs; image i is filled with the value 5 * i, so a pixel names its file."""
    os.makedirs(root)
    for i in range(n):
        Image.fromarray(np.full((8, 8), 5 * i, np.uint8)).save(os.path.join(root, f"{i:02d}.png"))
    return sorted(os.listdir(root))


def _batches(source, global_batch, epochs, **kwargs):
    ds = _stream(source, global_batch, Augment(crop="none"), seed=4, epochs=epochs, **kwargs)
    return [(i.numpy(), np.round(x.numpy()[:, 0, 0, 0] * 255 / 5).astype(int)) for i, x in ds]


def test_a_file_that_vanishes_is_skipped_and_its_batch_refilled(tmp_path):
    root = str(tmp_path / "images")
    files = _grey_folder(root, 23)
    source = open_source(f"folder:{root}", (8, 8, 1))
    assert [os.path.relpath(p, root) for p in source.paths] == files
    before = _batches(source, 5, 2)
    order = np.concatenate([i for i, _ in _batches(source, 1, 2)])  # every image, in order
    os.remove(os.path.join(root, "07.png"))
    (tmp_path / "images" / "11.png").write_bytes(b"\x89PNG\r\n\x1a\n now broken")
    # Reopened from the run's own list: indices stay put, nothing is rescanned.
    again = open_source(f"folder:{root}", (8, 8, 1), files=files)
    assert again.num_examples == 23 and again.paths == source.paths
    after = _batches(again, 5, 2)
    assert sorted(again.failures.drain()) == [
        (os.path.join(root, "07.png"), "cannot read: No such file or directory"),
        (os.path.join(root, "11.png"), "Invalid PNG. Failed to initialize decoder.")]
    assert again.failures.drain() == []  # each file is reported once
    assert len(after) == len(before) == 8  # 4 full batches per epoch, as before
    for indices, pixels in after:
        assert len(indices) == 5 and len(set(indices)) == 5
        np.testing.assert_array_equal(pixels, indices)  # each image is its index's file
        assert not {7, 11} & set(indices)
    for epoch in range(2):
        new = np.concatenate([i for i, _ in after[4 * epoch:4 * epoch + 4]])
        # The epoch's order without the two files: refilled from the 3 images it left out.
        epoch_order = order[23 * epoch:23 * (epoch + 1)]
        assert list(new) == [i for i in epoch_order if i not in (7, 11)][:20]
    # A resumed stream (after 3 steps) continues the same refilled stream.
    resumed = _batches(again, 5, 2, start_step=3)
    for (i_a, x_a), (i_b, x_b) in zip(after[3:], resumed, strict=True):
        np.testing.assert_array_equal(i_a, i_b)
        np.testing.assert_array_equal(x_a, x_b)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"no readable image.*1 unreadable files skipped"):
        open_source(f"folder:{empty}", (8, 8, 3))
    with pytest.raises(DataError, match="no such directory"):
        open_source(f"folder:{tmp_path / 'missing'}", (8, 8, 3))


def test_bad_names_and_sizes_are_one_line_errors():
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'.*digits.*folder:<path>"):
        open_source("svhn", (8, 8, 1))
    source = _toy_source(10)
    with pytest.raises(DataError, match="10 images, fewer than one batch of 16"):
        _stream(source, 16, Augment(), 0)
    ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                     num_replicas_in_sync=3)
    with pytest.raises(DataError, match="batch_size 8 is not divisible by the 3 replicas"):
        _stream(source, 8, Augment(), 0, input_context=ctx)
    with pytest.raises(DataError, match="unknown crop"):
        Augment(crop="zoom")


def test_unprepared_tfds_names_the_command(tmp_path):
    with pytest.raises(DataError, match=r"run `tfds build cifar10 --data_dir="):
        open_source("cifar10", (32, 32, 3), data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar.*/my/tars.*--manual_dir"):
        open_source("imagenet2012", (224, 224, 3), data_dir=str(tmp_path),
                    manual_dir="/my/tars")


def test_tfds_stream_through_mock_data():
    with tfds.testing.mock_data(num_examples=24):
        source = open_source("cifar10", (32, 32, 3))
        assert source.num_examples == 24
        batches = _take(_stream(source, 8, Augment(flip=True), seed=0), 6)
    for indices, images in batches:
        assert images.shape == (8, 32, 32, 3) and len(set(indices)) == 8
        assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.concatenate([b[0] for b in batches[:3]])) == set(range(24))


def test_resized_crops_of_jpeg_files_decode_the_box_only_with_the_same_pixels(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, (h, w, sub) in enumerate([(75, 100, 2), (61, 47, 1), (40, 56, 0), (90, 64, 2)]):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(h, w, seed=i, subsampling=sub))
    (root / "4.png").write_bytes(jpeg_bytes(50, 70, seed=4))  # a JPEG, whatever its name
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (45, 60, 3), dtype=np.uint8)
                    ).save(root / "5.png")
    for shape in ((16, 16, 3), (16, 16, 1)):
        source = open_source(f"folder:{root}", shape)
        streams = {fused: _take(_stream(source, 3, Augment(crop="resize", flip=True,
                                                           fused=fused), seed=1), 6)
                   for fused in (True, False)}
        for (i_fused, x_fused), (i_whole, x_whole) in zip(*streams.values(), strict=True):
            np.testing.assert_array_equal(i_fused, i_whole)
            np.testing.assert_array_equal(x_fused, x_whole)
        assert x_fused.shape == (3, *shape) and 0 <= x_fused.min() and x_fused.max() <= 1
    # (seed, epoch, index) determinism: a resumed stream continues with the same crops.
    resumed = _take(_stream(source, 3, Augment(crop="resize", flip=True), seed=1,
                            start_step=3), 3)
    for (i_full, x_full), (i_res, x_res) in zip(streams[True][3:], resumed, strict=True):
        np.testing.assert_array_equal(i_full, i_res)
        np.testing.assert_array_equal(x_full, x_res)


def test_imagenet_crops_come_from_the_encoded_jpegs():
    with tfds.testing.mock_data(num_examples=8):  # tfds' mock ImageNet holds JPEG bytes
        source = open_source("imagenet2012", (32, 32, 3))
        assert source.encoded and not source.fixed_size
        streams = [_take(_stream(source, 4, Augment(crop="resize", fused=fused), seed=0,
                                 epochs=1), 2) for fused in (True, False)]
    for (i_fused, x_fused), (i_whole, x_whole) in zip(*streams, strict=True):
        np.testing.assert_array_equal(i_fused, i_whole)
        np.testing.assert_array_equal(x_fused, x_whole)
