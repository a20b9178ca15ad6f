"""ForwardPriority: background work (a plan reload's build) pauses while a forward runs, resumes
when it ends, cannot be starved by back-to-back forwards, and leaves other threads alone."""
import sys
import threading
import time

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


def test_background_waits_for_a_forward_then_resumes():
    priority = ForwardPriority(max_wait=30.0)
    worker = Worker(priority)
    worker.start()
    assert worker.started_work.wait(5)
    assert progress(worker, 0.05) > 0
    with priority.forward():
        time.sleep(0.05)  # the worker reaches its next call and parks there
        assert progress(worker, 0.2) == 0
    assert progress(worker, 0.2) > 0
    assert priority.waited >= 0.2
    worker.stop.set()
    worker.join(5)
    assert worker.profile_inside is not None and worker.profile_after is None  # hook removed


def test_forwards_back_to_back_cannot_starve_background_work():
    priority = ForwardPriority(max_wait=0.05, free_slice=0.05)
    worker = Worker(priority)
    worker.start()
    assert worker.started_work.wait(5)
    with priority.forward():  # one forward that never ends, as far as the worker can tell
        assert progress(worker, 0.5) > 0
    worker.stop.set()
    worker.join(5)


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
