"""Fashion-MNIST (Xiao et al. 2017) without a network: tfds's `fashion_mnist` prepared from the
Debian package `dataset-fashion-mnist`.

`apt-get install dataset-fashion-mnist` puts the dataset's four IDX files in DEBIAN_DIR
(60000 train and 10000 test 28x28 grey images, 10 classes, 6000 train and 1000 test images per
class). They are the files tfds's builder reads, recompressed without the file name in the
gzip header, so the .gz checksums tfds registered for its download do not match while the
decompressed content is the same. `prepare` therefore checks the decompressed files itself
(IDX magic number, count, 28x28, and the SHA-256 pinned in FILES) and hands them to the
builder's own `download_and_prepare` through a download manager that serves these four files
and nothing else: the builder's own example generation, split metadata and file format, so
`tfds.load("fashion_mnist", data_dir=...)` reads the result as if `tfds build` had made it.
Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tempfile
import time
import zlib

import numpy as np
import tensorflow_datasets as tfds

from data import DataError

NAME = "fashion_mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SIDE = 28
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: uint8 data, 3 and 1 dimensions
# file -> (split, kind, count, SHA-256 of the decompressed file)
FILES = {
    "train-images-idx3-ubyte.gz": (
        "train", "images", 60000,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte.gz": (
        "train", "labels", 60000,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte.gz": (
        "test", "images", 10000,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte.gz": (
        "test", "labels", 10000,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


def debian_dir() -> str | None:
    """DEBIAN_DIR when the package's directory exists (its files are checked when read)."""
    return DEBIAN_DIR if os.path.isdir(DEBIAN_DIR) else None


def missing_message(data_dir: str) -> str:
    """The one line for a data_dir without fashion_mnist on a machine without the package."""
    return (f"dataset {NAME} is not prepared in {data_dir} and {DEBIAN_DIR} does not exist: run "
            f"`apt-get install {DEBIAN_PACKAGE}` (it is then prepared from there, offline) or "
            f"`tfds build {NAME} --data_dir={data_dir}`")


def _reinstall(path: str, what: str) -> DataError:
    return DataError(f"{path}: {what}; reinstall it (`apt-get install --reinstall "
                     f"{DEBIAN_PACKAGE}`)")


def read_file(directory: str, name: str) -> bytes:
    """The decompressed IDX file `name` of FILES, checked: header (magic number, count, 28x28),
    length and SHA-256. Raises DataError naming the file otherwise."""
    _, kind, count, digest = FILES[name]
    path = os.path.join(directory, name)
    try:
        with gzip.open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        raise _reinstall(path, "missing") from None
    except (OSError, EOFError, zlib.error) as error:
        raise _reinstall(path, f"not a readable gzip file ({error})") from None
    if kind == "images":
        header, expected = np.frombuffer(content[:16], ">u4"), [IMAGE_MAGIC, count, SIDE, SIDE]
    else:
        header, expected = np.frombuffer(content[:8], ">u4"), [LABEL_MAGIC, count]
    if len(content) < 4 * len(expected) or header.tolist() != expected:
        raise _reinstall(path, f"IDX header {header.tolist()}, expected {expected} "
                               f"(magic, count{', rows, columns' if kind == 'images' else ''})")
    size = 4 * len(expected) + count * (SIDE * SIDE if kind == "images" else 1)
    if len(content) != size:
        raise _reinstall(path, f"{len(content)} bytes decompressed, expected {size}")
    got = hashlib.sha256(content).hexdigest()
    if got != digest:
        raise _reinstall(path, f"SHA-256 of the decompressed file is {got}, expected {digest}")
    return content


def arrays(split: str, directory: str = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    """A split of the checked files: images uint8 [N, 28, 28], labels int64 [N] in 0..9, in
    the files' order (tfds's split holds the same examples in an order of its own)."""
    names = {kind: name for name, (s, kind, _, _) in FILES.items() if s == split}
    if not names:
        raise ValueError(f"unknown split {split!r}; choose one of train, test")
    images = np.frombuffer(read_file(directory, names["images"]), np.uint8, offset=16)
    labels = np.frombuffer(read_file(directory, names["labels"]), np.uint8, offset=8)
    return images.reshape(-1, SIDE, SIDE), labels.astype(np.int64)


class _DebianFiles(tfds.download.DownloadManager):
    """A download manager that serves the checked IDX files for the builder's URLs (by file
    name) and refuses everything else, so that nothing is downloaded."""

    def __init__(self, files: dict[str, str], sizes: int, **kwargs):
        super().__init__(**kwargs)
        self._files, self._sizes = files, sizes

    def _serve(self, urls):
        def one(url):
            name = os.path.basename(str(url))
            if name not in self._files:
                raise DataError(f"{NAME}: the tfds builder asks for {url}, which "
                                f"{DEBIAN_PACKAGE} does not hold")
            return self._files[name]

        return tfds.core.utils.map_nested(one, urls)

    def download_and_extract(self, url_or_urls):
        return self._serve(url_or_urls)

    def download(self, url_or_urls):
        return self._serve(url_or_urls)

    @property
    def downloaded_size(self) -> int:  # the .gz files read, as a download would count them
        return self._sizes


def prepare(builder, directory: str = DEBIAN_DIR) -> float:
    """Prepare tfds's `fashion_mnist` (`builder`, from `tfds.builder("fashion_mnist",
    data_dir=...)`) from the Debian files in `directory`, once; prints one line saying so.
    Returns the seconds it took. Raises DataError when a file fails its checks."""
    root = builder.data_dir_root
    print(f"preparing {NAME} in {root} from {directory} (Debian {DEBIAN_PACKAGE}), once",
          flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-") as scratch:
        files = {}
        for name in FILES:  # every file is checked before anything is written
            files[name] = read_file(directory, name)
        for name, content in files.items():
            files[name] = os.path.join(scratch, name[:-len(".gz")])
            with open(files[name], "wb") as f:
                f.write(content)
        sizes = sum(os.path.getsize(os.path.join(directory, name)) for name in FILES)

        def download_manager(download_dir, download_config):
            return _DebianFiles(files, sizes, download_dir=os.path.join(scratch, "downloads"),
                                dataset_name=NAME)

        # tfds 4.9's builders make their download manager in this (private) method; the
        # instance attribute replaces it for this one build.
        builder._make_download_manager = download_manager
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        try:
            # tfds's own progress bars and lines: the line above says what happens.
            with (contextlib.redirect_stdout(io.StringIO()),
                  contextlib.redirect_stderr(io.StringIO())):
                builder.download_and_prepare(download_config=config)
        finally:
            del builder._make_download_manager
    return time.perf_counter() - start


