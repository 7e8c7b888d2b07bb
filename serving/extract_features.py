r"""Extract features with an exported feature extractor (`serving.export`).

    python -m serving.extract_features --images_dir=DIR --saved_model=EXPORT/name/1 \
        --output_dir=OUT
    python -m serving.extract_features --digits --saved_model=EXPORT/name/1 --output_dir=OUT
    python -m serving.extract_features --tfds=cifar10:test --server=localhost:8501 \
        --model_name=nin_cifar10 --output_dir=OUT              # TensorFlow Serving, REST
    ... --server=localhost:8500 --grpc                          # TensorFlow Serving, gRPC

Sources: a folder of images (--images_dir), a prepared tfds split (--tfds; fashion_mnist
missing from --data_dir is prepared there from the Debian package dataset-fashion-mnist,
offline), or the 599 embedded test digits (--digits: grey 8x8 PNGs, listed as
digits:test/<position>).

Protocol: every image is sent encoded (file contents, or PNG for tfds images) to the export's
`image_bytes` signature, so decoding, resizing and the model's preprocessing all happen in the
served graph. Images go in batches of `--batch_size`, in sorted path order (tfds: split order).
A batch the model rejects (a file that is not an image) is retried image by image, and the
images that still fail are skipped with the model's reason (e.g. "image_bytes: image 0 of the
batch is an empty string; ..."); files that cannot be read are skipped too. When no image at
all could be used, the binary says so and exits with status 1 (skipped.txt still lists why).

Output, in `--output_dir`:

    <output>.npy   float32 [n, ...] features of each signature output (e.g. sc.npy)
    index.txt      n lines: row i of every .npy comes from this image (path, or
                   tfds:<name>/<split>/<position>)
    skipped.txt    one line per skipped image: "<path>\t<reason>"
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime import cli
from runtime.cli import UsageError, option
from runtime.vocabulary import DataDir, OutputFolder

PROGRAM = "serving.extract_features"


@dataclass(frozen=True)
class ExtractConfig(DataDir, OutputFolder):
    """The flags of `python -m serving.extract_features`; --output_dir (runtime/vocabulary.py)
    is required, --data_dir is tfds's."""

    images_dir: str = option("", "A folder of images (searched recursively).")
    tfds: str = option("", "A prepared tfds split instead, as name:split.")
    digits: bool = option(False, "The embedded test digits instead (599 images).")
    saved_model: str = option("", "An export version directory, run in-process.")
    server: str = option("", "TensorFlow Serving host:port (REST, or gRPC with --grpc).")
    model_name: str = option("", "The served model name (with --server).")
    version: int | None = option(None, "A served version (default: the latest).")
    grpc: bool = option(False, "Use the gRPC PredictionService instead of REST.")
    columnar: bool = option(False, "REST: send the columnar 'inputs' format.")
    batch_size: int = option(64, "Images per request.", lower=1)

    def __post_init__(self):
        if bool(self.images_dir) + bool(self.tfds) + self.digits != 1:
            raise UsageError("give exactly one of --images_dir, --tfds and --digits "
                             "(see --help)")
        if self.tfds and ":" not in self.tfds:
            raise UsageError(f"--tfds must be name:split; got {self.tfds!r}")
        if bool(self.saved_model) == bool(self.server):
            raise UsageError("give exactly one of --saved_model and --server (see --help)")
        if self.server and not self.model_name:
            raise UsageError("--server needs --model_name")
        if self.grpc and not self.server:
            raise UsageError("--grpc needs --server")
        cli.require("output_dir", self.output_dir)
        cli.check_range("batch_size", self.batch_size, 1)


def main(argv=None) -> None:
    cli.main(PROGRAM, ExtractConfig, "serving.extract_features_lib:run", module_name=PROGRAM,
             doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
