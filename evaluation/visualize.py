r"""PNG figures of a run: first-layer filters, nearest-neighbour retrieval, training curves.

    python -m evaluation.visualize filters   --pretrained=RUN --output=filters.png
    python -m evaluation.visualize retrieval --features=OUT/embedding.npy --output=retrieval.png
    python -m evaluation.visualize curves    --pretrained=RUN --output=curves.png

filters (NAT Figure 4): the first convolution's filters in image space. With a Sobel front
the network sees `conv1 * sobel(gray(image))`; both are linear, so each conv1 filter W_f
([k, k, 2]) composes with the Sobel kernels S_x, S_y into ONE filter on the grey image,

    E_f = W_f[..., 0] (*) S_x + W_f[..., 1] (*) S_y       ((*): full 2-D convolution)

of size (k + 2) x (k + 2): a cross-correlation with W of a cross-correlation with S is a
cross-correlation with their full convolution (away from the image border). A grey front shows
W as it is (one channel); an RGB front shows W as colour; a high-pass front shows W (the
filter before the high-pass). Each filter is min-max scaled to [0, 1] on its own, tiled in a
grid of `--columns`, each tap drawn as `--scale` x `--scale` pixels, under a title.

retrieval (NAT Figure 3): for each query (a row), its k nearest neighbours by cosine
similarity of the features (the query itself excluded, ties broken by the lower index), each
captioned with its label and similarity; neighbours of another class are framed in red. The
images come from the extraction's index.txt: embedded digits (with their class), image files
(labelled by their folder's name) or rows of a tfds split (`tfds:<name>/<split>/<position>`,
from `serving.extract_features --tfds=<name>:<split>`), read from the split as prepared in
`--data_dir` (`--manual_dir`: tfds's manual files), once per split and only up to the last
position drawn, and labelled with the class names of tfds's info (Fashion-MNIST:
"T-shirt/top", "Trouser", ...; the integer when the dataset names none). A caption longer than
11 characters is cut to fit its cell. Figure 3 of Fashion-MNIST's test split (OUT gets one .npy
per output of the export, e.g. embedding.npy or sc.npy):

    python -m serving.extract_features --tfds=fashion_mnist:test --saved_model=EXPORT/name/1 \
        --data_dir=DATA --output_dir=OUT
    python -m evaluation.visualize retrieval --features=OUT/embedding.npy --data_dir=DATA \
        --output=retrieval.png

curves: every scalar of the TensorBoard event files under `--pretrained` that changes (one
panel per tag, tags of subdirectories prefixed by it, e.g. "train/loss"; accuracies in
percent), against the step; constant tags are named in the title.

The drawing itself is `evaluation/figures.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from runtime import cli
from runtime.cli import UsageError, option
from runtime.vocabulary import DataLocation, PretrainedInput

PROGRAM = "evaluation.visualize"

FIGURES = ("filters", "retrieval", "curves")


@dataclass(frozen=True)
class VisualizeConfig(PretrainedInput, DataLocation):
    """The flags of `python -m evaluation.visualize <figure>`; --pretrained (filters: the
    weights; curves: the run folder whose summaries are drawn), --init (filters) and
    --data_dir, --manual_dir (retrieval: where tfds finds the split of an index of tfds rows)
    are those of runtime/vocabulary.py."""

    figure: str = option("", "filters, retrieval or curves (the positional argument).",
                         flag=False)
    output: str = option("", "The PNG to write.")
    model: str = option("", "filters: model name (overrides config.json).")
    columns: int = option(8, "filters: filters per row.", lower=1)
    scale: int = option(8, "filters: pixels per filter tap.", lower=1)
    features: str = option("", "retrieval: a .npy of features [n, ...].")
    index: str = option("", "retrieval: the index.txt of the rows: image paths, digits:... or "
                        "tfds:<name>/<split>/<position> keys (default: next to --features).")
    queries: int = option(8, "retrieval: number of queries.", lower=1)
    query_indices: tuple[int, ...] = option((), "retrieval: explicit query rows (else random).")
    k: int = option(5, "retrieval: neighbours per query.", lower=1)
    cell: int = option(56, "retrieval: pixels per image.", lower=4)
    seed: int = option(0, "retrieval: seed of the random queries; filters: seed of --init=random "
                       "without --pretrained.")
    width: int = option(960, "curves: width in pixels.", lower=100)
    height: int = option(640, "curves: height in pixels.", lower=100)

    def __post_init__(self):
        if self.figure not in FIGURES:
            raise UsageError(f"give one figure: {' | '.join(FIGURES)} (see --help)")
        cli.require("output", self.output)
        if self.figure == "filters" and not (self.pretrained or self.model):
            raise UsageError("filters needs --pretrained (or --model with --init=random)")
        if self.figure == "retrieval":
            cli.require("features", self.features)
        if self.figure == "curves" and not os.path.isdir(self.pretrained):
            raise UsageError(f"curves needs --pretrained, a run folder; got {self.pretrained!r}")


def main(argv=None) -> None:
    cli.main(PROGRAM, VisualizeConfig, "evaluation.visualize_lib:run", module_name=PROGRAM,
             doc=__doc__, argv=argv, positional="figure")


if __name__ == "__main__":
    main()
