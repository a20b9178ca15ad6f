"""CameraWatch (the silent-camera check's arithmetic, no ROS): a camera slower than image_timeout
is not silent between its frames once its rate is known, one that stops is silent after five of
its periods, a fast one after image_timeout; a camera whose publishers leave is forgotten.
Times are given, not slept: the sequences are exact."""
import pytest

from qvla_ros.ros.camera_watch import SILENT_PERIODS, CameraWatch


def feed(watch: CameraWatch, period: float, count: int, start: float = 0.0,
         step: float = 0.1) -> tuple[float, list]:
    """`count` frames every `period` s from `start`, the graph checked every `step` s (one
    publisher). Returns the time after the last frame and the changes the checks reported."""
    changes, now = [], start
    for i in range(count):
        arrival = start + i * period
        while now < arrival:
            changes.append(watch.update(1, now))
            now = round(now + step, 9)
        watch.arrived(arrival)
    return now, [c for c in changes if c]


def test_a_camera_slower_than_the_timeout_is_not_silent_between_frames():
    watch = CameraWatch(timeout=0.5)
    # 0.5 Hz: each gap (2 s) is four timeouts. Its first gap, its rate unknown, is one silence.
    _, changes = feed(watch, period=2.0, count=10)
    assert changes[:2] == ["silent", "again"] and set(changes[2:]) == set(), changes
    assert watch.rate_hz == pytest.approx(0.5) and watch.limit == pytest.approx(5 * 2.0)
    # It stops, its publisher still there: silent after five of its periods, not before.
    # The last frame arrived at 18.0.
    assert watch.update(1, 18.0 + SILENT_PERIODS * 2.0 - 0.2) is None
    assert watch.update(1, 18.0 + SILENT_PERIODS * 2.0 + 0.2) == "silent" and watch.silent
    assert watch.quiet == pytest.approx(SILENT_PERIODS * 2.0 + 0.2)


def test_a_fast_camera_that_stops_is_silent_after_the_timeout():
    watch = CameraWatch(timeout=1.0)
    _, changes = feed(watch, period=1 / 30, count=60, step=0.01)
    assert changes == [] and watch.rate_hz == pytest.approx(30, rel=1e-3)
    assert watch.limit == 1.0  # five periods are 0.17 s: the timeout is the floor
    last = 59 / 30
    assert watch.update(1, last + 0.9) is None
    assert watch.update(1, last + 1.1) == "silent"
    watch.arrived(last + 1.2)
    assert watch.update(1, last + 1.25) == "again"


def test_a_camera_that_never_delivers_is_silent_after_the_timeout():
    watch = CameraWatch(timeout=3.0)
    assert watch.update(0, 0.0) is None  # no publisher: nothing expected
    assert watch.update(2, 1.0) is None  # publishers seen from here
    assert watch.update(2, 3.9) is None
    assert watch.update(2, 4.1) == "silent" and watch.period is None
    assert watch.update(0, 5.0) == "gone" and not watch.silent


def test_a_camera_that_comes_back_is_learnt_anew():
    watch = CameraWatch(timeout=0.5)
    feed(watch, period=4.0, count=5)
    assert watch.limit == pytest.approx(20.0)
    assert watch.update(0, 30.0) is None  # its publisher left (not silent then)
    assert watch.period is None and watch.limit == 0.5
    assert watch.update(1, 31.0) is None
    assert watch.update(1, 31.6) == "silent"  # a new camera: the timeout until two frames


def test_a_timeout_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        CameraWatch(timeout=0)
