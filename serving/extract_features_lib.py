"""`run` of `python -m serving.extract_features`, whose docstring states the protocol."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data import DataError, digits, prepared
from data.images import IMAGE_EXTENSIONS, list_images
from runtime.cli import UsageError
from runtime.errors import MissingInput
from runtime.files import write_json_atomic
from runtime.progress import Progress
from serving.client import GrpcClient, RestClient, SavedModelClient, ServingError
from serving.extract_features import ExtractConfig


@dataclass
class Extracted:
    """Features of the images that went through, in order, and the images skipped."""

    features: dict[str, np.ndarray]
    index: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def folder_items(paths: Iterable[str]) -> Iterator[tuple[str, bytes | Exception]]:
    """(path, file contents), or (path, the OSError) for a file that cannot be read."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                yield path, f.read()
        except OSError as err:
            yield path, err


def tfds_items(name: str, split: str, data_dir: str | None = None
               ) -> tuple[int | None, Iterator[tuple[str, bytes | Exception]]]:
    """(count or None, (key, PNG bytes)) of a prepared tfds split; nothing is downloaded
    (`data.prepared.tfds_split`: fashion_mnist is prepared from its Debian package).

    Raises FileNotFoundError when the split is not prepared in `data_dir`.
    """
    try:  # the zoo's reader: a fashion_mnist missing from data_dir is prepared offline
        builder, dataset = prepared.tfds_split(name, split, data_dir)
    except (DataError, tfds.core.registered.DatasetNotFoundError) as err:
        raise MissingInput(f"--tfds {name}:{split} is not available in "
                           f"{data_dir or 'the default data_dir'}: "
                           f"{str(err).splitlines()[0]}") from None
    try:
        count = builder.info.splits[split].num_examples
    except KeyError:  # no recorded split sizes: the progress bar runs without a total
        count = None

    def items():
        for i, example in enumerate(dataset):
            yield f"tfds:{name}/{split}/{i}", tf.io.encode_png(example["image"]).numpy()

    return count, items()


def extract(predict: Callable[[list[bytes]], dict[str, np.ndarray]],
            items: Iterable[tuple[str, bytes | Exception]], batch_size: int = 64,
            total: int | None = None, progress: bool = True) -> Extracted:
    """Run `predict` (a client's predict_bytes) over `items` in batches.

    A batch rejected as bad input (ServingError with bad_input) is retried one image at a
    time; images that fail alone are skipped with the server's reason. Other errors (server
    unreachable) propagate.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    bar = Progress(total, "extracting features", unit=" images") if progress else None
    chunks: dict[str, list[np.ndarray]] = {}
    index: list[str] = []
    skipped: list[tuple[str, str]] = []
    done = 0

    def run(keys: list[str], blobs: list[bytes]) -> None:
        try:
            out = predict(blobs)
        except ServingError as err:
            if not err.bad_input:
                raise
            if len(blobs) == 1:
                skipped.append((keys[0], str(err)))
                return
            for key, blob in zip(keys, blobs, strict=True):
                run([key], [blob])
            return
        for name, value in out.items():
            chunks.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
        index.extend(keys)

    keys: list[str] = []
    blobs: list[bytes] = []
    for key, blob in items:
        if isinstance(blob, Exception):
            skipped.append((key, f"cannot read: {blob}"))
        else:
            keys.append(key)
            blobs.append(blob)
        if len(blobs) == batch_size:
            run(keys, blobs)
            done += len(keys)
            keys, blobs = [], []
        if bar is not None:
            bar.update(done + len(keys) + len(skipped), skipped=len(skipped))
    if blobs:
        run(keys, blobs)
    if bar is not None:
        bar.update(len(index) + len(skipped), skipped=len(skipped))
        bar.close()
    features = {name: np.concatenate(parts) for name, parts in chunks.items()}
    return Extracted(features, index, skipped)


def write_outputs(result: Extracted, output_dir: str) -> list[str]:
    """Write <output>.npy, index.txt and skipped.txt; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for name, value in result.features.items():
        path = os.path.join(output_dir, f"{name}.npy")
        np.save(path, value)
        written.append(path)
    for filename, lines in (("index.txt", result.index),
                            ("skipped.txt", [f"{k}\t{r}" for k, r in result.skipped])):
        path = os.path.join(output_dir, filename)
        with open(path, "w") as f:
            f.writelines(line.replace("\n", " ") + "\n" for line in lines)
        written.append(path)
    return written


def read_index(output_dir: str) -> list[str]:
    """The image keys of index.txt, one per feature row."""
    with open(os.path.join(output_dir, "index.txt")) as f:
        return [line.rstrip("\n") for line in f]




def make_client(config: ExtractConfig):
    """The client the config names (SavedModelClient, RestClient or GrpcClient)."""
    if config.saved_model:
        return SavedModelClient(config.saved_model)
    if config.grpc:
        return GrpcClient(config.server, config.model_name, config.version)
    return RestClient(config.server, config.model_name, config.version,
                      columnar=config.columnar)


def extract_all(config: ExtractConfig, progress: bool = True) -> Extracted:
    """Extract and write the outputs of `config`."""
    client = make_client(config)
    if config.images_dir:
        paths = list_images(config.images_dir)
        if not paths:
            raise UsageError(f"--images_dir={config.images_dir} holds no image file "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        total, items = len(paths), folder_items(paths)
    elif config.digits:
        items = digits.encoded("test")
        total = len(items)
    else:
        name, _, split = config.tfds.partition(":")
        total, items = tfds_items(name, split or "train", config.data_dir or None)
    result = extract(client.predict_bytes, items, config.batch_size, total, progress)
    write_outputs(result, config.output_dir)
    return result


def run(config: ExtractConfig) -> Extracted:
    """The binary: extract, write config.json and the outputs, print a summary line."""
    try:
        result = extract_all(config)
    except ServingError as err:
        raise UsageError(str(err)) from None
    skipped = os.path.join(config.output_dir, "skipped.txt")
    if not result.index:
        raise UsageError(f"no image could be used: all {len(result.skipped)} were skipped, "
                         f"each with its reason in {skipped}")
    write_json_atomic(os.path.join(config.output_dir, "config.json"), asdict(config))
    shapes = ", ".join(f"{k} {v.shape}" for k, v in result.features.items())
    print(f"{len(result.index)} images -> {shapes}; {len(result.skipped)} skipped "
          f"(listed in {skipped})")
    return result
