"""sensor_msgs/Image <-> numpy, without cv_bridge (PyPI's cv-bridge is ROS 1 code that ignores
`step` and breaks with numpy 2).

Decoding returns views of the message's buffer whenever the layout allows it: `step` becomes the
row stride, so padded rows cost nothing, and BGR and mono become RGB by striding, not copying.
Only data whose byte order differs from this machine's, and 16-bit/float images (which must be
rescaled to uint8 for the policy), are copied.

Every malformed message raises ImageConversionError (a ValueError) naming the problem; nothing
else is raised for message content.
"""
from __future__ import annotations

import array
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ENCODINGS",
    "ImageConversionError",
    "array_to_image",
    "image_to_array",
    "image_to_rgb8",
    "to_rgb8",
]


@dataclass(frozen=True)
class Encoding:
    """Pixel layout of one sensor_msgs/Image encoding: element type and channels per pixel."""

    dtype: str  # numpy type code without byte order: "u1", "u2", "f4"
    channels: int

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def pixel_bytes(self) -> int:
        return self.itemsize * self.channels


# The encodings a camera or the simulator gives a VLA. 32FC1 is read as intensity in [0, 1].
ENCODINGS: dict[str, Encoding] = {
    "rgb8": Encoding("u1", 3),
    "bgr8": Encoding("u1", 3),
    "mono8": Encoding("u1", 1),
    "mono16": Encoding("u2", 1),
    "32FC1": Encoding("f4", 1),
}

_NATIVE_BIG_ENDIAN = sys.byteorder == "big"


class ImageConversionError(ValueError):
    """A sensor_msgs/Image that cannot be read as the policy's input; the message says why and
    `kind` names the problem for counting: encoding, size, step, short_data, empty, shape."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _encoding(name: str) -> Encoding:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ImageConversionError(
            f"unsupported image encoding {name!r}; supported: {', '.join(ENCODINGS)}",
            "encoding") from None


def image_to_array(msg) -> np.ndarray:
    """Pixels of `msg` as an array [height, width, channels] (channels > 1) or [height, width],
    in the message's own encoding and element type, in native byte order.

    A read-only view of msg.data (kept alive by the array) unless the message's byte order
    differs from this machine's. Raises ImageConversionError for an unsupported encoding, a
    zero size, a step shorter than a row, or data shorter than step * height.
    """
    enc = _encoding(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"empty image: {width}x{height} pixels", "empty")
    row_bytes = width * enc.pixel_bytes
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is shorter than one row of {width} {msg.encoding} pixels "
            f"({row_bytes} bytes)", "step")
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size < step * height:
        raise ImageConversionError(
            f"image data is {buffer.size} bytes, shorter than step x height = {step} x {height} "
            f"= {step * height} bytes", "short_data")
    order = ">" if msg.is_bigendian else "<"
    dtype = np.dtype(order + enc.dtype) if enc.itemsize > 1 else np.dtype(enc.dtype)
    shape = (height, width, enc.channels) if enc.channels > 1 else (height, width)
    strides = ((step, enc.pixel_bytes, enc.itemsize) if enc.channels > 1
               else (step, enc.itemsize))
    pixels = np.ndarray(shape, dtype=dtype, buffer=buffer, offset=0, strides=strides)
    pixels.flags.writeable = False
    if enc.itemsize > 1 and bool(msg.is_bigendian) != _NATIVE_BIG_ENDIAN:
        pixels = pixels.astype(dtype.newbyteorder("="))
    return pixels


def to_rgb8(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """uint8 RGB [height, width, 3] from an array in `encoding` (as image_to_array returns it).

    rgb8, bgr8 and mono8 come back as views; mono16 keeps its high byte; 32FC1 is intensity in
    [0, 1], clipped, with NaN as 0.
    """
    if encoding == "rgb8":
        return pixels
    if encoding == "bgr8":
        return pixels[..., ::-1]
    if encoding == "mono8":
        return np.broadcast_to(pixels[..., None], (*pixels.shape, 3))
    if encoding == "mono16":
        return np.broadcast_to((pixels >> 8).astype(np.uint8)[..., None], (*pixels.shape, 3))
    if encoding == "32FC1":
        intensity = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
        scaled = np.rint(np.clip(intensity, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.broadcast_to(scaled[..., None], (*pixels.shape, 3))
    raise ImageConversionError(
        f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}", "encoding")


def image_to_rgb8(msg, encodings=None, size: tuple[int, int] | None = None) -> np.ndarray:
    """The policy's view of one camera message: uint8 RGB [height, width, 3].

    encodings: the encodings accepted (None = every supported one); size: the (height, width)
    required, or None for any. Raises ImageConversionError naming what is wrong.
    """
    if encodings is not None and msg.encoding not in encodings:
        raise ImageConversionError(
            f"image encoding {msg.encoding!r} is not accepted here; expected one of "
            f"{', '.join(encodings)}", "encoding")
    if size is not None and (int(msg.height), int(msg.width)) != tuple(size):
        raise ImageConversionError(
            f"image is {msg.width}x{msg.height} pixels; the policy takes {size[1]}x{size[0]}",
            "size")
    return to_rgb8(image_to_array(msg), msg.encoding)


def array_to_image(pixels: np.ndarray, encoding: str = "rgb8", msg=None):
    """Fill a sensor_msgs/Image (a new one, or `msg`) from an array in `encoding`: [H, W, 3] for
    rgb8/bgr8, [H, W] for mono8/mono16/32FC1. Rows are written tightly (step = one row), in this
    machine's byte order. The header is left to the caller."""
    enc = _encoding(encoding)
    expected_dims = 3 if enc.channels > 1 else 2
    if pixels.ndim != expected_dims or (enc.channels > 1 and pixels.shape[2] != enc.channels):
        raise ImageConversionError(
            f"{encoding} needs an array of shape [H, W{', %d' % enc.channels if enc.channels > 1 else ''}],"
            f" got {list(pixels.shape)}", "shape")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageConversionError(f"empty image: {list(pixels.shape)}", "empty")
    if msg is None:
        from sensor_msgs.msg import Image
        msg = Image()
    pixels = np.ascontiguousarray(pixels, dtype=np.dtype(enc.dtype))
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = _NATIVE_BIG_ENDIAN
    msg.step = msg.width * enc.pixel_bytes
    # array.array('B') is the message's own storage type: assigning it skips a per-byte check.
    data = array.array("B")
    data.frombytes(pixels.data.cast("B"))
    msg.data = data
    return msg
