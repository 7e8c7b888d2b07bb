r"""Linear or MLP probes on the frozen features of a pretrained network.

Protocol (NAT Sec. 4 and Table 3; `evaluation.probe` has the details):
- the network is loaded from a training --model_dir (its latest checkpoint), from a
  --saved_model, or left at random initialisation (--init=random, the baseline);
- each --endpoints map is pooled (adaptive average or max) to at most --max_dims features
  (or --pool_size cells a side) and frozen;
- for each of --splits repetitions, --labels_per_class labelled train examples per class are
  drawn (0: all), a validation set is carved from them, the classifier's hyperparameter is
  chosen on it (linear: the L2 strength; --head=mlp: fc 4096-4096-classes with BN and dropout,
  the epoch), and the test split is read only at the end, once;
- the result is the mean ± std test accuracy over the repetitions.

Writes to --output_dir: config.json (the flags), probe.json (every figure) and probe.md (the
table), and prints the table.

Example (the embedded digits, random init, with raw pixels as a reference row):

  python -m evaluation.linear_probe --model=nin_mnist --init=random --dataset=digits \
      --endpoints=block1,block2,sc,pixels --labels_per_class=10 --splits=5 \
      --output_dir=/tmp/probe
"""

from __future__ import annotations

import os

# Before TensorFlow loads: its C++ start-up chatter would bury the one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import time
from dataclasses import asdict, dataclass

from absl import app, flags

from evaluation import cli as shared_cli
from evaluation import datasets, probe, report

PROGRAM = "linear_probe"
INITS = ("checkpoint", "random")

def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the binary's flags in `fv` (the global FLAGS when run as a program)."""
    flags.DEFINE_string("model_dir", None, "Training model_dir (config.json and checkpoints).",
                        flag_values=fv)
    flags.DEFINE_string("saved_model", None, "A SavedModel directory to probe instead.",
                        flag_values=fv)
    flags.DEFINE_string("model", None, "Model name, for --init=random without --model_dir.",
                        flag_values=fv)
    flags.DEFINE_string("model_kwargs", "{}", "JSON kwargs of build_model (with --model).",
                        flag_values=fv)
    flags.DEFINE_enum("init", "checkpoint", INITS, "Pretrained weights, or a random-init baseline.",
                      flag_values=fv)
    flags.DEFINE_list("endpoints", None, "Endpoints to probe (default: the model's transfer "
                      "endpoint); 'pixels' is the input itself.", flag_values=fv)
    flags.DEFINE_enum("head", "linear", probe.HEADS, "Classifier on the frozen features.",
                      flag_values=fv)
    flags.DEFINE_enum("dataset", "digits", datasets.DATASETS, "Labelled dataset.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "tfds data_dir.", flag_values=fv)
    flags.DEFINE_string("manual_dir", None, "tfds manual_dir (ImageNet tars, stl10_binary).",
                        flag_values=fv)
    flags.DEFINE_string("stl10_dir", None, "STL-10 stl10_binary folder (for the folds).",
                        flag_values=fv)
    flags.DEFINE_bool("stl10_folds", False, "STL-10: repetition s trains on predefined fold s.",
                      flag_values=fv)
    flags.DEFINE_integer("labels_per_class", 10, "Labelled train examples per class (0: all).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("splits", 5, "Repetitions (draws of the labelled examples).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the draws and of the classifiers.", flag_values=fv)
    flags.DEFINE_enum("pool", "avg", probe.POOLS, "Pooling of feature maps.", flag_values=fv)
    flags.DEFINE_integer("pool_size", 0, "Pool maps to this many cells a side (0: by --max_dims).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("max_dims", probe.MAX_DIMS, "Largest pooled feature size.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.2, "Fraction of each class's labels kept for validation.",
                       lower_bound=0.0, upper_bound=0.9, flag_values=fv)
    flags.DEFINE_integer("mlp_width", 4096, "Width of the MLP's hidden layers.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("mlp_epochs", 30, "Epochs of the MLP head.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("mlp_learning_rate", 0.01, "SGD learning rate of the MLP head.",
                       flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Batch size of feature extraction.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("max_test_examples", 0, "Score on the first n test examples (0: all).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where config.json, probe.json and probe.md go.",
                        flag_values=fv)
    flags.mark_flag_as_required("output_dir", flag_values=fv)


@dataclass(frozen=True)
class ProbeConfig:
    model_dir: str | None
    saved_model: str | None
    model: str | None
    model_kwargs: dict
    init: str
    endpoints: tuple[str, ...] | None
    head: str
    dataset: str
    data_dir: str | None
    manual_dir: str | None
    stl10_dir: str | None
    stl10_folds: bool
    labels_per_class: int
    splits: int
    seed: int
    pool: str
    pool_size: int
    max_dims: int
    val_fraction: float
    mlp_width: int
    mlp_epochs: int
    mlp_learning_rate: float
    batch_size: int
    max_test_examples: int
    output_dir: str

    @classmethod
    def from_flags(cls, values) -> ProbeConfig:
        try:
            kwargs = json.loads(values.model_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"--model_kwargs is not JSON: {error}") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--model_kwargs must be a JSON object")
        return cls(
            model_dir=values.model_dir, saved_model=values.saved_model, model=values.model,
            model_kwargs=kwargs, init=values.init,
            endpoints=tuple(values.endpoints) if values.endpoints else None,
            head=values.head, dataset=values.dataset, data_dir=values.data_dir,
            manual_dir=values.manual_dir, stl10_dir=values.stl10_dir,
            stl10_folds=values.stl10_folds, labels_per_class=values.labels_per_class,
            splits=values.splits, seed=values.seed, pool=values.pool,
            pool_size=values.pool_size, max_dims=values.max_dims,
            val_fraction=values.val_fraction, mlp_width=values.mlp_width,
            mlp_epochs=values.mlp_epochs, mlp_learning_rate=values.mlp_learning_rate,
            batch_size=values.batch_size, max_test_examples=values.max_test_examples,
            output_dir=values.output_dir)


class UsageError(Exception):
    """Bad input, reported as one line naming the flag."""


def load_model(cfg: ProbeConfig):
    """(model, model name, a description of the weights) from the config."""
    from models import MODELS, build_model

    sources = [flag for flag in ("model_dir", "saved_model") if getattr(cfg, flag)]
    if len(sources) > 1:
        raise UsageError("--model_dir and --saved_model are exclusive; give one")
    if cfg.saved_model:
        if cfg.init == "random":
            raise UsageError("--init=random needs --model_dir or --model, not --saved_model")
        try:
            return probe.SavedModelFeatures(cfg.saved_model), None, cfg.saved_model
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--saved_model={cfg.saved_model}: {error}") from None
    if cfg.model_dir:
        try:
            if cfg.init == "random":
                config = probe.read_model_config(cfg.model_dir)
                return (build_model(config["model"], **config["model_kwargs"]), config["model"],
                        "random init")
            model, loaded, config = probe.load_model_dir(cfg.model_dir)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--model_dir={cfg.model_dir}: {error}") from None
        return model, config["model"], f"{loaded.checkpoint} ({len(loaded.loaded)} tensors)"
    if cfg.init == "checkpoint":
        raise UsageError("--init=checkpoint needs --model_dir or --saved_model "
                         "(or use --init=random with --model)")
    if cfg.model not in MODELS:
        raise UsageError(f"--model={cfg.model}: choose one of {', '.join(sorted(MODELS))}")
    try:
        return build_model(cfg.model, **cfg.model_kwargs), cfg.model, "random init"
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model_kwargs: {error}") from None


def run(cfg: ProbeConfig) -> tuple[probe.ProbeResult, str]:
    """Run the probe of `cfg`; write config.json, probe.json and probe.md; return the result
    and the console table."""
    from models import TRANSFER_ENDPOINT

    model, name, weights = load_model(cfg)
    report.write_json(os.path.join(cfg.output_dir, "config.json"), asdict(cfg))
    endpoints = cfg.endpoints
    if endpoints is None:
        if name not in TRANSFER_ENDPOINT:
            raise UsageError("--endpoints is required for this model")
        endpoints = (TRANSFER_ENDPOINT[name],)
    try:
        probe.check_endpoints(model, endpoints)
    except ValueError as error:
        raise UsageError(f"--endpoints: {error}") from None
    source = datasets.Source(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)
    tic = time.time()
    try:
        result = probe.run_probe(
            model, endpoints, source, cfg.labels_per_class, cfg.splits, head=cfg.head,
            pool=cfg.pool, pool_size=cfg.pool_size or None, max_dims=cfg.max_dims,
            val_fraction=cfg.val_fraction, seed=cfg.seed, stl10_folds=cfg.stl10_folds,
            max_test_examples=cfg.max_test_examples or None, batch_size=cfg.batch_size,
            mlp=probe.MLPHead(width=cfg.mlp_width, epochs=cfg.mlp_epochs,
                              learning_rate=cfg.mlp_learning_rate))
    except datasets.LabelsPerClassError as error:
        raise UsageError(f"--labels_per_class={cfg.labels_per_class}: {error}") from None
    seconds = time.time() - tic

    labels = cfg.labels_per_class or "all"
    headers = ["endpoint", "pooled", "dims", "head", "labels/class", "splits", "val acc %",
               "test acc %"]
    rows = []
    for e in result.endpoints:
        val = [s.val_accuracy for s in e.splits if s.val_accuracy is not None]
        rows.append([e.endpoint, "x".join(map(str, e.shape)), str(e.dims), cfg.head,
                     str(labels), str(cfg.splits),
                     report.percent(*report.mean_std(val)) if val else "-",
                     report.percent(e.mean, e.std)])
    title = (f"{cfg.head} probe of {name or model.name} ({weights}) on {cfg.dataset}: "
             f"{result.train_examples} train images drawn, {result.test_examples} test images")
    payload = {"config": asdict(cfg), "model": name or model.name, "weights": weights,
               "seconds": seconds, **result.to_json()}
    table = report.write_report(cfg.output_dir, "probe", payload, headers, rows, title)
    return result, f"{title}\n{table}"


def cli(argv: list[str]) -> None:
    """Parse `argv` (argv[0] is the program) into fresh flags and run, as the program does."""
    shared_cli.parse_and_run(PROGRAM, define_flags, main, argv)


def main(argv, fv: flags.FlagValues = flags.FLAGS):
    shared_cli.run_and_print(PROGRAM, argv, lambda: run(ProbeConfig.from_flags(fv)),
                             (UsageError, ValueError))


if __name__ == "__main__":
    define_flags()
    app.run(main)
