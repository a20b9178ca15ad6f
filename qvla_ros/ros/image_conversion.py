"""sensor_msgs/Image <-> numpy, without cv_bridge (PyPI's cv-bridge is ROS 1 code that ignores
`step` and breaks with numpy 2).

Decoding returns views of the message's buffer whenever the layout allows it: `step` becomes the
row stride, so padded rows cost nothing, and BGR and mono become RGB by striding, not copying.
Only data whose byte order differs from this machine's, and 16-bit/float images (which must be
rescaled to uint8 for the policy), are copied.

Frames of another size than the policy's are fitted to it here (`fit_frame`: an optional centre
crop, then cv2.resize with INTER_AREA), in the frame's own encoding, before the RGB view is
taken, so a 1280x720 bgr8 camera costs one resize of its pixels and nothing else. Compressed
frames (sensor_msgs/CompressedImage, JPEG or PNG) are decoded with cv2.imdecode and then take the
same path.

Every malformed message raises ImageConversionError (a ValueError) naming the problem; nothing
else is raised for message content.
"""
from __future__ import annotations

import array
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COMPRESSED_FORMATS",
    "ENCODINGS",
    "RESIZE_MODES",
    "ImageConversionError",
    "compressed_to_rgb8",
    "fit_frame",
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

# How a frame of another size becomes the policy's input:
#   fit:    the whole frame (after the optional centre crop) scaled to the policy's size; the
#           aspect ratio is not kept (as OpenVLA/OFT resize their camera frames);
#   crop:   the largest centred region with the policy's aspect ratio, then scaled (nothing
#           stretched; the sides of a wide frame are cut);
#   refuse: frames must already have the policy's size (each other one is dropped and counted).
RESIZE_MODES = ("fit", "crop", "refuse")
# CompressedImage.format values decoded (image_transport writes e.g. "rgb8; jpeg compressed bgr8").
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")
# Larger compressed payloads are refused unread: no camera frame the policy takes comes near it.
MAX_COMPRESSED_BYTES = 64 * 2 ** 20


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


def fit_frame(pixels: np.ndarray, size: tuple[int, int], resize: str = "fit",
              crop_scale: float = 1.0) -> np.ndarray:
    """`pixels` ([H, W] or [H, W, C], any element type cv2 resizes) brought to `size` (height,
    width) as `resize` says (see RESIZE_MODES).

    crop_scale: fraction of the frame's AREA kept by a centred crop before scaling (OpenVLA-OFT
    crops 0.9 of the area, each side by sqrt(0.9), at inference when trained with random crops);
    1.0 = no crop. A frame that already has `size` and is not cropped is returned as it is.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    target_h, target_w = (int(n) for n in size)
    if (height, width) == (target_h, target_w) and crop_scale == 1.0:
        return pixels
    if resize == "refuse":
        raise ImageConversionError(
            f"image is {width}x{height} pixels; the policy takes {target_w}x{target_h} "
            f"(image_resize is 'refuse')", "size")
    crop_h, crop_w = float(height), float(width)
    if resize == "crop":  # the largest centred region with the target's aspect ratio
        if width * target_h > height * target_w:
            crop_w = height * target_w / target_h
        else:
            crop_h = width * target_h / target_w
    side = crop_scale ** 0.5
    crop_h, crop_w = max(1, round(crop_h * side)), max(1, round(crop_w * side))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    region = pixels[top:top + crop_h, left:left + crop_w]
    import cv2  # opencv-python(-headless); only needed when frames are resized or compressed

    # INTER_AREA averages the source pixels each output pixel covers: no aliasing when shrinking
    # a camera frame many times (cv2 takes the view's row stride as is: no copy before).
    return cv2.resize(region, (target_w, target_h), interpolation=cv2.INTER_AREA)


def image_to_rgb8(msg, encodings=None, size: tuple[int, int] | None = None,
                  resize: str = "refuse", crop_scale: float = 1.0) -> np.ndarray:
    """The policy's view of one camera message: uint8 RGB [height, width, 3].

    encodings: the encodings accepted (None = every supported one); size: the (height, width)
    the policy takes, or None for any; resize, crop_scale: how a frame is brought to `size`
    (fit_frame; "refuse": only frames of exactly `size`). Raises ImageConversionError naming
    what is wrong.
    """
    if encodings is not None and msg.encoding not in encodings:
        raise ImageConversionError(
            f"image encoding {msg.encoding!r} is not accepted here; expected one of "
            f"{', '.join(encodings)}", "encoding")
    if size is not None and resize == "refuse" and (int(msg.height), int(msg.width)) != tuple(size):
        raise ImageConversionError(
            f"image is {msg.width}x{msg.height} pixels; the policy takes {size[1]}x{size[0]}",
            "size")
    pixels = image_to_array(msg)
    if size is not None:
        pixels = fit_frame(pixels, size, resize, crop_scale)
    return to_rgb8(pixels, msg.encoding)


def compressed_to_rgb8(msg, size: tuple[int, int] | None = None, resize: str = "fit",
                       crop_scale: float = 1.0) -> np.ndarray:
    """The policy's view of a sensor_msgs/CompressedImage (JPEG or PNG): decoded with
    cv2.imdecode (colour, 8 bits), then as image_to_rgb8. Raises ImageConversionError with kind
    format (not JPEG/PNG), empty, too_large (over MAX_COMPRESSED_BYTES) or decode (damaged)."""
    fmt = str(msg.format).lower()
    named = [f for f in COMPRESSED_FORMATS if f in fmt]
    if fmt.strip() and not named:
        raise ImageConversionError(
            f"compressed image format {msg.format!r} is not decoded here; expected JPEG or PNG",
            "format")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError("compressed image with no data", "empty")
    if data.size > MAX_COMPRESSED_BYTES:
        raise ImageConversionError(
            f"compressed image of {data.size} bytes, over {MAX_COMPRESSED_BYTES}", "too_large")
    import cv2

    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        bgr = None
        why = str(exc).strip().splitlines()[-1][:200]
    else:
        why = "not a readable JPEG or PNG"
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] == 0 or bgr.shape[1] == 0:
        raise ImageConversionError(
            f"compressed image ({msg.format or 'no format given'}, {data.size} bytes) could "
            f"not be decoded: {why}", "decode")
    if size is not None:
        bgr = fit_frame(bgr, size, resize, crop_scale)
    return to_rgb8(bgr, "bgr8")


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
