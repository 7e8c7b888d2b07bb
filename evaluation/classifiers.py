"""Classifiers trained on frozen features, each choosing its hyperparameter on validation.

- linear (`fit_linear`): multinomial logistic regression on standardised features (mean and
  std of the fitting examples), L2 strength 1/C with C chosen from `LinearHead.cs` by
  validation accuracy (ties go to the smaller C), then refitted on fit + validation. The
  solver (`evaluation.logistic`: preconditioned L-BFGS, float64 loss) runs to a checked
  tolerance; the path of C is warm-started (largest regularisation first) and stops once
  the validation accuracy has fallen below the best so far at `LinearHead.patience`
  successive C (weaker regularisation only costs more iterations); the refit is warm-started
  from the chosen C's fit, in that fit's eigenbasis.
- mlp (`fit_mlp`): the classifier of NAT Table 3 (Krizhevsky et al. 2012): fc 4096 - BN - ReLU
  - dropout 0.5 - fc 4096 - BN - ReLU - dropout 0.5 - fc classes, trained by SGD with momentum
  on standardised features; the epoch with the best validation accuracy is kept.
- knn (`fit_knn`): k nearest neighbours by cosine similarity (NAT Figure 3's view of the
  features), one vote each or weighted by exp(similarity / T) (Wu et al. 2018: k=200,
  T=0.07), over every labelled example in chunks of queries; no hyperparameter is chosen.

Every fit returns a `Fitted`: predict(features [N, D]) -> int64 labels [N].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from threadpoolctl import threadpool_limits

from evaluation import logistic
from models.layers import batch_norm
from runtime.errors import InvalidInput

HEADS = ("linear", "mlp", "knn")
KNN_CHUNK = 256  # queries compared with every labelled example at once


@dataclass(frozen=True)
class LinearHead:
    """Multinomial logistic regression (`evaluation.logistic`); C = inverse L2 strength, chosen
    on validation along `cs` (ascending), which stops after `patience` successive C below the
    best; `default_c` when there is no validation example; each fit runs `max_iter` L-BFGS
    iterations at most, to the relative gradient `tolerance`."""

    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
    default_c: float = 1.0
    max_iter: int = logistic.MAX_ITER
    tolerance: float = logistic.PROBE_TOLERANCE
    patience: int = 2


@dataclass(frozen=True)
class MLPHead:
    """fc width - BN - ReLU - dropout - fc width - BN - ReLU - dropout - fc classes."""

    width: int = 4096
    dropout: float = 0.5
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class KnnHead:
    """Vote of the k most cosine-similar labelled examples (ties: the class of the nearest):
    one vote each, or with a `temperature` T the weight exp(similarity / T) each (Wu et al.
    2018's monitor: k=200, T=0.07)."""

    k: int = 1
    temperature: float | None = None


@dataclass(frozen=True)
class Fitted:
    """A trained classifier: predict(features [N, D]) -> int64 labels [N]."""

    predict: Callable[[np.ndarray], np.ndarray]
    hyper: dict
    val_accuracy: float | None


def standardizer(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """z -> (z - mean) / std with the statistics of x; constant features stay at zero."""
    mean, std = _moments(x)
    return lambda z: ((z - mean) / std).astype(np.float32)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def logistic_regression(x: np.ndarray, y: np.ndarray, c: float, num_classes: int,
                        max_iter: int = logistic.MAX_ITER,
                        init: tuple[np.ndarray, np.ndarray] | None = None,
                        problem: logistic.Problem | None = None,
                        tolerance: float = logistic.TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: W [D, num_classes], b [num_classes] minimising

        sum_i (logsumexp(x_i W + b) - (x_i W + b)[y_i]) + ||W||^2 / (2 C)

    (b not penalised) over the classes present in y, solved by `evaluation.logistic` (its
    docstring: the eigenbasis, which for N < D is X's row space, the preconditioning, the
    arithmetic (products in x's dtype) and the checked convergence criterion) to `tolerance`,
    from `init` = (W, b) when given. Classes absent from y get a column of zeros and a bias
    of -inf (never predicted). `logistic_fit` also returns the solver's report.
    """
    w, b, _ = logistic_fit(x, y, c, num_classes, max_iter, init, problem, tolerance)
    return w, b


def logistic_fit(x, y, c: float, num_classes: int, max_iter: int = logistic.MAX_ITER,
                 init=None, problem: logistic.Problem | None = None,
                 tolerance: float = logistic.TOLERANCE):
    """(W, b, the solver's Solution) of `logistic_regression`; `problem` is the prepared
    logistic.Problem of (x, y) when it exists (reused along a path of C)."""
    y = np.asarray(y)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"logistic regression needs two classes or more; got {present}")
    d = np.shape(x)[1]
    with _one_thread():
        if problem is None:
            problem = logistic.Problem(x, np.searchsorted(present, y), len(present))
        start = None if init is None else (init[0][:, present], init[1][present])
        solution = problem.solve(c, start, tolerance, max_iter)
    w = np.zeros((d, num_classes))
    b = np.full(num_classes, -np.inf)
    w[:, present] = solution.w
    b[present] = solution.b
    return w, b, solution


def _one_thread():
    # Measured on 2 shared cores (48000 x 784 features): one BLAS thread spends about half
    # the CPU time of two on the solver's thin products, and eigh with two threads ran 5x
    # slower; TensorFlow's threads contend as well.
    return threadpool_limits(limits=1)


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-6, std, 1.0)


def _linear_path(x, y, cs, cfg: LinearHead, num_classes: int, init=None):
    """Fits along cs (ascending C: largest regularisation first) on x standardised (float32),
    each warm-started from the previous one, the first from `init` = (a fit's state on
    another standardisation, its logistic.Problem): the same predictor, and that problem's
    eigenbasis as preconditioner. Yields (predict, state = (W, b, mean, std), the Solution,
    the Problem) per C."""
    mean, std = _moments(x)
    standardize = standardizer(x)
    z = standardize(x)
    present = np.unique(y)
    start, basis = None, None
    if init is not None:
        (w0, b0, mean0, std0), previous = init
        start = (w0 * (std / std0)[:, None],
                 np.where(np.isfinite(b0), b0, 0.0) + ((mean - mean0) / std0) @ w0)
        basis = previous.spectrum
    with _one_thread():
        problem = logistic.Problem(z, np.searchsorted(present, y), len(present), basis)
    for c in cs:
        w, b, solution = logistic_fit(z, y, c, num_classes, cfg.max_iter, start, problem,
                                      cfg.tolerance)
        start = (w, np.where(np.isfinite(b), b, 0.0))
        yield (lambda q, w=w, b=b: np.argmax(standardize(q) @ w + b, axis=1).astype(np.int64),
               (w, b, mean, std), solution, problem)


def _fit_linear(x, y, c: float, cfg: LinearHead, num_classes: int):
    return next(_linear_path(x, y, [c], cfg, num_classes))[0]


def _choose_c(x_fit, y_fit, x_val, y_val, num_classes: int, cfg: LinearHead):
    """Walks the path of C (ascending) until the validation accuracy has been below the best
    so far at cfg.patience successive C. Returns (index of the best C, first on ties; the
    fits: (C, validation accuracy, state, Solution, Problem) per C tried)."""
    cs = sorted(cfg.cs)
    fits, best, below = [], 0, 0
    for c, (predict, state, solution, problem) in zip(
            cs, _linear_path(x_fit, y_fit, cs, cfg, num_classes), strict=False):
        fits.append((c, accuracy(predict(x_val), y_val), state, solution, problem))
        score, top = fits[-1][1], fits[best][1]
        if score > top:
            best, below = len(fits) - 1, 0
        else:
            below = below + 1 if score < top else 0
        if below >= cfg.patience:
            break
    return best, fits


def fit_linear(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               num_classes: int, cfg: LinearHead = LinearHead()) -> Fitted:
    """Choose C on validation along the warm-started path of `cfg.cs` (ascending, stopped
    early: `_choose_c`), then refit on fit + validation with that C, warm-started from its
    fit. `hyper` holds C, the solver's report of the final fit (iterations, gradient ratio,
    tolerance, converged) and the path: the C tried, their validation accuracies, iterations
    and converged flags."""
    if len(y_val) == 0:
        predict, _, solution, _ = next(_linear_path(x_fit, y_fit, [cfg.default_c], cfg,
                                                    num_classes))
        return Fitted(predict, {"C": cfg.default_c, **solution.report()}, None)
    best, fits = _choose_c(x_fit, y_fit, x_val, y_val, num_classes, cfg)
    c, score, state, _, problem = fits[best]
    predict, _, solution, _ = next(_linear_path(
        np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val]), [c], cfg,
        num_classes, init=(state, problem)))
    return Fitted(predict, {"C": c, **solution.report(),
                            "path_C": [f[0] for f in fits],
                            "path_val_accuracy": [f[1] for f in fits],
                            "path_iterations": [f[3].iterations for f in fits],
                            "path_converged": [bool(f[3].converged) for f in fits]}, score)


def _nearest(z: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [N, k], cosine similarities [N, k]) of the k most similar rows of `bank`
    (unit rows, float32) to the unit rows z, most similar first, equal similarities in bank
    order (but which of several equal ones enters at the k-th place is not fixed)."""
    sims = z @ bank.T  # [N, M]
    if k == 1:
        top = np.argmax(sims, axis=1)[:, None]
    else:
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_sims), axis=1)  # by similarity, then bank position
        top = np.take_along_axis(top, order, axis=1)
    return top, np.take_along_axis(sims, top, axis=1)


def fit_knn(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            num_classes: int, cfg: KnnHead = KnnHead()) -> Fitted:
    """k-NN by cosine similarity on fit + validation (nothing to select), against every
    labelled example, KNN_CHUNK queries at a time (memory: KNN_CHUNK x examples similarities).
    """
    x = np.concatenate([x_fit, x_val]).astype(np.float64)
    y = np.concatenate([y_fit, y_val]).astype(np.int64)
    if not 1 <= cfg.k <= len(y):
        raise InvalidInput(f"k={cfg.k} needs 1 <= k <= {len(y)} labelled examples")
    bank = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def vote(z: np.ndarray) -> np.ndarray:
        top, sims = _nearest(z, bank, cfg.k)
        weights = (np.ones_like(sims, np.float64) if cfg.temperature is None
                   else np.exp(sims.astype(np.float64) / cfg.temperature))
        rows = np.repeat(np.arange(len(z)), cfg.k)
        votes = np.zeros((len(z), num_classes))
        np.add.at(votes, (rows, y[top].ravel()), weights.ravel())
        first = np.full((len(z), num_classes), cfg.k)  # rank of each class's nearest vote
        for rank in range(cfg.k - 1, -1, -1):
            first[np.arange(len(z)), y[top[:, rank]]] = rank
        # most votes; among tied classes, the one with the nearest neighbour
        tied = votes == votes.max(axis=1, keepdims=True)
        return np.argmin(np.where(tied, first, cfg.k + 1), axis=1).astype(np.int64)

    def predict(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float64)
        z = (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        parts = [vote(z[i:i + KNN_CHUNK]) for i in range(0, len(z), KNN_CHUNK)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    return Fitted(predict, {"k": cfg.k} if cfg.temperature is None
                  else {"k": cfg.k, "temperature": cfg.temperature}, None)


def mlp_classifier(input_dim: int, num_classes: int, cfg: MLPHead, seed: int) -> keras.Model:
    """The MLP head as a keras.Model: features [N, input_dim] -> logits [N, num_classes]."""
    def dense(units, name, i):
        return keras.layers.Dense(units, kernel_initializer=keras.initializers.HeNormal(seed + i),
                                  name=name)

    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    for i, name in enumerate(("fc1", "fc2")):
        x = dense(cfg.width, name, i)(x)
        x = batch_norm(f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        x = keras.layers.Dropout(cfg.dropout, seed=seed + 10 + i, name=f"{name}_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32",
                                kernel_initializer=keras.initializers.GlorotUniform(seed + 2))(x)
    return keras.Model(inputs, logits, name="mlp_probe")


def fit_mlp(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            num_classes: int, cfg: MLPHead = MLPHead(), seed: int = 0) -> Fitted:
    """Train the MLP head; keep the weights of the epoch with the best validation accuracy
    (the last epoch when there is no validation example)."""
    standardize = standardizer(x_fit)
    xf, xv = standardize(x_fit), standardize(x_val)
    net = mlp_classifier(xf.shape[1], num_classes, cfg, seed)
    optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
    optimizer.build(net.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, net(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, net.trainable_variables),
                                      net.trainable_variables, strict=True))

    @tf.function(reduce_retracing=True)
    def infer(x):
        return tf.argmax(net(x, training=False), axis=-1)

    def predict(z):
        return np.concatenate([infer(z[i:i + 1024]).numpy()
                               for i in range(0, len(z), 1024)]).astype(np.int64)

    rng = np.random.default_rng(seed)
    best_acc, best_epoch, best_weights = -1.0, cfg.epochs, None
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(xf))
        for i in range(0, len(order), cfg.batch_size):
            batch = order[i:i + cfg.batch_size]
            if len(batch) < 2 and len(order) > 1:
                continue  # BN needs two examples
            step(xf[batch], y_fit[batch])
        if len(y_val):
            acc = accuracy(predict(xv), y_val)
            if acc > best_acc:
                best_acc, best_epoch, best_weights = acc, epoch, net.get_weights()
    if best_weights is not None:
        net.set_weights(best_weights)
    return Fitted(lambda z: predict(standardize(z)), {"epochs": best_epoch},
                  best_acc if len(y_val) else None)


def fit_classifier(head: str, x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, num_classes: int, *, linear: LinearHead = LinearHead(),
                   mlp: MLPHead = MLPHead(), knn: KnnHead = KnnHead(), seed: int = 0) -> Fitted:
    """Train the `head` classifier (one of HEADS) on fit, selecting on validation."""
    if head == "linear":
        return fit_linear(x_fit, y_fit, x_val, y_val, num_classes, linear)
    if head == "mlp":
        return fit_mlp(x_fit, y_fit, x_val, y_val, num_classes, mlp, seed)
    if head == "knn":
        return fit_knn(x_fit, y_fit, x_val, y_val, num_classes, knn)
    raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
