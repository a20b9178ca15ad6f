"""qvla_ros.ros.action_queue without ROS: chunks in, one action per control tick out."""
import math

import numpy as np
import pytest

from qvla_ros.ros.action_queue import ActionQueue

RATE = 10.0  # period 0.1 s
P = 1 / RATE


def chunk(base: float, horizon: int = 5, dim: int = 2) -> np.ndarray:
    """Row k = base + k in every dimension (dimension d adds 100 d), so a row names its step."""
    return (base + np.arange(horizon)[:, None] + 100 * np.arange(dim)[None, :]).astype(np.float32)


def test_the_module_has_no_ros():
    import qvla_ros.ros.action_queue as mod

    assert "rclpy" not in open(mod.__file__).read()


def test_nothing_before_the_first_chunk():
    q = ActionQueue(RATE)
    assert q.next(0.0) is None and q.next(0.1) is None


def test_latest_steps_one_row_per_tick_and_skips_the_latency():
    q = ActionQueue(RATE, "latest", stale_after=10)
    # Image arrived at t=1.0, chunk ready at 1.25: 2.5 periods went by, steps 0 and 1 are past.
    q.add(chunk(0), start=1.0, now=1.25, header="h0", plan_id="p")
    got = [q.next(1.25 + i * P) for i in range(3)]
    assert [a.step for a in got] == [2, 3, 4]
    np.testing.assert_array_equal(got[0].values, [2, 102])
    assert got[0].header == "h0" and got[0].plan_id == "p" and not got[0].stale
    assert math.isclose(got[0].age, 0.25)


def test_latest_advances_by_ticks_not_by_clock_jitter():
    q = ActionQueue(RATE, "latest", stale_after=10)
    q.add(chunk(0, horizon=8), start=0.0, now=0.0)
    # Ticks late or early by 40% of a period: still one step each.
    times = [0.0, 0.14, 0.16, 0.34, 0.36]
    assert [q.next(t).step for t in times] == [0, 1, 2, 3, 4]


def test_latest_switches_to_a_new_chunk_at_once():
    q = ActionQueue(RATE, "latest", stale_after=10)
    q.add(chunk(0), start=0.0, now=0.0, header="a")
    assert q.next(0.0).values[0] == 0 and q.next(0.1).values[0] == 1
    q.add(chunk(50), start=0.15, now=0.18, header="b")
    a = q.next(0.2)  # b's image came 0.05 s ago: its step 0
    assert a.header == "b" and a.values[0] == 50 and a.chunks == 1


def test_temporal_ensemble_weights_exp_minus_m_i_oldest_first():
    m = 0.5
    q = ActionQueue(RATE, "temporal_ensemble", ensemble_m=m, stale_after=10)
    a, b, c = chunk(0), chunk(10), chunk(20)
    q.add(a, start=0.0, now=0.0, header="a")
    assert q.next(0.0).values[0] == 0  # one chunk: its row as is
    q.add(b, start=0.1, now=0.1, header="b")
    q.add(c, start=0.1, now=0.1, header="c")
    got = q.next(0.1)
    w = np.exp(-m * np.arange(3))
    rows = np.stack([a[1], b[0], c[0]])
    np.testing.assert_allclose(got.values, (w[:, None] * rows).sum(0) / w.sum(), rtol=1e-6)
    assert got.chunks == 3 and got.header == "c" and got.step == 0
    # m = 0 would be a plain mean; the weights favour the oldest prediction for m > 0.
    assert got.values[0] < rows[:, 0].mean()


def test_temporal_ensemble_drops_exhausted_chunks():
    q = ActionQueue(RATE, "temporal_ensemble", ensemble_m=0.0, stale_after=10)
    q.add(chunk(0, horizon=2), start=0.0, now=0.0)
    q.add(chunk(10, horizon=4), start=0.0, now=0.0)
    assert q.next(0.0).values[0] == 5  # mean of rows 0: 0 and 10
    assert q.next(0.1).values[0] == 6  # mean of 1 and 11
    only = q.next(0.2)  # the first has no step 2
    assert only.chunks == 1 and only.values[0] == 12


def test_negative_m_favours_the_newest():
    q = ActionQueue(RATE, "temporal_ensemble", ensemble_m=-2.0, stale_after=10)
    q.add(chunk(0), start=0.0, now=0.0)
    q.add(chunk(10), start=0.0, now=0.0)
    v = q.next(0.0).values[0]
    assert 5 < v < 10 and math.isclose(v, 10 * math.exp(2) / (1 + math.exp(2)), rel_tol=1e-6)


@pytest.mark.parametrize("on_stale", ["hold", "zero"])
def test_stale_after_seconds_holds_or_zeroes(on_stale):
    q = ActionQueue(RATE, "latest", stale_after=0.25, on_stale=on_stale)
    q.add(chunk(0, horizon=50), start=0.0, now=0.0, header="h")
    steps = [q.next(i * P) for i in range(4)]  # 0.0 .. 0.3
    assert [s.stale for s in steps] == [False, False, False, True]
    held = steps[-1]
    expected = steps[2].values if on_stale == "hold" else np.zeros(2, np.float32)
    np.testing.assert_array_equal(held.values, expected)
    assert held.header == "h" and q.stale and q.stale_ticks == 1
    assert math.isclose(held.age, 0.3)
    # A fresh chunk ends the stale state.
    q.add(chunk(7, horizon=50), start=0.35, now=0.39)
    fresh = q.next(0.4)
    assert not fresh.stale and fresh.values[0] == 7 and not q.stale


def test_an_exhausted_chunk_is_stale_before_stale_after():
    q = ActionQueue(RATE, "latest", stale_after=10, on_stale="zero")
    q.add(chunk(3, horizon=2), start=0.0, now=0.0)
    assert [q.next(t).values[0] for t in (0.0, 0.1)] == [3, 4]
    assert q.next(0.2).stale and q.next(0.2).values.tolist() == [0, 0]


def test_a_chunk_whose_steps_all_passed_during_the_forward_is_never_used():
    q = ActionQueue(RATE, "latest", stale_after=10, on_stale="hold")
    q.add(chunk(0, horizon=3), start=0.0, now=0.0)
    assert q.next(0.0).values[0] == 0
    q.add(chunk(90, horizon=3), start=0.05, now=0.6)  # 5 periods late: every step is past
    a = q.next(0.6)
    assert a.stale and a.values[0] == 0  # held, not row 90+


@pytest.mark.parametrize("kwargs", [dict(rate_hz=0), dict(aggregation="mean"),
                                    dict(on_stale="brake"), dict(ensemble_m=math.nan),
                                    dict(stale_after=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ActionQueue(**{"rate_hz": RATE, **kwargs})


def test_bad_chunks_are_refused():
    q = ActionQueue(RATE)
    with pytest.raises(ValueError):
        q.add(np.zeros(4), start=0, now=0)
    q.add(np.zeros((3, 4)), start=0, now=0)
    with pytest.raises(ValueError):
        q.add(np.zeros((3, 5)), start=0, now=0)


def test_clear_forgets_chunks_and_the_last_action():
    q = ActionQueue(RATE, "temporal_ensemble", stale_after=10)
    q.add(chunk(0), start=0.0, now=0.0)
    assert q.next(0.0) is not None
    q.clear()
    assert q.next(0.1) is None and not q.stale
