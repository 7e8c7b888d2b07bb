"""The linear probe's solver against scikit-learn's, on Fashion-MNIST with every label.

    python -m benchmarks.linear_probe [--quick] [--seed=0]

What it measures. The 60000 training images of Fashion-MNIST (the Debian package's IDX
files, read and checked by `data.fashion_mnist.arrays`) with all their labels, and the
10000 test images, as two feature sets:

    pixels        the 784 pixels in [0, 1]
    random ReLU   max(0, (pixels - their training mean) @ R) with R [784, 3136] a fixed
                  Gaussian matrix (seeded, entries of variance 1 / 784): wide features,
                  the width of the zoo's widest probed endpoints

On each, two classifiers, timed (wall and CPU seconds of this process, all threads):

    zoo probe     evaluation.classifiers.fit_linear: a stratified 20% validation carve
                  (data.labelled.split_validation, as evaluation/probe.py carves), C chosen
                  along the warm-started path of LinearHead.cs (stopped early), then refit
                  on all 60000; iterations = the path's, then the refit's
    scikit-learn  LogisticRegression() as it comes (lbfgs, C = 1, tol 1e-4, max_iter 100,
                  its default threads) on all 60000, standardised with their own mean and
                  std as the probe's refit is; converged = it stopped before max_iter

and the test accuracy of each. `--quick` keeps the first 10000 training images.

Measured (2 cores shared with about ten other busy processes, hence wall >> CPU):

    features          classifier    wall s  CPU s  iterations (path; refit)    C  conv.  test %
    pixels            zoo probe      277.9   45.0  26+44+70+126+103; 22   0.01  true   84.66
    pixels            scikit-learn   319.4   91.5  100                       1  false  84.18
    random ReLU 3136  zoo probe      297.0  118.6  38+49+42+56+66; 23     0.01  true   88.24
    random ReLU 3136  scikit-learn   318.9  136.9  100                       1  false  87.62
"""

from __future__ import annotations

import time
import warnings

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import numpy as np
from absl import app, flags
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from data import fashion_mnist, labelled
from evaluation import classifiers
from runtime.errors import UserError

_QUICK = flags.DEFINE_boolean("quick", False, "Keep only the first 10000 training images.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the validation carve and of the projection.")
WIDTH = 3136  # the random ReLU features' width
QUICK_EXAMPLES = 10_000


def feature_sets(x: np.ndarray, x_test: np.ndarray, seed: int) -> dict:
    """{name: (train features, test features)}: pixels in [0, 1], and their random ReLU
    projection to WIDTH dimensions (both float32)."""
    pixels, test = (a.reshape(len(a), -1) / np.float32(255) for a in (x, x_test))
    mean = pixels.mean(axis=0)
    projection = (np.random.default_rng(seed).standard_normal((pixels.shape[1], WIDTH))
                  / np.sqrt(pixels.shape[1])).astype(np.float32)
    relu = [np.maximum((p - mean) @ projection, 0) for p in (pixels, test)]
    return {"pixels": (pixels, test), f"random ReLU {WIDTH}": tuple(relu)}


def timed(function):
    """(function(), wall seconds, CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def zoo_probe(x, y, x_test, y_test, seed: int) -> dict:
    fit, val = labelled.split_validation(y, 0.2, np.random.default_rng(seed))
    fitted, wall, cpu = timed(lambda: classifiers.fit_linear(x[fit], y[fit], x[val], y[val],
                                                             10))
    hyper = fitted.hyper
    path = "+".join(str(i) for i in hyper["path_iterations"])
    return {"wall": wall, "cpu": cpu, "iterations": f"{path}; {hyper['iterations']}",
            "C": hyper["C"], "converged": all(hyper["path_converged"]) and hyper["converged"],
            "test": classifiers.accuracy(fitted.predict(x_test), y_test)}


def scikit_learn(x, y, x_test, y_test) -> dict:
    standardize = classifiers.standardizer(x)
    z, z_test = standardize(x), standardize(x_test)
    model = LogisticRegression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, wall, cpu = timed(lambda: model.fit(z, y))
    stopped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    iterations = int(np.max(model.n_iter_))
    return {"wall": wall, "cpu": cpu, "iterations": str(iterations), "C": model.C,
            "converged": iterations < model.max_iter and not stopped,
            "test": classifiers.accuracy(model.predict(z_test), y_test)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        images, labels = fashion_mnist.arrays("train")
        test_images, test_labels = fashion_mnist.arrays("test")
    except UserError as error:
        raise app.UsageError(str(error)) from None
    if _QUICK.value:
        images, labels = images[:QUICK_EXAMPLES], labels[:QUICK_EXAMPLES]
    print(f"Fashion-MNIST: {len(labels)} training images with their labels, "
          f"{len(test_labels)} test images; seed {_SEED.value}\n")
    head = (f"| {'features':<17} | {'classifier':<12} | {'wall s':>6} | {'CPU s':>6} | "
            f"{'iterations (path; refit)':<30} | {'C':>6} | {'converged':<9} | "
            f"{'test acc %':>10} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, (x, x_test) in feature_sets(images, test_images, _SEED.value).items():
        rows = {"zoo probe": zoo_probe(x, labels, x_test, test_labels, _SEED.value)}
        rows["scikit-learn"] = scikit_learn(x, labels, x_test, test_labels)
        for method, r in rows.items():
            print(f"| {name:<17} | {method:<12} | {r['wall']:>6.1f} | {r['cpu']:>6.1f} | "
                  f"{r['iterations']:<30} | {r['C']:>6g} | {str(r['converged']).lower():<9} | "
                  f"{100 * r['test']:>10.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
