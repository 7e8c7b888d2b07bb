"""Every dataset of the zoo, as streams the rest consumes.

    images    listing image files; decoding; the resize and channel rule
    digits    the embedded scikit-learn digits and their fixed split
    pretrain  (index, image) streams for pretraining
    augment   the pretraining augmentations, one image at a time
    labelled  (image, label) splits and label draws for probes and fine-tuning; STL-10 folds
    prepared  tfds datasets as prepared in a data_dir: where missing data is found and named
    fashion_mnist  Fashion-MNIST prepared offline from the Debian package dataset-fashion-mnist
    voc       PASCAL VOC 2007 in the devkit's terms

The names below are what binaries check their flags against before TensorFlow is imported
(this file imports nothing but runtime.errors).
"""

from runtime.errors import InvalidInput

PRETRAIN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "stl10", "imagenet2012",
                     "folder:<path>")
"""Pretraining image sources (`data.pretrain.open_source`); folders have no labels."""
LABELLED_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "stl10", "imagenet2012")
"""Labelled datasets of the probes and of fine-tuning (`data.labelled`)."""
CROPS = ("pad", "resize", "short_side", "none")
"""Pretraining crops (`data.augment.Augment`)."""


class DataError(InvalidInput):
    """A dataset cannot be used as asked; the message says why and what to do."""


def is_pretrain_dataset(name: str) -> bool:
    """True for a name of PRETRAIN_DATASETS or `folder:<path>`."""
    return name in PRETRAIN_DATASETS[:-1] or (name.startswith("folder:") and len(name) > 7)
