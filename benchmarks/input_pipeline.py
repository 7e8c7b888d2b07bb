"""ImageNet input pipeline: images/s of the pretraining stream, fused against unfused crops.

    python -m benchmarks.input_pipeline [--files=300 --batch_size=64 --rounds=3]

What it measures. `--files` JPEG files written to a temporary folder with ImageNet's
statistics: 500 x 375 and 500 x 333 landscape and 375 x 500 portrait photographs, quality 90,
4:2:0 chroma (libjpeg's default), of synthetic scenes whose power spectrum falls as 1/f^2 as
that of natural images does (about 120 kB a file; ILSVRC-2012's train files average about
110 kB). They are streamed by `data.pretrain`'s `pretrain_dataset` as imagenet2012 is (the
files' bytes decoded in the graph; the last row: as `--dataset=folder:<tmp>` is, through the
loader that names files failing mid-run, a Python function per file): stateless shuffle, the
ImageNet resized crop (35-100% of the area, aspect 3/4-4/3, resized to 224 x 224 with antialiasing),
random flip, batches. Two crops are compared:

    fused     the box is drawn from the JPEG header and only that window is decoded
              (`tf.io.decode_and_crop_jpeg`, `data.images.decode_jpeg_window`)
    unfused   the whole file is decoded, then the box is cut (`Augment(fused=False)`)

Both give the same pixels. Each is run under the `tf.data` options that matter: the map runs
with `num_parallel_calls=AUTOTUNE` (the library's setting); `private_threadpool_size` is the
number of threads that run it (1 = one core); `max_intra_op_parallelism=1` stops each decode
and resize from spawning threads of its own, which only compete with the other map calls;
`experimental_optimization.apply_default_optimizations=False` turns off tf.data's graph
rewrites (map and batch fusion, ...) to show what they are worth. Rows are interleaved over
`--rounds` rounds; each measurement starts a fresh iterator, discards `--warmup` batches and
times `--batches`. Two rates per row: images per second of wall time, and images per
CPU-second of this process (all its threads), the per-core cost, which other processes on a
shared machine disturb less.

A second table splits one image's cost (CPU milliseconds, a sequential tf.function loop over
64 files, no tf.data): decoding the whole file, decoding the crop's window, and the
whole fused and unfused crops; the difference is what the resize and the rest cost.

A third table streams the same files through a tf.data service (`--data_service`,
data/service.py) with `--service_workers` workers, against the local stream under tf.data's
defaults: the workers are servers in this process on loopback, sharing its cores, so the rows
show what the protocol costs (the round trip, the reordering), not the cores other machines
add.

Beside it, the training step's images/s for AlexNet at 224 (NAT head, d = 2048, float32,
batch `--step_batch`, on whatever device there is), and the cores the fused pipeline needs to
feed AlexNet at 3000 and 10000 images/s (an H100-class GPU), from the per-core cost.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import socket
import statistics
import tempfile
import time

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image

from benchmarks.steps import fixed_batches, synthetic_source
from data.augment import Augment, crop_box, resized_crop_of_file
from data.images import decode_jpeg_window, decode_pixels
from data.pretrain import open_source, pretrain_dataset
from data.service import service_dataset
from train.config import TrainConfig
from train.trainer import Trainer

_FILES = flags.DEFINE_integer("files", 300, "JPEG files to generate.", lower_bound=8)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch of the stream.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per measurement.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Batches discarded per measurement.", lower_bound=0)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (median reported).", lower_bound=1)
_STEP_BATCH = flags.DEFINE_integer("step_batch", 32, "Batch of the AlexNet training step.",
                                   lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed AlexNet training steps.", lower_bound=1)
_SERVICE_WORKERS = flags.DEFINE_list("service_workers", ["1", "2"], "tf.data service workers "
                                     "of the service rows (in-process, loopback); empty: none.")

SIZES = ((375, 500), (333, 500), (500, 375), (375, 500))  # (height, width), cycled
TARGETS = (3000, 10000)  # images/s of AlexNet on one or a few H100-class GPUs


def photograph(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: luminance with a 1/f^2 power spectrum (natural images) and
    smoother chroma (1/f^2.5), mapped from YCbCr to RGB."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0

    def field(exponent: float) -> np.ndarray:
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (
            exponent / 2)
        spectrum[0, 0] = 0.0
        x = np.fft.irfft2(spectrum, s=(height, width))
        return x / x.std()

    y, cb, cr = 128 + 48 * field(2.0), 20 * field(2.5), 20 * field(2.5)
    rgb = np.stack([y + 1.402 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_files(root: str, count: int) -> float:
    """`count` JPEGs (quality 90) in `root`; returns their mean size in kB."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(count):
        out = io.BytesIO()
        Image.fromarray(photograph(rng, *SIZES[i % len(SIZES)])).save(out, "JPEG", quality=90)
        with open(os.path.join(root, f"{i:05d}.jpg"), "wb") as f:
            f.write(out.getvalue())
        sizes.append(len(out.getvalue()))
    return float(np.mean(sizes)) / 1e3


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    threads: int | None  # private thread pool size; None: the shared pool (tf.data default)
    intra_op_one: bool = True
    optimizations: bool = True

    def options(self) -> tf.data.Options:
        options = tf.data.Options()
        if self.threads is not None:
            options.threading.private_threadpool_size = self.threads
        if self.intra_op_one:
            options.threading.max_intra_op_parallelism = 1
        if not self.optimizations:
            options.experimental_optimization.apply_default_optimizations = False
        return options


def _settings(cores: int) -> list[Setting]:
    return [
        Setting("1 core (1 thread, intra-op 1)", 1),
        Setting(f"{cores} cores ({cores} threads, intra-op 1)", cores),
        Setting(f"{cores} threads, intra-op shared", cores, intra_op_one=False),
        Setting(f"{cores} threads, no tf.data rewrites", cores, optimizations=False),
        Setting("tf.data defaults (shared pool)", None, intra_op_one=False),
    ]


def _as_encoded(folder):
    """The folder as imagenet2012 streams: file bytes in the elements, decoded in the graph
    (`PretrainSource.encoded`), without the folder's guarded loader (a Python function per
    file that names files failing mid-run; measured in its own row)."""
    paths = tf.constant(list(folder.paths))

    def gather(indices):
        return tf.map_fn(tf.io.read_file, tf.gather(paths, indices))

    def elements():
        indices = tf.data.Dataset.range(len(folder.paths))
        return indices.map(lambda i: (i, tf.io.read_file(tf.gather(paths, i))))

    return dataclasses.replace(folder, elements=elements, gather=gather, encoded=True,
                               load=None, failures=None)


def _measure(source, setting: Setting, fused: bool) -> tuple[float, float]:
    """(images per wall second, images per CPU-second) of one fresh stream."""
    augment = Augment(crop="resize", flip=True, fused=fused)
    stream = pretrain_dataset(source, _BATCH.value, augment, seed=0, epochs=1000)
    iterator = iter(stream.with_options(setting.options()))
    for _ in range(_WARMUP.value):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(_BATCHES.value):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = _BATCHES.value * _BATCH.value
    return images / wall, images / max(cpu, 1e-9)


def _parts(root: str, files: int = 64, passes: int = 3) -> dict[str, list[float]]:
    """CPU milliseconds per image of the crop's parts, single-threaded (module docstring)."""
    paths = sorted(os.listdir(root))[:files]
    data = tf.constant([open(os.path.join(root, p), "rb").read() for p in paths])
    seeds = tf.stack([tf.zeros([len(paths)], tf.int64), tf.range(len(paths), dtype=tf.int64)],
                     axis=1)

    def crop(fused):
        augment = Augment(crop="resize", fused=fused)
        return lambda raw, seed: resized_crop_of_file(raw, seed, augment, (224, 224, 3))[0, 0, 0]

    def window(raw, seed):
        shape = tf.io.extract_jpeg_shape(raw)
        begin, size = crop_box(tf.concat([shape[:2], [3]], 0), seed, Augment(crop="resize"))
        return tf.cast(decode_jpeg_window(raw, begin, size)[0, 0, 0], tf.float32)

    parts = {
        "decode whole file": lambda raw, seed: tf.cast(decode_pixels(raw)[0, 0, 0], tf.float32),
        "decode the crop's window": window,
        "unfused crop (all of it)": crop(False),
        "fused crop (all of it)": crop(True),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for name, part in parts.items():
        loop = tf.function(lambda part=part: tf.reduce_sum(tf.map_fn(
            lambda x, part=part: part(*x), (data, seeds), fn_output_signature=tf.float32,
            parallel_iterations=1)))
        loop()
        for _ in range(passes):
            start = time.process_time()
            loop().numpy()
            times[name].append(1e3 * (time.process_time() - start) / len(paths))
    return times


def _alexnet_step(tmp: str) -> float:
    """Images/s of the NAT training step of AlexNet at 224 (d = 2048, float32)."""
    batch = _STEP_BATCH.value
    config = TrainConfig(model_dir=os.path.join(tmp, "alexnet"), model="alexnet",
                         input_shape="224,224,3", nat_dim=2048, batch_size=batch,
                         steps_per_loop=1, dataset="folder:unused")
    source = synthetic_source((224, 224, 3), 4 * batch)
    trainer = Trainer(config, tf.distribute.get_strategy(), source=source, log=lambda _: None)
    iterator = fixed_batches(tf.distribute.get_strategy(), batch, 224)
    trainer.run_steps(iterator, 1, True)  # trace and warm up
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        trainer.run_steps(iterator, 1, True)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cores = os.cpu_count() or 1
    tmp = tempfile.mkdtemp()
    try:
        root = os.path.join(tmp, "photos")
        os.makedirs(root)
        kilobytes = write_files(root, _FILES.value)
        folder = open_source(f"folder:{root}", (224, 224, 3))
        source = _as_encoded(folder)
        settings = _settings(cores)
        guarded = Setting(f"folder: loader, {cores} threads", cores)
        rates: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for _ in range(_ROUNDS.value):
            for setting in settings:
                for fused in (True, False):
                    rates.setdefault((setting.name, fused), []).append(
                        _measure(source, setting, fused))
            for fused in (True, False):
                rates.setdefault((guarded.name, fused), []).append(
                    _measure(folder, guarded, fused))
        settings.append(guarded)
        parts = _parts(root)
        service = _service_rates(source)
        step_rate = _alexnet_step(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(rates, settings, step_rate, kilobytes, cores)
    print(f"\none image on one thread, CPU ms (median of {len(parts['decode whole file'])} "
          "passes over 64 files):")
    for name, values in parts.items():
        print(f"  {name:<28} {statistics.median(values):6.2f}")
    _report_service(service)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _service_rates(source) -> dict[str, list[float]]:
    """{row: images per wall second over the rounds}: the fused stream locally (tf.data
    defaults) and through an in-process tf.data service of each `--service_workers` size."""
    service = tf.data.experimental.service
    servers, streams = [], {"local (tf.data defaults)": None}
    for count in map(int, _SERVICE_WORKERS.value):
        ports = [_free_port() for _ in range(count)]
        addresses = [f"127.0.0.1:{port}" for port in ports]
        dispatcher = service.DispatchServer(service.DispatcherConfig(worker_addresses=addresses))
        host = dispatcher.target[len("grpc://"):]
        servers += [dispatcher] + [service.WorkerServer(service.WorkerConfig(
            dispatcher_address=host, worker_address=address, port=port,
            heartbeat_interval_ms=100)) for address, port in zip(addresses, ports, strict=True)]
        streams[f"service, {count} worker{'s' * (count > 1)} (in-process)"] = dispatcher.target
    augment = Augment(crop="resize", flip=True)
    rates: dict[str, list[float]] = {}
    for _ in range(_ROUNDS.value):
        for name, target in streams.items():
            stream = (pretrain_dataset(source, _BATCH.value, augment, 0, 1000) if target is None
                      else service_dataset(target, source, _BATCH.value, augment, 0, 1000))
            iterator = iter(stream)
            for _ in range(_WARMUP.value + 1):  # + 1: the service's job starts on the first
                next(iterator)
            start = time.perf_counter()
            for _ in range(_BATCHES.value):
                next(iterator)
            rates.setdefault(name, []).append(
                _BATCHES.value * _BATCH.value / (time.perf_counter() - start))
    del servers  # the servers stop with the process
    return rates


def _report_service(rates: dict[str, list[float]]) -> None:
    print(f"\nthe fused stream through a tf.data service on loopback (workers in this process, "
          f"sharing its {os.cpu_count()} cores), img/s, median of {_ROUNDS.value} rounds:")
    for name, values in rates.items():
        print(f"  {name:<38} {statistics.median(values):8.0f}")


def _median(values: list[tuple[float, float]], i: int) -> float:
    return statistics.median(v[i] for v in values)


def _report(rates, settings, step_rate: float, kilobytes: float, cores: int) -> None:
    print(f"{_FILES.value} JPEGs, {kilobytes:.0f} kB on average, 500x375/500x333/375x500, "
          f"q90 4:2:0 -> resized crops 224x224x3, batch {_BATCH.value}; {cores} cores; "
          f"median of {_ROUNDS.value} rounds x {_BATCHES.value} batches\n")
    head = (f"| {'tf.data setting':<38} | {'fused img/s':>11} | {'unfused img/s':>13} | "
            f"{'fused/unfused':>13} | {'fused img/CPU-s':>15} | {'unfused img/CPU-s':>17} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for setting in settings:
        fused, unfused = rates[(setting.name, True)], rates[(setting.name, False)]
        print(f"| {setting.name:<38} | {_median(fused, 0):>11.0f} | {_median(unfused, 0):>13.0f} "
              f"| {_median(fused, 0) / _median(unfused, 0):>13.2f} | {_median(fused, 1):>15.0f} "
              f"| {_median(unfused, 1):>17.0f} |")
    one = settings[0].name
    per_core = {fused: (_median(rates[(one, fused)], 0), _median(rates[(one, fused)], 1))
                for fused in (True, False)}
    print(f"\nper core (1 thread): fused {per_core[True][0]:.0f} img/s "
          f"({per_core[True][1]:.0f} per CPU-second), unfused {per_core[False][0]:.0f} img/s "
          f"({per_core[False][1]:.0f} per CPU-second): fused / unfused = "
          f"{per_core[True][0] / per_core[False][0]:.2f} (wall), "
          f"{per_core[True][1] / per_core[False][1]:.2f} (CPU; goal >= 1.5)")
    print(f"AlexNet NAT training step at 224 (d = 2048, float32, batch {_STEP_BATCH.value}) on "
          f"{_device()}: {step_rate:.0f} img/s; the fused pipeline on one core feeds "
          f"{per_core[True][0] / step_rate:.1f}x that")
    for target in TARGETS:
        print(f"cores to feed AlexNet at {target} img/s: fused {target / per_core[True][1]:.0f}"
              f", unfused {target / per_core[False][1]:.0f} (from the CPU-seconds per image)")


def _device() -> str:
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "this CPU"


if __name__ == "__main__":
    app.run(main)
