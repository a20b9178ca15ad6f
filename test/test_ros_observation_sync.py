"""ObservationSync, the part of the policy node that pairs separately arriving messages into one
observation: partners by stamp, waiting for late ones, dropping stale frames, bounded memory."""
import threading
import time

import numpy as np
import pytest

from qvla_ros.ros.observation_sync import Dropped, Observation, ObservationSync, Stamped


def frame(stamp: float, value: int = 0) -> Stamped:
    return Stamped(stamp=stamp, value=np.full((2, 2, 3), value, np.uint8), arrival=time.monotonic())


def state(stamp: float, value: float = 0.0) -> Stamped:
    return Stamped(stamp=stamp, value=np.full(4, value, np.float32), arrival=time.monotonic())


def ready_sync(**kwargs) -> ObservationSync:
    sync = ObservationSync(n_cams=2, **kwargs)
    sync.put_instruction("open the drawer")
    return sync


def test_partners_are_the_messages_stamped_like_the_frame():
    sync = ready_sync(tolerance=0.0, timeout=0.1)
    for t in (1.0, 2.0, 3.0):
        sync.put_proprio(state(t, value=t))
        sync.put_image(1, frame(t, value=int(t)))
    sync.put_image(0, frame(2.0, value=20))
    obs = sync.next()
    assert isinstance(obs, Observation)
    assert obs.primary.stamp == 2.0 and obs.instruction == "open the drawer"
    assert obs.images.shape == (2, 2, 2, 3)
    assert obs.images[0, 0, 0, 0] == 20 and obs.images[1, 0, 0, 0] == 2
    assert obs.proprio[0] == 2.0


def test_waits_for_a_partner_that_arrives_after_the_frame():
    sync = ready_sync(tolerance=0.0, timeout=5.0)
    sync.put_proprio(state(1.0))
    sync.put_image(1, frame(1.0))
    sync.put_image(0, frame(2.0))  # proprio and image2 of t=2 are still on their way
    late = threading.Timer(0.2, lambda: (sync.put_proprio(state(2.0, 7.0)),
                                         sync.put_image(1, frame(2.0, 7))))
    late.start()
    start = time.monotonic()
    obs = sync.next()
    assert 0.15 < time.monotonic() - start < 4.0
    assert obs.proprio[0] == 7.0 and obs.images[1, 0, 0, 0] == 7


def test_missing_partner_drops_the_frame_with_its_reason():
    sync = ready_sync(tolerance=0.05, timeout=0.1)
    sync.put_image(1, frame(1.0))
    sync.put_image(0, frame(1.0))
    dropped = sync.next()
    assert isinstance(dropped, Dropped) and dropped.kind == "no_proprio"
    assert dropped.message == "no valid proprio received yet"
    sync.put_proprio(state(0.5))
    sync.put_image(0, frame(1.0))
    dropped = sync.next()
    assert dropped.kind == "no_proprio"
    assert "no proprio stamped within 0.05 s of the image (1.000 s; nearest 0.500 s)" in dropped.message


def test_no_instruction_yet():
    sync = ObservationSync(n_cams=1, timeout=0.05)
    sync.put_proprio(state(1.0))
    sync.put_image(0, frame(1.0))
    assert sync.next() == Dropped("no_instruction", "no instruction received yet")


def test_negative_tolerance_takes_the_newest_whatever_its_stamp():
    sync = ready_sync(tolerance=-1.0, timeout=0.1)
    sync.put_proprio(state(0.0, 1.0))
    sync.put_proprio(state(0.0, 2.0))
    sync.put_image(1, frame(0.0, 5))
    sync.put_image(0, frame(123.0))
    obs = sync.next()
    assert obs.proprio[0] == 2.0 and obs.images[1, 0, 0, 0] == 5


def test_a_slow_consumer_gets_the_newest_frame_and_stale_ones_are_counted():
    sync = ObservationSync(n_cams=1, tolerance=-1.0)
    sync.put_instruction("go")
    sync.put_proprio(state(0.0))
    for t in range(10):
        sync.put_image(0, frame(float(t)))
    assert sync.next().primary.stamp == 9.0
    assert sync.dropped == 9
    # Nothing new: next() waits instead of serving the same frame twice.
    result = []
    consumer = threading.Thread(target=lambda: result.append(sync.next()))
    consumer.start()
    time.sleep(0.1)
    assert not result
    sync.put_image(0, frame(10.0))
    consumer.join(timeout=5)
    assert result[0].primary.stamp == 10.0


def test_proprio_history_is_bounded_and_clearable():
    sync = ObservationSync(n_cams=1, tolerance=0.0, timeout=0.05)
    sync.put_instruction("go")
    for t in range(1000):
        sync.put_proprio(state(float(t)))
    assert len(sync._proprio) <= 64
    sync.clear_proprio()
    sync.put_image(0, frame(999.0))
    assert sync.next().kind == "no_proprio"


def test_not_before_holds_the_frame_until_the_rate_tick():
    sync = ObservationSync(n_cams=1, tolerance=-1.0)
    sync.put_instruction("go")
    sync.put_proprio(state(0.0))
    sync.put_image(0, frame(1.0))
    start = time.monotonic()
    assert sync.next(not_before=start + 0.2).primary.stamp == 1.0
    assert time.monotonic() - start >= 0.19


def test_stop_releases_a_waiting_consumer():
    sync = ObservationSync(n_cams=1)
    result = []
    consumer = threading.Thread(target=lambda: result.append(sync.next()))
    consumer.start()
    sync.stop()
    consumer.join(timeout=5)
    assert result == [None]


def test_cameras_of_different_sizes_are_refused():
    sync = ready_sync(tolerance=-1.0, timeout=0.05)
    sync.put_proprio(state(0.0))
    sync.put_image(1, Stamped(0.0, np.zeros((4, 4, 3), np.uint8), 0.0))
    sync.put_image(0, frame(0.0))
    assert sync.next().kind == "camera_sizes"


def test_needs_a_camera():
    with pytest.raises(ValueError, match="n_cams must be >= 1"):
        ObservationSync(n_cams=0)


def test_an_older_partner_inside_the_tolerance_waits_for_the_frames_own_partner():
    # 30 Hz cameras, 50 ms tolerance: camera 2's previous frame (33 ms older) matches, but its frame
    # of this instant is one transport delay away and must win.
    sync = ready_sync(tolerance=0.05, timeout=2.0)
    sync.put_proprio(state(1.040))
    sync.put_image(1, frame(1.000, value=1))
    sync.put_image(0, frame(1.033, value=9))
    late = threading.Timer(0.003, lambda: sync.put_image(1, frame(1.034, value=2)))
    late.start()
    obs = sync.next()
    late.join()
    assert isinstance(obs, Observation)
    assert obs.images[1, 0, 0, 0] == 2


def test_a_provisional_partner_is_taken_after_the_stamp_gap_not_the_timeout():
    # Nothing closer comes: the older frame is the answer once a closer one could have arrived.
    sync = ready_sync(tolerance=0.05, timeout=5.0)
    sync.put_proprio(state(1.040))
    sync.put_image(1, frame(1.000, value=1))
    start = time.monotonic()
    sync.put_image(0, frame(1.033, value=9))
    obs = sync.next()
    waited = time.monotonic() - start
    assert isinstance(obs, Observation) and obs.images[1, 0, 0, 0] == 1
    assert 0.033 <= waited < 1.0


def test_partners_stamped_after_the_frame_are_final_at_once():
    sync = ready_sync(tolerance=0.05, timeout=5.0)
    sync.put_proprio(state(0.990))
    sync.put_proprio(state(1.005, value=3.0))
    sync.put_image(1, frame(0.998, value=1))
    sync.put_image(1, frame(1.001, value=2))
    start = time.monotonic()
    sync.put_image(0, frame(1.000, value=9))
    obs = sync.next()
    assert time.monotonic() - start < 0.02
    assert obs.images[1, 0, 0, 0] == 2 and obs.proprio[0] == 3.0
