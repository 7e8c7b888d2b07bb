"""--data_service: the pretraining stream through a tf.data service (an in-process dispatcher
and two workers on 127.0.0.1) is the local stream, bit for bit, also after a resume and for
one input pipeline of several; a bad --data_service value is one line."""

import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data.augment import Augment
from data.pretrain import PretrainSource, open_source, pretrain_dataset
from data.service import pretrain_stream, service_dataset
from runtime.cli import UsageError
from tests.helpers import ROOT, free_ports, jpeg_bytes, run_module, test_env
from train.config import TrainConfig
from train.data_service import ServiceConfig

SERVICE = tf.data.experimental.service


@pytest.fixture(scope="module")
def dispatcher():
    """grpc://... of a dispatcher with two workers, all in this process."""
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    server = SERVICE.DispatchServer(SERVICE.DispatcherConfig(worker_addresses=addresses))
    host = server.target[len("grpc://"):]
    workers = [SERVICE.WorkerServer(SERVICE.WorkerConfig(dispatcher_address=host,
                                                         worker_address=a, port=p,
                                                         heartbeat_interval_ms=100))
               for a, p in zip(addresses, ports, strict=True)]
    yield server.target
    for worker in workers:
        worker.stop()
    server.stop()


def _toy_source(n: int = 23, size: int = 6) -> PretrainSource:
    """Random images: a batch in the wrong place or a wrong augmentation shows."""
    images = np.random.default_rng(0).random((n, size, size, 1), dtype=np.float32)

    def elements():
        return tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), images))

    return PretrainSource("toy", n, (size, size, 1), elements, lambda x: x, fixed_size=True)


def _all(ds):
    return [(i.numpy(), x.numpy()) for i, x in ds]


def _assert_same(local, remote):
    assert len(remote) == len(local) > 0
    for (i, x), (j, y) in zip(local, remote, strict=True):
        np.testing.assert_array_equal(i, j)
        assert x.tobytes() == y.tobytes()  # bitwise


def test_the_service_stream_is_the_local_stream(dispatcher):
    # 23 images, batch 4: 5 steps an epoch, 15 in all, an odd number for two workers
    source, augment = _toy_source(), Augment(crop="pad", pad=2, flip=True)
    local = _all(pretrain_dataset(source, 4, augment, seed=3, epochs=3))
    _assert_same(local, _all(service_dataset(dispatcher, source, 4, augment, 3, 3)))


def test_a_resumed_stream_is_the_tail_of_the_uninterrupted_one(dispatcher):
    source, augment = _toy_source(), Augment(crop="pad", flip=True)
    local = _all(pretrain_dataset(source, 4, augment, seed=1, epochs=3))
    for start in (6, 7):  # from the middle of epoch 1, at an odd and an even step
        _assert_same(local[start:],
                     _all(service_dataset(dispatcher, source, 4, augment, 1, 3, start)))


def test_each_input_pipeline_gets_its_own_shard(dispatcher):
    source, augment = _toy_source(), Augment(crop="pad", flip=True)
    for pipeline in (0, 1):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline,
                                             num_replicas_in_sync=2)
        local = _all(pretrain_dataset(source, 4, augment, 2, 2, 1, context))
        _assert_same(local, _all(service_dataset(dispatcher, source, 4, augment, 2, 2, 1,
                                                 context)))


def test_a_folder_of_jpegs_with_resized_crops_is_the_same(dispatcher, tmp_path):
    # the local folder stream decodes through a Python loader; the workers, in the graph
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(20 + i, 24, seed=i))
    source = open_source(f"folder:{tmp_path}", (8, 8, 3))
    augment = Augment(crop="resize", flip=True)
    local = _all(pretrain_dataset(source, 2, augment, seed=0, epochs=2))
    assert len(local) == 6
    _assert_same(local, _all(pretrain_stream(dispatcher, source, 2, augment, 0, 2)))


def test_without_a_service_the_stream_is_the_local_one():
    source, augment = _toy_source(), Augment(crop="pad")
    _assert_same(_all(pretrain_dataset(source, 4, augment, 0, 1)),
                 _all(pretrain_stream("", source, 4, augment, 0, 1)))


@pytest.mark.parametrize("value", ["localhost:5050", "grpc://localhost", "grpc://:5050",
                                   "grpc://host:0", "grpc://host:99999", "http://host:5050"])
def test_a_bad_data_service_is_a_usage_error(value):
    with pytest.raises(UsageError, match=r"^--data_service=.*expected grpc://HOST:PORT"):
        TrainConfig(data_service=value)


def test_the_flag_is_resumable_not_part_of_the_fingerprint():
    with_service = TrainConfig(data_service="grpc://localhost:5050")
    assert with_service.fingerprint(100, None, 1, 1) == TrainConfig().fingerprint(100, None, 1, 1)


def test_a_bad_value_on_the_command_line_is_one_line():
    done = subprocess.run([sys.executable, "-m", "train.pretrain", "--data_service=d:5050"],
                          cwd=ROOT, env=test_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "train.pretrain: error: --data_service=d:5050: expected grpc://HOST:PORT of a tf.data "
        "service dispatcher (python -m train.data_service), e.g. grpc://localhost:5050"]


@pytest.mark.parametrize("flags, message", [
    (dict(role="both"), "give one role: dispatcher | worker"),
    (dict(role="dispatcher"), "dispatcher needs --workers"),
    (dict(role="dispatcher", workers=("w1",)), "--workers=w1: expected HOST:PORT"),
    (dict(role="worker"), "--dispatcher is required"),
    (dict(role="worker", dispatcher="d:1", worker_address="w:0"),
     "--worker_address=w:0: expected HOST:PORT"),
    (dict(role="worker", dispatcher="d:1", workers=("w:1",)), "--workers is the dispatcher's")])
def test_bad_service_flags_are_usage_errors(flags, message):
    with pytest.raises(UsageError, match=f"^{message}"):
        ServiceConfig(**flags)


def _serve(*args: str) -> subprocess.Popen:
    """`python -m train.data_service args...`, once it says it serves; started as a script's
    background job is, with SIGINT ignored, which the server must override to stop on Ctrl-C."""
    server = subprocess.Popen([sys.executable, "-m", "train.data_service", *args], cwd=ROOT,
                              env=test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "Ctrl-C stops it" in server.stdout.readline()
    return server


@pytest.mark.slow
def test_a_run_through_the_service_binaries_is_the_local_run(tmp_path):
    d, w1, w2 = free_ports(3)
    servers = [_serve("dispatcher", f"--port={d}", f"--workers=localhost:{w1},localhost:{w2}")]
    servers += [_serve("worker", f"--port={w}", f"--dispatcher=localhost:{d}") for w in (w1, w2)]
    try:
        taken = run_module("train.data_service", "worker", f"--port={w1}",
                           f"--dispatcher=localhost:{d}", timeout=120)
        assert taken.returncode == 1
        assert taken.stderr == f"train.data_service: error: --port={w1}: already in use; " \
            "choose another\n"
        quick = ["--epochs=1", "--batch_size=256", "--nat_dim=16", "--steps_per_loop=2",
                 "--export_dir=none", "--final_eval=none", "--probe_every_epochs=0"]
        for name, extra in (("local", []), ("service", [f"--data_service=grpc://localhost:{d}"])):
            done = run_module("train.pretrain", f"--model_dir={tmp_path / name}", *quick,
                              *extra)
            assert done.returncode == 0, done.stderr
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
        outputs = [server.communicate(timeout=120) for server in servers]
    assert [server.returncode for server in servers] == [0, 0, 0]
    assert all(out.endswith("stopped\n") and err == "" for out, err in outputs)
    local, remote = (tf.train.load_checkpoint(str(tmp_path / name / "ckpt-4"))
                     for name in ("local", "service"))
    names = sorted(local.get_variable_to_shape_map())
    assert names == sorted(remote.get_variable_to_shape_map())
    for name in names:  # every weight, slot and counter, bitwise
        a, b = (np.asarray(c.get_tensor(name)) for c in (local, remote))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
