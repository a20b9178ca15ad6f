"""sensor_msgs/Image <-> numpy: every supported encoding, padded rows, byte order, zero-copy views,
and a clear ImageConversionError for each malformed message."""
import array

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg")
from sensor_msgs.msg import Image  # noqa: E402

from qvla_ros.ros.image_conversion import (  # noqa: E402
    ImageConversionError,
    array_to_image,
    image_to_array,
    image_to_rgb8,
)

rng = np.random.default_rng(0)


def raw_image(pixels: np.ndarray, encoding: str, pad: int = 0, big_endian: bool = False) -> Image:
    """A message written by hand (not by array_to_image): rows padded by `pad` bytes."""
    dtype = pixels.dtype.newbyteorder(">" if big_endian else "<")
    rows = pixels.astype(dtype).reshape(pixels.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 0xAB, np.uint8)], axis=1)
    msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding,
                is_bigendian=big_endian, step=padded.shape[1])
    msg.data = array.array("B", padded.tobytes())
    return msg


def shares_buffer(result: np.ndarray, msg: Image) -> bool:
    return np.shares_memory(result, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize("pad", [0, 5])
def test_rgb8_is_a_view_that_honours_step(pad):
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    msg = raw_image(pixels, "rgb8", pad=pad)
    rgb = image_to_rgb8(msg)
    np.testing.assert_array_equal(rgb, pixels)
    assert shares_buffer(rgb, msg)
    assert not rgb.flags.writeable


def test_bgr8_becomes_rgb_by_striding():
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    msg = raw_image(pixels[..., ::-1], "bgr8", pad=3)
    rgb = image_to_rgb8(msg)
    np.testing.assert_array_equal(rgb, pixels)
    assert shares_buffer(rgb, msg)


def test_mono8_is_broadcast_to_three_channels():
    gray = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    msg = raw_image(gray, "mono8", pad=1)
    rgb = image_to_rgb8(msg)
    assert rgb.shape == (5, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)
    assert shares_buffer(rgb, msg)


@pytest.mark.parametrize("big_endian", [False, True])
def test_mono16_either_byte_order(big_endian):
    gray = rng.integers(0, 65536, (3, 5), dtype=np.uint16)
    msg = raw_image(gray, "mono16", pad=2, big_endian=big_endian)
    np.testing.assert_array_equal(image_to_array(msg), gray)
    np.testing.assert_array_equal(image_to_rgb8(msg)[..., 1], (gray >> 8).astype(np.uint8))


@pytest.mark.parametrize("big_endian", [False, True])
def test_32fc1_is_intensity_in_unit_range(big_endian):
    values = np.array([[0.0, 0.5, 1.0, 2.0], [-1.0, np.nan, np.inf, 0.25]], np.float32)
    msg = raw_image(values, "32FC1", pad=4, big_endian=big_endian)
    np.testing.assert_array_equal(image_to_array(msg), values)
    assert image_to_rgb8(msg)[..., 0].tolist() == [[0, 128, 255, 255], [0, 0, 255, 64]]


@pytest.mark.parametrize("encoding,shape,dtype", [
    ("rgb8", (6, 4, 3), np.uint8), ("bgr8", (6, 4, 3), np.uint8), ("mono8", (6, 4), np.uint8),
    ("mono16", (6, 4), np.uint16), ("32FC1", (6, 4), np.float32)])
def test_array_to_image_round_trips(encoding, shape, dtype):
    pixels = (rng.random(shape) * 200).astype(dtype)
    msg = array_to_image(pixels, encoding)
    assert (msg.height, msg.width, msg.encoding) == (shape[0], shape[1], encoding)
    assert msg.step == shape[1] * (shape[2] if len(shape) == 3 else 1) * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(image_to_array(msg), pixels)


def test_unsupported_encoding():
    msg = raw_image(np.zeros((2, 2, 3), np.uint8), "rgb8")
    msg.encoding = "yuv422"
    with pytest.raises(ImageConversionError, match="unsupported image encoding 'yuv422'"):
        image_to_rgb8(msg)


def test_encoding_not_accepted_by_the_node():
    msg = raw_image(np.zeros((2, 2), np.uint8), "mono8")
    with pytest.raises(ImageConversionError, match="'mono8' is not accepted"):
        image_to_rgb8(msg, encodings=("rgb8", "bgr8"))


def test_wrong_size():
    msg = raw_image(np.zeros((4, 6, 3), np.uint8), "rgb8")
    with pytest.raises(ImageConversionError, match="6x4 pixels; the policy takes 8x8"):
        image_to_rgb8(msg, size=(8, 8))


def test_data_shorter_than_step_times_height():
    msg = raw_image(np.zeros((4, 6, 3), np.uint8), "rgb8", pad=2)
    msg.data = msg.data[:-1]  # only the last row's padding is missing, still too short
    with pytest.raises(ImageConversionError, match=r"shorter than step x height = 20 x 4 = 80"):
        image_to_rgb8(msg)


def test_step_shorter_than_a_row():
    msg = raw_image(np.zeros((4, 6, 3), np.uint8), "rgb8")
    msg.step = 17
    with pytest.raises(ImageConversionError, match="step 17 is shorter than one row"):
        image_to_rgb8(msg)


def test_empty_image():
    msg = Image(height=0, width=5, encoding="rgb8", step=15)
    with pytest.raises(ImageConversionError, match="empty image"):
        image_to_rgb8(msg)


def test_array_of_the_wrong_shape_for_its_encoding():
    with pytest.raises(ImageConversionError, match=r"rgb8 needs an array of shape \[H, W, 3\]"):
        array_to_image(np.zeros((4, 4), np.uint8), "rgb8")
