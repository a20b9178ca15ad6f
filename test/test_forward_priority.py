"""ForwardPriority: background work (a plan reload's build) pauses while a forward runs and gets a
turn when it ends; a forward waits for that turn to end and no longer; back-to-back forwards
cannot starve the background, nor a forward longer than max_wait; other threads are left alone."""
import sys
import threading
import time

import pytest

from qvla_ros.ros.forward_priority import ForwardPriority


class Worker(threading.Thread):
    """Python calls in a loop (what a build is made of), counted; optionally under background()."""

    def __init__(self, priority: ForwardPriority, background: bool = True):
        super().__init__(daemon=True)
        self.priority, self.use_background = priority, background
        self.count = 0
        self.stop = threading.Event()
        self.started_work = threading.Event()
        self.profile_inside = self.profile_after = "unset"

    def step(self):
        self.count += 1

    def run(self):
        if not self.use_background:
            while not self.stop.is_set():
                self.step()
                self.started_work.set()
            return
        with self.priority.background():
            self.profile_inside = sys.getprofile()
            while not self.stop.is_set():
                self.step()
                self.started_work.set()
        self.profile_after = sys.getprofile()


def progress(worker: Worker, seconds: float) -> int:
    before = worker.count
    time.sleep(seconds)
    return worker.count - before


def test_background_waits_for_a_forward_then_gets_a_turn():
    priority = ForwardPriority(min_turn=0.01, share=0.5, max_wait=30.0)
    worker = Worker(priority)
    worker.start()
    assert worker.started_work.wait(5)
    assert progress(worker, 0.05) > 0
    with priority.forward():
        time.sleep(0.05)  # the worker's slice is over: it parks at its next call
        assert progress(worker, 0.2) == 0
    assert progress(worker, 0.2) > 0
    assert priority.waited >= 0.2 and priority.turns >= 1
    worker.stop.set()
    worker.join(5)
    assert worker.profile_inside is not None and worker.profile_after is None  # hook removed


def test_a_forward_waits_at_most_one_turn_and_forwards_back_to_back_leave_turns():
    # Forwards of 40 ms back to back (a policy slower than its frame rate): after each, the
    # background gets a turn of share * 40 = 20 ms, and the next forward waits for no more.
    priority = ForwardPriority(min_turn=0.005, share=0.5, max_wait=30.0)
    worker = Worker(priority)
    worker.start()
    assert worker.started_work.wait(5)
    delays, counts = [], []
    for _ in range(10):
        asked = time.monotonic()
        with priority.forward():
            delays.append(time.monotonic() - asked)
            counts.append(worker.count)
            time.sleep(0.04)
            assert worker.count - counts[-1] <= 1  # parked during the forward (one call at most)
    worker.stop.set()
    worker.join(5)
    # Each turn let the background run between forwards ...
    assert all(b > a for a, b in zip(counts, counts[1:])), counts
    assert priority.turns >= 9
    # ... and no forward waited much beyond one turn (20 ms; scheduling slack on a busy machine).
    assert max(delays[1:]) < 0.02 + 0.03, delays
    assert max(delays[1:]) > 0.01, delays  # the turns were taken: forwards did wait for them


def test_a_forward_longer_than_max_wait_does_not_hold_the_background():
    priority = ForwardPriority(min_turn=0.01, max_wait=0.05)
    worker = Worker(priority)
    worker.start()
    assert worker.started_work.wait(5)
    with priority.forward():  # one forward that never ends, as far as the worker can tell
        time.sleep(0.05)
        assert progress(worker, 0.5) > 0
    worker.stop.set()
    worker.join(5)


def test_a_background_that_ends_frees_a_waiting_forward_at_once():
    priority = ForwardPriority(poll=10.0, max_wait=30.0)  # steps of 10 s while no forward runs
    entered = threading.Event()
    done = threading.Event()

    def build():
        with priority.background():
            entered.set()
            done.wait(5)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    assert entered.wait(5)
    threading.Timer(0.1, done.set).start()
    asked = time.monotonic()
    with priority.forward():
        waited = time.monotonic() - asked
    thread.join(5)
    assert 0.05 < waited < 2.0, waited  # waited for the background's end, not its 10 s turn


def test_threads_outside_background_are_not_held():
    priority = ForwardPriority(max_wait=30.0)
    bystander = Worker(priority, background=False)
    with priority.forward():
        bystander.start()
        assert bystander.started_work.wait(5)
        assert progress(bystander, 0.1) > 0
    bystander.stop.set()
    bystander.join(5)
    assert sys.getprofile() is None


def test_settings_that_cannot_work_are_refused():
    for bad in ({"min_turn": 0}, {"share": -1}, {"poll": 0}, {"max_wait": 0}):
        with pytest.raises(ValueError, match="must be"):
            ForwardPriority(**bad)
