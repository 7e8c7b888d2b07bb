"""--data_service: the pretraining stream through a tf.data service (an in-process dispatcher
and two workers on 127.0.0.1) is the local stream, bit for bit, also after a resume and for
one input pipeline of several; a bad --data_service value is one line."""

import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data.augment import Augment
from data.pretrain import PretrainSource, open_source, pretrain_dataset
from data.service import pretrain_stream, service_dataset
from runtime.cli import UsageError
from tests.helpers import ROOT, jpeg_bytes, test_env
from train.config import TrainConfig

SERVICE = tf.data.experimental.service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dispatcher():
    """grpc://... of a dispatcher with two workers, all in this process."""
    ports = [_free_port(), _free_port()]
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
