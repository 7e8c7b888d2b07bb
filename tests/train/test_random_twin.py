"""--init=random is seeded: the same weights on every call, and a run's own random twin."""

import numpy as np

from models.runs import load_run_model
from models.weights import named_variables
from runtime.run_config import write_config
from train.config import TrainConfig
from train.pretrain_lib import random_twin


def _weights(model) -> dict:
    return {k: v.numpy() for k, v in named_variables(model).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_runs_random_init_is_its_twin_on_every_call(tmp_path):
    config = TrainConfig(model_dir=str(tmp_path / "run"), seed=7)
    write_config(config.model_dir, config.to_json())
    first = load_run_model(config.model_dir, init="random")
    second = load_run_model(config.model_dir, init="random", seed=123)  # the run's seed wins
    assert first.seed == second.seed == 7
    twin = _weights(random_twin(config))
    assert _same(_weights(first.model), _weights(second.model))
    assert _same(_weights(first.model), twin)
    other = TrainConfig(model_dir=str(tmp_path / "other"), seed=8)
    assert not _same(_weights(random_twin(other)), twin)


def test_without_a_run_the_seed_decides():
    a = _weights(load_run_model("", "nin_mnist", init="random", seed=3).model)
    b = _weights(load_run_model("", "nin_mnist", init="random", seed=3).model)
    c = _weights(load_run_model("", "nin_mnist", init="random", seed=4).model)
    assert _same(a, b) and not _same(a, c)


def test_the_export_of_a_random_init_is_seeded(tmp_path, monkeypatch):
    from serving import export, export_lib

    exported = []
    monkeypatch.setattr(export_lib, "export_features", lambda model, base, name, endpoints,
                        metadata, log: exported.append((_weights(model), metadata)) or base)
    config = TrainConfig(model_dir=str(tmp_path / "run"), seed=5)
    write_config(config.model_dir, config.to_json())
    for seed in (0, 0, 1):
        export_lib.run(export.ExportConfig(init="random", model="nin_mnist", seed=seed,
                                       export_base=str(tmp_path / "export")))
    export_lib.run(export.ExportConfig(init="random", pretrained=config.model_dir, seed=1))
    (a, meta), (b, _), (c, _), (twin, twin_meta) = exported
    assert _same(a, b) and not _same(a, c) and meta["init_seed"] == 0
    assert _same(twin, _weights(random_twin(config))) and twin_meta["init_seed"] == 5
