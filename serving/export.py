"""SavedModel export of a feature extractor, in TensorFlow Serving's layout.

`export_features(model, export_base, model_name, endpoints)` writes

    <export_base>/<model_name>/<version>/        version = 1 + the largest integer already there
        saved_model.pb, variables/
        assets/features.json                     model, endpoints, input size, checkpoint, ...

The version directory is written under a hidden temporary name (`.tmp-<version>-<pid>`) and
renamed when complete, so a model server polling `<export_base>/<model_name>` never loads a
half-written version. Exports into one model base take turns (an flock on its `.lock`, which
the server ignores); whoever holds it first removes staging folders that dead exports left.

Exporting is idempotent: when the latest version holds the same export (same model and
build_model kwargs, input size, endpoints with their poolings, and the same checkpoint: its
path and a digest of its `.index`, which holds a checksum of every tensor), nothing new is
published and that version is returned. An export without a checkpoint (random init) is
always a new version.

Signatures (serving/signatures.py; every output is a dict {endpoint name: float32 features}):

    serving_default   images: float32 [N, H, W, C], values in [0, 1]
    serving_uint8     images: uint8   [N, H, W, C], values in [0, 255] (divided by 255)
    image_bytes       image_bytes: string [N], encoded JPEG / PNG / GIF / BMP / WebP files

The restored object also has `features(images)`, one function traced for both image dtypes,
and `metadata()`, the JSON of the asset as a string tensor.

Image convention (the zoo's, `data.images`): the model takes float32 images in [0, 1]. Inside
the graph:
- uint8 is cast to float32 and divided by 255; float32 is taken as already in [0, 1];
- C must be 1 or 3, else the call fails with "images must have 1 (grayscale) or 3 (RGB)
  channels"; then the channel and resize rule of `data.images.resize_to_input`;
- float32 images must be finite: a NaN or Inf pixel fails the call ("... holds NaN or Inf
  pixels") instead of giving meaningless features; values outside [0, 1] are used as given;
- encoded images are decoded by `data.images.decode_image`, one by one since their sizes
  differ, then follow the same rules;
- a batch of 0 images returns features [0, ...] on every signature (the network is not run).
Input errors fail the call with InvalidArgumentError and one message that names the signature
and what it expects: a wrong rank (images not [N, H, W, C], image_bytes not [N]), an empty
string, bytes that do not start like a JPEG, PNG, GIF, BMP or WebP file ("image 3 of the batch
is not ..."). A file whose header is right but whose data is corrupt fails with the decoder's
own message (e.g. "Invalid JPEG data or crop window").
The model's fixed preprocessing (Sobel, grayscale, high-pass) is one of its layers, so a
client sends plain images. Nothing exported calls back into Python (no `py_function`): the
SavedModel loads in any TensorFlow process, and in TensorFlow Serving.

Pooling, per endpoint: `models.pooling` (none, flatten, avg, max, maxKxL, avgKxL).

Defaults: the model's transfer endpoint (`models.TRANSFER_ENDPOINT`) with `max6x6` for
AlexNet's conv5 (13 x 13 x 256 -> 9216 features, the size of pool5 and of the conv5 probes
of the NAT paper's Table 3 protocol; K, L are capped by a smaller conv5 map) and `flatten`
for NiN's `sc` (the whole map, every cell's features; the SC loss itself compares the
averages of windows of that map, losses/spatial_contrasting.py); any other 4-D endpoint
defaults to `flatten` and a 2-D one to `none`.

`python -m serving.export --pretrained=DIR` exports the latest checkpoint of a pretraining run
(its `config.json` gives the model), or the checkpoint prefix given; `--init=random
--model=NAME` exports an untrained network, seeded by --seed (with --pretrained: by the run's
own seed, so that it is the run's random twin).
"""

from __future__ import annotations

from dataclasses import dataclass

from models import MODEL_NAMES
from runtime import cli
from runtime.cli import UsageError, option
from runtime.vocabulary import PretrainedInput

PROGRAM = "serving.export"


def parse_endpoints(text: str) -> dict[str, str] | None:
    """"conv5:max6x6,embedding" -> {"conv5": "max6x6", "embedding": ""}; "" -> None."""
    if not text.strip():
        return None
    endpoints = {}
    for item in text.split(","):
        name, _, pooling = item.strip().partition(":")
        if not name:
            raise UsageError(f"--endpoints: empty endpoint name in {text!r}")
        if name in endpoints:
            raise UsageError(f"--endpoints: {name!r} listed twice in {text!r}")
        endpoints[name] = pooling
    return endpoints


@dataclass(frozen=True)
class ExportConfig(PretrainedInput):
    """The flags of `python -m serving.export`; --pretrained and --init are those of
    runtime/vocabulary.py."""

    model: str = option("", "Model name (with --init=random, or to override config.json).")
    model_kwargs: str = option("", "JSON keyword arguments of build_model (override "
                               "config.json's model_kwargs).")
    endpoints: str = option("", "Comma-separated endpoint[:pooling], pooling in none, "
                            "flatten, avg, max, maxKxL, avgKxL. Default: the transfer endpoint.")
    export_base: str = option("", "Base directory of the model server (default: "
                              "<pretrained run>/export).")
    model_name: str = option("", "Served model name (default: the model name).")
    seed: int = option(0, "Seed of --init=random without a run (with --pretrained: the "
                       "run's own seed, its random twin).")

    def __post_init__(self):
        if self.init == "pretrained" and not self.pretrained:
            raise UsageError("--pretrained is required unless --init=random (see --help)")
        if self.init == "random" and not (self.model or self.pretrained):
            raise UsageError("--init=random needs --model (or a --pretrained run to read it "
                             "from)")
        if self.model and self.model not in MODEL_NAMES:
            raise UsageError(f"--model={self.model}: choose one of {', '.join(MODEL_NAMES)}")
        if not self.export_base and not self.pretrained:
            raise UsageError("--export_base is required without --pretrained (see --help)")
        self.overrides()
        parse_endpoints(self.endpoints)

    def overrides(self) -> dict:
        """The --model_kwargs as a dict."""
        return cli.json_object("model_kwargs", self.model_kwargs)


def main(argv=None) -> None:
    cli.main(PROGRAM, ExportConfig, "serving.export_lib:run", module_name=PROGRAM, doc=__doc__,
             argv=argv)


if __name__ == "__main__":
    main()
