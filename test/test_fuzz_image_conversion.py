"""Property-based tests of the camera boundary: any sensor_msgs/Image a wire can carry (every
encoding, random sizes, steps, byte orders, truncated or surplus data) either converts to the
policy's uint8 RGB view, exactly as an independent row-by-row decode says, or raises
ImageConversionError with one of its documented kinds. Nothing else escapes, and the message's
bytes are never modified (conversion hands out read-only views of them).

Bounded and derandomized, so CI sees the same examples every run.
"""
import array

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("sensor_msgs.msg")
from sensor_msgs.msg import Image  # noqa: E402

from qvla_ros.ros.image_conversion import (  # noqa: E402
    ENCODINGS,
    ImageConversionError,
    array_to_image,
    image_to_array,
    image_to_rgb8,
)

# The kinds ImageConversionError documents; anything else is an undocumented failure.
KINDS = {"encoding", "size", "step", "short_data", "empty", "shape"}
FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UINT32 = 2 ** 32 - 1


def reference_rgb8(data: bytes, encoding: str, height: int, width: int, step: int,
                   big_endian: bool) -> np.ndarray:
    """Decode row by row with plain numpy (no strides tricks): the oracle."""
    enc = ENCODINGS[encoding]
    order = ">" if big_endian else "<"
    dtype = np.dtype(order + enc.dtype) if enc.itemsize > 1 else np.dtype(enc.dtype)
    rows = []
    for r in range(height):
        row = np.frombuffer(data[r * step: r * step + width * enc.pixel_bytes], dtype=dtype)
        rows.append(row.astype(dtype.newbyteorder("=")).reshape(width, enc.channels))
    pixels = np.stack(rows)
    if encoding == "rgb8":
        return pixels
    if encoding == "bgr8":
        return pixels[..., ::-1]
    if encoding == "mono8":
        return np.repeat(pixels, 3, axis=2)
    if encoding == "mono16":
        return np.repeat((pixels >> 8).astype(np.uint8), 3, axis=2)
    value = np.nan_to_num(pixels[..., 0].astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    gray = np.rint(np.clip(value, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


@st.composite
def image_messages(draw):
    """A message that is well formed, or damaged in one or more fields."""
    encoding = draw(st.sampled_from(sorted(ENCODINGS)) | st.sampled_from(
        ["", "RGB8", "rgba8", "bayer_rggb8", "16UC1", "rgb8\x00", "\u00e9ncoding"]))
    height = draw(st.integers(0, 6) | st.sampled_from([UINT32, 2 ** 31, 65536]))
    width = draw(st.integers(0, 6) | st.sampled_from([UINT32, 2 ** 31, 65536]))
    pixel_bytes = ENCODINGS[encoding].pixel_bytes if encoding in ENCODINGS else 3
    row = min(width * pixel_bytes, 64)
    step = draw(st.one_of(st.just(row), st.integers(row, row + 9), st.integers(0, 80),
                          st.sampled_from([UINT32, 2 ** 31])))
    step = min(step, UINT32)
    needed = min(step * min(height, 8), 600)
    size = draw(st.one_of(st.just(needed), st.integers(max(0, needed - 7), needed + 7),
                          st.integers(0, 64)))
    data = draw(st.binary(min_size=size, max_size=size))
    big_endian = draw(st.booleans())
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=big_endian,
                step=step)
    msg.data = array.array("B", data)
    return msg


@FUZZ
@given(msg=image_messages(), restrict=st.booleans())
def test_any_message_converts_exactly_or_raises_a_documented_error(msg, restrict):
    before = bytes(msg.data)
    size = (int(msg.height), int(msg.width)) if restrict else None
    try:
        rgb = image_to_rgb8(msg, None, size)
    except ImageConversionError as exc:
        assert exc.kind in KINDS, exc.kind
        assert str(exc)  # the message names the problem
    else:
        assert rgb.dtype == np.uint8 and rgb.shape == (msg.height, msg.width, 3)
        expected = reference_rgb8(before, msg.encoding, msg.height, msg.width, msg.step,
                                  msg.is_bigendian)
        np.testing.assert_array_equal(rgb, expected)
        assert not rgb.flags.writeable or not np.shares_memory(
            rgb, np.frombuffer(msg.data, np.uint8))
    assert bytes(msg.data) == before


@FUZZ
@given(msg=image_messages(), accepted=st.lists(st.sampled_from(sorted(ENCODINGS)), max_size=3),
       size=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_the_nodes_restrictions_refuse_with_the_right_kind(msg, accepted, size):
    """The node passes its accepted encodings and the policy's size: a message outside them is
    refused as 'encoding' or 'size' before its data is even looked at."""
    try:
        image_to_rgb8(msg, accepted, size)
    except ImageConversionError as exc:
        if msg.encoding not in accepted:
            assert exc.kind == "encoding"
        elif (msg.height, msg.width) != size:
            assert exc.kind == "size"
        else:
            assert exc.kind in KINDS - {"encoding", "size"}
    else:
        assert msg.encoding in accepted and (msg.height, msg.width) == size


@st.composite
def arrays_for_encodings(draw):
    encoding = draw(st.sampled_from(sorted(ENCODINGS)))
    enc = ENCODINGS[encoding]
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    shape = (h, w, enc.channels) if enc.channels > 1 else (h, w)
    n = int(np.prod(shape))
    if enc.dtype == "f4":
        values = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True),
                               min_size=n, max_size=n))
    else:
        top = 2 ** (8 * enc.itemsize) - 1
        values = draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
    return encoding, np.array(values, dtype=np.dtype(enc.dtype)).reshape(shape)


@FUZZ
@given(case=arrays_for_encodings(), pad=st.integers(0, 7), swap=st.booleans())
def test_round_trip_through_a_padded_message_in_either_byte_order(case, pad, swap):
    """array_to_image, then rows re-laid with padding and (maybe) the other byte order by hand:
    the decoded pixels are the array's."""
    encoding, pixels = case
    msg = array_to_image(pixels, encoding)
    np.testing.assert_array_equal(image_to_array(msg), pixels)
    enc = ENCODINGS[encoding]
    big = bool(msg.is_bigendian) != swap
    typed = pixels.astype(np.dtype(enc.dtype).newbyteorder(">" if big else "<"))
    rows = typed.reshape(pixels.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 0x5A, np.uint8)], axis=1)
    raw = Image(height=msg.height, width=msg.width, encoding=encoding, is_bigendian=big,
                step=padded.shape[1])
    raw.data = array.array("B", padded.tobytes())
    np.testing.assert_array_equal(image_to_array(raw), pixels)
    expected = reference_rgb8(padded.tobytes(), encoding, msg.height, msg.width,
                              padded.shape[1], big)
    np.testing.assert_array_equal(image_to_rgb8(raw), expected)


@FUZZ
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
       encoding=st.sampled_from(sorted(ENCODINGS)))
def test_array_to_image_refuses_arrays_of_the_wrong_shape(shape, encoding):
    pixels = np.zeros(shape, np.uint8)
    enc = ENCODINGS[encoding]
    fits = (len(shape) == 3 and shape[2] == enc.channels) if enc.channels > 1 else len(shape) == 2
    try:
        msg = array_to_image(pixels, encoding)
    except ImageConversionError as exc:
        if fits:  # the right shape but no pixels
            assert exc.kind == "empty" and 0 in shape[:2]
        else:
            assert exc.kind == "shape"
    else:
        assert fits and 0 not in shape and (msg.height, msg.width) == tuple(shape[:2])
