r"""A tf.data service for the pretraining input: a dispatcher and its workers, each on its own
machine, that decode and augment the images of `python -m train.pretrain --data_service=...`.

    python -m train.data_service dispatcher --port=5050 --workers=w1:5051,w2:5051
    python -m train.data_service worker --port=5051 --dispatcher=d:5050 --worker_address=w1:5051
    python -m train.data_service worker --port=5051 --dispatcher=d:5050 --worker_address=w2:5051
    python -m train.pretrain ... --data_service=grpc://d:5050

The dispatcher lists its workers (`--workers`) because the stream is sharded statically: of
W workers, worker w decodes the batches k = w mod W of each input pipeline, and the trainer
puts them back in step order, so the batches are those of a run without the service
(data/service.py states the protocol and what it guarantees). Each worker is started with the
address the dispatcher lists for it (`--worker_address`, default localhost:--port); workers
need the data at the same paths as the trainer, and TensorFlow of the same version. The servers
run until interrupted. A worker that stops stalls the training that reads from it: restart
the service, then the run (it resumes from its last checkpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime import cli
from runtime.cli import UsageError, option

PROGRAM = "train.data_service"
ROLES = ("dispatcher", "worker")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def check_host_port(name: str, value: str) -> None:
    """UsageError naming `--name` unless value is HOST:PORT with a port in 1..65535."""
    match = _HOST_PORT.fullmatch(value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise UsageError(f"--{name}={value}: expected HOST:PORT, e.g. localhost:5050")


def check_address(name: str, value: str) -> None:
    """UsageError naming `--name` unless value is '' or grpc://HOST:PORT of a dispatcher."""
    if value and (not value.startswith("grpc://") or
                  not _HOST_PORT.fullmatch(value[len("grpc://"):]) or
                  not 0 < int(value.rsplit(":", 1)[1]) < 65536):
        raise UsageError(f"--{name}={value}: expected grpc://HOST:PORT of a tf.data service "
                         "dispatcher (python -m train.data_service), e.g. grpc://localhost:5050")


@dataclass(frozen=True)
class ServiceConfig:
    """The flags of `python -m train.data_service dispatcher|worker`."""

    role: str = option("", "dispatcher or worker (the positional argument).", flag=False)
    port: int = option(5050, "The port this server listens on.", lower=1, upper=65535)
    workers: tuple[str, ...] = option((), "dispatcher: HOST:PORT of every worker, as each "
                                      "one's --worker_address.")
    dispatcher: str = option("", "worker: HOST:PORT of the dispatcher.")
    worker_address: str = option("", "worker: HOST:PORT at which the dispatcher and the "
                                 "trainers reach it, as listed in the dispatcher's --workers "
                                 "(default localhost:--port).")

    def __post_init__(self):
        if self.role not in ROLES:
            raise UsageError(f"give one role: {' | '.join(ROLES)} (see --help)")
        if self.role == "dispatcher":
            if not self.workers:
                raise UsageError("dispatcher needs --workers, the HOST:PORT of every worker")
            for worker in self.workers:
                check_host_port("workers", worker)
            if self.dispatcher or self.worker_address:
                raise UsageError("--dispatcher and --worker_address are a worker's flags")
        else:
            cli.require("dispatcher", self.dispatcher)
            check_host_port("dispatcher", self.dispatcher)
            if self.workers:
                raise UsageError("--workers is the dispatcher's flag")
            if self.worker_address:
                check_host_port("worker_address", self.worker_address)

    @property
    def address(self) -> str:
        """A worker's address as the dispatcher lists it."""
        return self.worker_address or f"localhost:{self.port}"


def main(argv=None) -> None:
    cli.main(PROGRAM, ServiceConfig, "train.data_service_lib:run", module_name=PROGRAM,
             doc=__doc__, argv=argv, positional="role")


if __name__ == "__main__":
    main()
