"""Features per second from an exported SavedModel, against in-process `model.predict`.

    python -m benchmarks.serving_throughput [--model=nin_cifar10] [--batches=20] [--repeats=3]

Protocol: the model (untrained; weights do not change the speed) is exported with
`serving.export_lib.export_features` (its default transfer endpoint and pooling), reloaded with
`tf.saved_model.load`, and fed `--batches` batches of 64 random images at the model's input
size. Rows:

    model.predict      keras `model.predict` on all the images at batch_size 64
    serving_default    the float32 signature, one call per batch
    serving_uint8      the uint8 signature (the cast and / 255 happen in the graph)
    image_bytes        PNG-encoded images: decoding and resizing in the graph too

Each row is the best of `--repeats` timed passes after one warm-up pass, the rows taking turns
within each pass; "ratio" is its rate over model.predict's. The goal for the two image
signatures is a ratio of at least 0.9.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
from absl import app, flags

from models import build_model
from serving.export_lib import export_features

BATCH = 64

flags.DEFINE_string("model", "nin_cifar10", "A model of the zoo.")
flags.DEFINE_integer("batches", 20, "Batches of 64 per timed pass.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed passes per row (the best is kept).", lower_bound=1)


def _best_rates(rows, images: int, repeats: int) -> dict[str, float]:
    """{row: images / best time}. Rows take turns within each pass, so that a machine whose
    load changes during the run slows every row alike."""
    for _, run in rows:
        run()  # warm-up: tracing, kernel selection
    best = {name: float("inf") for name, _ in rows}
    for _ in range(repeats):
        for name, run in rows:
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: images / seconds for name, seconds in best.items()}


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    kwargs = {"head": "none"} if f.model.startswith("nin") else {"head": "none",
                                                                  "input_shape": (224, 224, 3)}
    model = build_model(f.model, **kwargs)
    height, width, channels = (int(d) for d in model.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (f.batches, BATCH, height, width, channels), dtype=np.uint8)
    floats = pixels.astype(np.float32) / 255
    pngs = [[tf.io.encode_png(image).numpy() for image in batch] for batch in pixels]
    n = f.batches * BATCH

    with tempfile.TemporaryDirectory() as base:
        path = export_features(model, base, f.model)
        loaded = tf.saved_model.load(path)
        signatures = loaded.signatures
        all_floats = floats.reshape(n, height, width, channels)
        batch_floats = [tf.constant(b) for b in floats]
        batch_uint8 = [tf.constant(b) for b in pixels]
        batch_pngs = [tf.constant(b) for b in pngs]

        def keras_predict():
            model.predict(all_floats, batch_size=BATCH, verbose=0)

        def serve(signature, batches, key):
            def run():
                for batch in batches:
                    out = signatures[signature](**{key: batch})
                for value in out.values():
                    value.numpy()
            return run

        rows = [
            ("model.predict", keras_predict),
            ("serving_default", serve("serving_default", batch_floats, "images")),
            ("serving_uint8", serve("serving_uint8", batch_uint8, "images")),
            ("image_bytes", serve("image_bytes", batch_pngs, "image_bytes")),
        ]
        rates = _best_rates(rows, n, f.repeats)

    outputs = ", ".join(f"{k} {tuple(v.shape)}" for k, v in
                        signatures["serving_default"].structured_outputs.items())
    print(f"model {f.model}, input {height}x{width}x{channels}, outputs {outputs}, batch {BATCH},"
          f" {f.batches} batches, best of {f.repeats}, {os.cpu_count()} CPUs")
    print()
    print(f"{'path':<16}  {'features/s':>10}  {'ratio':>5}")
    print(f"{'-' * 16}  {'-' * 10}  {'-' * 5}")
    for name, rate in rates.items():
        print(f"{name:<16}  {rate:>10.0f}  {rate / rates['model.predict']:>5.2f}")


if __name__ == "__main__":
    app.run(main)
