"""The names of the serving contract, shared by the export and its clients.

Every signature returns a dict {endpoint name: float32 features [N, ...]}:

    serving_default   images: float32 [N, H, W, C], values in [0, 1]
    serving_uint8     images: uint8   [N, H, W, C], values in [0, 255]
    image_bytes       image_bytes: string [N], encoded JPEG / PNG / GIF / BMP / WebP files

An export also carries `assets/features.json`: the model, its endpoints and poolings, the
input size and the checkpoint it was made from.
"""

FLOAT_SIGNATURE = "serving_default"
UINT8_SIGNATURE = "serving_uint8"
BYTES_SIGNATURE = "image_bytes"
SIGNATURES = (FLOAT_SIGNATURE, UINT8_SIGNATURE, BYTES_SIGNATURE)

IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"

METADATA_FILE = "features.json"

INPUTS = {
    FLOAT_SIGNATURE: {IMAGES_INPUT: "float32 [N, H, W, C] in [0, 1]"},
    UINT8_SIGNATURE: {IMAGES_INPUT: "uint8 [N, H, W, C]"},
    BYTES_SIGNATURE: {BYTES_INPUT: "string [N], encoded JPEG/PNG/GIF/BMP/WebP"},
}
"""Each signature's input, as the metadata describes it."""
