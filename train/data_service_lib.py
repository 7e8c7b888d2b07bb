"""`run` of `python -m train.data_service`: one tf.data service server, until interrupted."""

from __future__ import annotations

import errno
import signal
import socket
import sys
import time

import tensorflow as tf

from runtime.cli import UsageError
from train.data_service import ServiceConfig

_SERVING: list = []


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_free(port: int) -> None:
    """UsageError naming --port when another process listens on it (gRPC would share it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UsageError(f"--port={port}: already in use; choose another") from None
            raise


def start(config: ServiceConfig):
    """The DispatchServer or WorkerServer of `config`, started. Raises UsageError naming
    --port when the port cannot be listened on."""
    _check_free(config.port)
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
    # Explicit handlers: a process started in the background of a script inherits an ignored
    # SIGINT, and a server must stop on Ctrl-C and on `kill` alike.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _interrupt)
    _SERVING.append(start(config))  # a server serves while it is referenced
    if config.role == "dispatcher":
        print(f"tf.data service dispatcher on port {config.port} for the workers "
              f"{', '.join(config.workers)}; train with --data_service=grpc://<this "
              f"host>:{config.port}; Ctrl-C stops it")
    else:
        print(f"tf.data service worker {config.address} on port {config.port}, dispatcher "
              f"{config.dispatcher}; Ctrl-C stops it")
    sys.stdout.flush()
    try:
        while True:  # the server runs in its own threads; a Python wait lets Ctrl-C through
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    _SERVING.clear()
