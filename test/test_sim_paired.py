"""Paired comparisons on shared seeds: the exact McNemar test and the paired bootstrap."""
from math import comb

import numpy as np
import pytest

from qvla_ros.sim.paired import compare_paired, mcnemar_exact, outcomes_of, pair_outcomes, paired_bootstrap


def _outcomes(rows):
    """{task: {seed: success}} from (task, [successes]) with seeds 0..n-1."""
    return {task: dict(enumerate(map(bool, flags))) for task, flags in rows}


def _two_sided_binomial(k, n):
    tail = sum(comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("a_only, b_only", [(4, 0), (6, 1), (6, 0), (3, 3), (10, 2)])
def test_mcnemar_counts_only_discordant_pairs(a_only, b_only):
    # 20 pairs where both succeed and 5 where both fail: they must not move the test.
    a = [1] * a_only + [0] * b_only + [1] * 20 + [0] * 5
    b = [0] * a_only + [1] * b_only + [1] * 20 + [0] * 5
    result = mcnemar_exact(pair_outcomes(_outcomes([("t", a)]), _outcomes([("t", b)])))
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    assert result["p_value"] == pytest.approx(_two_sided_binomial(a_only, a_only + b_only))


def test_the_project_s_reported_splits_do_not_resolve():
    """4-0, 6-1 and 6-0 (issue #19's discordant pairs, float vs QVLA) are p = 0.125, 0.125, 0.031."""
    for (w, l), p in (((4, 0), 0.125), ((6, 1), 0.125), ((6, 0), 0.03125)):
        pairs = {"t": np.array([[1, 0]] * w + [[0, 1]] * l, dtype=bool)}
        assert mcnemar_exact(pairs)["p_value"] == pytest.approx(p)


def test_identical_evaluations_differ_by_nothing():
    rng = np.random.default_rng(0)
    same = _outcomes([(f"task{i}", rng.random(30) < 0.7) for i in range(4)])
    result = compare_paired(same, same, resamples=500)
    assert result["difference"] == 0 and result["ci"] == [0.0, 0.0]
    assert result["p_value"] == 1.0 and result["episodes"] == 120


def test_bootstrap_interval_resolves_a_real_gap_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.random((5, 100)) < 0.6
    better = base | (rng.random((5, 100)) < 0.3)       # a policy that also wins ~12% more episodes
    noisy = base ^ (rng.random((5, 100)) < 0.02)         # the same policy, 2% of episodes flipped
    a = _outcomes([(f"t{i}", better[i]) for i in range(5)])
    b = _outcomes([(f"t{i}", base[i]) for i in range(5)])
    c = _outcomes([(f"t{i}", noisy[i]) for i in range(5)])
    gap = paired_bootstrap(pair_outcomes(a, b), resamples=2000)
    assert gap["ci"][0] > 0 and gap["ci"][0] <= gap["difference"] <= gap["ci"][1]
    assert gap["difference"] == pytest.approx((better.sum() - base.sum()) / 500)
    flat = paired_bootstrap(pair_outcomes(c, b), resamples=2000)
    assert flat["ci"][0] < 0 < flat["ci"][1] or flat["ci"] == [0.0, 0.0]


def test_resampling_stays_within_tasks():
    """A task where both always agree adds no spread; only the discordant task's pairs vary."""
    pairs = {"agree": np.ones((50, 2), dtype=bool), "split": np.array([[1, 0], [0, 1]] * 25, dtype=bool)}
    boot = paired_bootstrap(pairs, resamples=2000, seed=3)
    only_split = paired_bootstrap({"split": pairs["split"]}, resamples=2000, seed=3)
    # The agreeing task draws nothing, so the split task's draws are the same in both calls and
    # the 50 agreeing pairs exactly halve every resampled difference.
    assert boot["ci"] == pytest.approx([x / 2 for x in only_split["ci"]], rel=0, abs=1e-12)
    assert only_split["ci"][0] < 0 < only_split["ci"][1]


def test_unmatched_evaluations_are_refused():
    a = _outcomes([("t1", [1, 0, 1]), ("t2", [1, 1, 1])])
    with pytest.raises(ValueError, match="different tasks"):
        pair_outcomes(a, _outcomes([("t1", [1, 0, 1])]))
    with pytest.raises(ValueError, match="t2: the evaluations ran different seeds"):
        pair_outcomes(a, _outcomes([("t1", [1, 0, 1]), ("t2", [1, 1])]))
    with pytest.raises(ValueError, match="appears twice"):
        outcomes_of([{"task": "t", "seed": 1, "success": True}, {"task": "t", "seed": 1, "success": False}])
    with pytest.raises(ValueError, match="no episodes"):
        pair_outcomes({"t": {}}, {"t": {}})
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(pair_outcomes(a, a), resamples=10)


def test_outcomes_of_episode_records():
    eps = [{"task": "reach", "seed": 7, "success": True, "steps": 40},
           {"task": "reach", "seed": 9, "success": False, "steps": 150}]
    assert outcomes_of(eps) == {"reach": {7: True, 9: False}}
