r"""Linear, MLP or nearest-neighbour probes on the frozen features of a pretrained network.

Protocol (NAT Sec. 4 and Table 3; `evaluation.probe` has the details):
- the network is loaded from a training --model_dir (its latest checkpoint), from a
  --saved_model, or left at random initialisation (--init=random, the baseline: seeded by the
  run's own seed with --model_dir, so that it is the run's random twin, else by --seed). A
  random init is probed twice (evaluation/random_init.py): with its BN statistics at init, and
  calibrated on the pretraining images (the run's dataset; without a run, the --dataset's
  train images); both rows are reported and the stronger one per endpoint is named;
- each --endpoints map is pooled (adaptive average or max) to at most --max_dims features
  (or --pool_size cells a side) and frozen;
- for each of --splits repetitions, --labels_per_class labelled train examples per class are
  drawn (0: all), a validation set is carved from them, the classifier's hyperparameter is
  chosen on it (linear: the L2 strength; --head=mlp: fc 4096-4096-classes with BN and dropout,
  the epoch; --head=knn: none, k is --knn_k), and the test split is read only at the end, once;
- the result is the mean ± std test accuracy over the repetitions.

Writes to --output_dir (default: `<model_dir>/probe`, or `runs/probe_<model>_random` for a
bare --model): config.json (the flags), probe.json (every figure) and probe.md (the table),
and prints the table. The folder belongs to one configuration (runtime/ownership.py): a second
process on it stops at once, and a configuration that differs in anything but `RESUMABLE`
(output and data locations, the extraction batch size) is refused unless the folder is new.
The same configuration recomputes and rewrites the outputs, for the weights the run holds then
(probe.json names the checkpoint). Nothing is written before the results are complete.

Example (the embedded digits, random init, with raw pixels as a reference row):

  python -m evaluation.linear_probe --model=nin_mnist --init=random --dataset=digits \
      --endpoints=block1,block2,sc,pixels --labels_per_class=10 --splits=5
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

from data import LABELLED_DATASETS
from models import MODEL_NAMES
from runtime import cli
from runtime.cli import UsageError, option

AT_INIT, CALIBRATED = "random init, BN at init", "random init, BN calibrated"

PROGRAM = "evaluation.linear_probe"
INITS = ("checkpoint", "random")
HEADS = ("linear", "mlp", "knn")
POOLS = ("avg", "max")


@dataclass(frozen=True)
class ProbeConfig:
    """The flags of `python -m evaluation.linear_probe`."""

    model_dir: str = option("", "Training run folder (config.json and checkpoints).")
    saved_model: str = option("", "A SavedModel version folder to probe instead.")
    model: str = option("", "Model name, for --init=random without --model_dir.")
    model_kwargs: str = option("{}", "JSON kwargs of build_model (with --model).")
    init: str = option("checkpoint", "Pretrained weights, or a random-init baseline.",
                       choices=INITS)
    endpoints: tuple[str, ...] | None = option(None, "Endpoints to probe (default: the "
                                               "model's transfer endpoint); 'pixels' is the "
                                               "input itself.")
    head: str = option("linear", "Classifier on the frozen features.", choices=HEADS)
    dataset: str = option("digits", "Labelled dataset.", choices=LABELLED_DATASETS)
    data_dir: str | None = option(None, "tfds data_dir.")
    manual_dir: str | None = option(None, "tfds manual_dir (ImageNet tars, stl10_binary).")
    stl10_dir: str | None = option(None, "STL-10 stl10_binary folder (for the folds).")
    stl10_folds: bool = option(False, "STL-10: repetition s trains on predefined fold s.")
    labels_per_class: int = option(10, "Labelled train examples per class (0: all).", lower=0)
    splits: int = option(5, "Repetitions (draws of the labelled examples).", lower=1)
    seed: int = option(0, "Seed of the draws and of the classifiers (and of --init=random "
                       "without --model_dir).")
    pool: str = option("avg", "Pooling of feature maps.", choices=POOLS)
    pool_size: int = option(0, "Pool maps to this many cells a side (0: by --max_dims).",
                            lower=0)
    max_dims: int = option(9216, "Largest pooled feature size.", lower=1)
    val_fraction: float = option(0.2, "Fraction of each class's labels kept for validation.",
                                 lower=0.0, upper=0.9)
    mlp_width: int = option(4096, "Width of the MLP's hidden layers.", lower=1)
    mlp_epochs: int = option(30, "Epochs of the MLP head.", lower=1)
    mlp_learning_rate: float = option(0.01, "SGD learning rate of the MLP head.", lower=0.0)
    knn_k: int = option(1, "Neighbours of --head=knn.", lower=1)
    batch_size: int = option(256, "Batch size of feature extraction.", lower=1)
    max_test_examples: int = option(0, "Score on the first n test examples (0: all).", lower=0)
    output_dir: str = option("", "Where config.json, probe.json and probe.md go (default: "
                             "<model_dir>/probe).")

    # What may differ between two invocations writing one output folder (module docstring).
    RESUMABLE: ClassVar[tuple[str, ...]] = ("output_dir", "data_dir", "manual_dir", "stl10_dir",
                                            "batch_size")

    def __post_init__(self):
        if self.model_dir and self.saved_model:
            raise UsageError("--model_dir and --saved_model are exclusive; give one")
        if self.saved_model and self.init == "random":
            raise UsageError("--init=random needs --model_dir or --model, not --saved_model")
        if not (self.model_dir or self.saved_model):
            if self.init == "checkpoint":
                raise UsageError("--init=checkpoint needs --model_dir or --saved_model "
                                 "(or use --init=random with --model; see --help)")
            if self.model not in MODEL_NAMES:
                raise UsageError(f"--model={self.model}: choose one of "
                                 f"{', '.join(MODEL_NAMES)}")
        self.overrides()

    def overrides(self) -> dict:
        return cli.json_object("model_kwargs", self.model_kwargs)

    @property
    def out(self) -> str:
        """The output folder (module docstring)."""
        if self.output_dir:
            return self.output_dir
        if self.model_dir:
            return os.path.join(self.model_dir, "probe" if self.init == "checkpoint"
                                else "probe_random")
        if self.saved_model:
            version = os.path.normpath(self.saved_model)
            name = f"{os.path.basename(os.path.dirname(version))}_v{os.path.basename(version)}"
            return os.path.join("runs", f"probe_{name}")
        return os.path.join("runs", f"probe_{self.model}_random")


def load_model(cfg: ProbeConfig):
    """(model, model name, a description of the weights) from the config."""
    from models.runs import load_run_model

    if cfg.saved_model:
        from serving.client import SavedModelClient, ServingError

        try:
            client = SavedModelClient(cfg.saved_model)
        except ServingError as error:
            raise UsageError(f"--saved_model={cfg.saved_model}: {error}") from None
        return client, None, cfg.saved_model
    try:
        loaded = load_run_model(cfg.model_dir, cfg.model, cfg.overrides(), init=cfg.init,
                                seed=cfg.seed)
    except (FileNotFoundError, ValueError) as error:
        flag = "--model_dir" if cfg.model_dir else "--model_kwargs"
        raise UsageError(f"{flag}={cfg.model_dir or cfg.model_kwargs}: {error}") from None
    weights = (f"random init, seed {loaded.seed}" if cfg.init == "random"
               else f"{loaded.checkpoint} ({loaded.loaded} tensors)")
    return loaded.model, loaded.name, weights


def run(cfg: ProbeConfig):
    """Run the probe of `cfg`; write config.json, probe.json and probe.md; print and return
    (result, console table)."""
    from evaluation import report
    from runtime.ownership import claim_run, fingerprint_of, start_run

    with claim_run(cfg.out, fingerprint_of(cfg, cfg.RESUMABLE), "--output_dir") as claim:
        result, seconds, name, weights = _probe(cfg)
        # A random init is probed twice: BN at init (above) and BN calibrated.
        results = {"": result} if cfg.init == "checkpoint" else {
            AT_INIT: result, CALIBRATED: _probe_calibrated(cfg)}
        start_run(claim, asdict(cfg))  # complete results: config.json, then them
    labels = cfg.labels_per_class or "all"
    headers = ["endpoint", "pooled", "dims", "head", "labels/class", "splits", "val acc %",
               "test acc %"]
    rows = []
    for init, each in results.items():
        for e in each.endpoints:
            val = [s.val_accuracy for s in e.splits if s.val_accuracy is not None]
            rows.append([e.endpoint, "x".join(map(str, e.shape)), str(e.dims), cfg.head,
                         str(labels), str(cfg.splits),
                         report.percent(*report.mean_std(val)) if val else "-",
                         report.percent(e.mean, e.std)] + ([init] if init else []))
    title = (f"{cfg.head} probe of {name} ({weights}) on {cfg.dataset}: "
             f"{result.train_examples} train images drawn, {result.test_examples} test images")
    payload = {"config": asdict(cfg), "model": name, "weights": weights,
               "seconds": seconds, **result.to_json()}
    notes = ""
    if len(results) > 1:
        headers.append("init")
        stronger = _stronger_rows(results)
        payload["random_inits"] = {init: each.to_json() for init, each in results.items()}
        payload["stronger"] = stronger
        notes = "".join(f"\n{endpoint}: the stronger random-init row is {init}"
                        for endpoint, init in stronger.items())
    table = report.write_report(cfg.out, "probe", payload, headers, rows, title)
    text = f"{title}\n{table}{notes}"
    print(text)
    print(f"wrote {cfg.out}/probe.md and probe.json")
    return result, text


def _stronger_rows(results: dict) -> dict[str, str]:
    """{endpoint: the init whose mean accuracy is higher} over results {init: ProbeResult}."""
    from evaluation.random_init import stronger

    endpoints = [e.endpoint for e in next(iter(results.values())).endpoints
                 if e.endpoint != "pixels"]  # the input: the same for both
    return {endpoint: stronger({init: next(e.accuracies for e in each.endpoints
                                           if e.endpoint == endpoint)
                                for init, each in results.items()})
            for endpoint in endpoints}


def calibration_images(cfg: ProbeConfig, input_shape):
    """The images a random init's BN statistics are calibrated on: the run's pretraining
    images (its config.json's dataset), or without a run the --dataset's train images."""
    from data import labelled
    from evaluation.random_init import MAX_CALIBRATION_IMAGES, pretraining_images
    from runtime.run_config import read_config

    config = read_config(cfg.model_dir) if cfg.model_dir and os.path.exists(
        os.path.join(cfg.model_dir, "config.json")) else {}
    if "dataset" in config:
        listed = os.path.join(cfg.model_dir, "images.txt")  # a folder run's recorded files
        files = None
        if os.path.exists(listed):
            with open(listed) as f:
                files = f.read().splitlines()
        return pretraining_images(config["dataset"], input_shape, cfg.data_dir,
                                  cfg.manual_dir, files)
    source = labelled.LabelledSource(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)
    return labelled.load(source, "train", input_shape).take(MAX_CALIBRATION_IMAGES)


def _probe_calibrated(cfg: ProbeConfig):
    """The ProbeResult of the same seeded random init with its BN statistics calibrated."""
    from evaluation.features import model_input_shape
    from evaluation.random_init import calibrated

    loaded = load_model(cfg)
    calibrated(loaded[0], calibration_images(cfg, model_input_shape(loaded[0])))
    return _probe(cfg, loaded)[0]


def _probe(cfg: ProbeConfig, loaded=None):
    """(the ProbeResult, seconds, model name, a description of the weights) of the model of
    `cfg` (or of `loaded`, `load_model`'s answer with the weights changed since)."""
    from data import labelled
    from evaluation import probe
    from evaluation.classifiers import KnnHead, MLPHead
    from models import TRANSFER_ENDPOINT

    source = labelled.LabelledSource(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)
    if not cfg.stl10_folds:  # (the folds read the STL-10 binary folder, not tfds)
        labelled.check_available(source)  # both splits, before the model is loaded
    model, name, weights = loaded or load_model(cfg)
    endpoints = cfg.endpoints
    if endpoints is None:
        if name not in TRANSFER_ENDPOINT:
            raise UsageError("--endpoints is required for this model")
        endpoints = (TRANSFER_ENDPOINT[name],)
    try:
        probe.check_endpoints(model, endpoints)
    except ValueError as error:
        raise UsageError(f"--endpoints: {error}") from None
    tic = time.time()
    try:
        result = probe.run_probe(
            model, endpoints, source, cfg.labels_per_class, cfg.splits, seed=cfg.seed,
            stl10_folds=cfg.stl10_folds, max_test_examples=cfg.max_test_examples or None,
            head=cfg.head, pool=cfg.pool, pool_size=cfg.pool_size or None,
            max_dims=cfg.max_dims, val_fraction=cfg.val_fraction, batch_size=cfg.batch_size,
            mlp=MLPHead(width=cfg.mlp_width, epochs=cfg.mlp_epochs,
                        learning_rate=cfg.mlp_learning_rate),
            knn=KnnHead(k=cfg.knn_k))
    except labelled.LabelsPerClassError as error:
        raise UsageError(f"--labels_per_class={cfg.labels_per_class}: {error}") from None
    return result, time.time() - tic, name or model.name, weights


def main(argv=None) -> None:
    cli.main(PROGRAM, ProbeConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
