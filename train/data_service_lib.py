"""`run` of `python -m train.data_service`: one tf.data service server, until interrupted."""

from __future__ import annotations

import sys

import tensorflow as tf

from runtime.cli import UsageError
from train.data_service import ServiceConfig


def start(config: ServiceConfig):
    """The DispatchServer or WorkerServer of `config`, started. Raises UsageError naming
    --port when the port cannot be listened on."""
    service = tf.data.experimental.service
    try:
        if config.role == "dispatcher":
            return service.DispatchServer(service.DispatcherConfig(
                port=config.port, worker_addresses=list(config.workers)))
        return service.WorkerServer(service.WorkerConfig(
            dispatcher_address=config.dispatcher, worker_address=config.address,
            port=config.port))
    except tf.errors.OpError as error:
        raise UsageError(f"--port={config.port}: cannot serve on it "
                         f"({' '.join(str(error.message).split())})") from None


def run(config: ServiceConfig) -> None:
    server = start(config)
    if config.role == "dispatcher":
        print(f"tf.data service dispatcher on port {config.port} for the workers "
              f"{', '.join(config.workers)}; train with --data_service=grpc://<this "
              f"host>:{config.port}")
    else:
        print(f"tf.data service worker {config.address} on port {config.port}, "
              f"dispatcher {config.dispatcher}")
    sys.stdout.flush()
    server.join()
