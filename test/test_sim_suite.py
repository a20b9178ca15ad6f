"""The benchmark's suite, seed rules and statistics (no simulation)."""
import math

import pytest
from language_world import TASK_DESCRIPTIONS
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import ENV_POLICY_MAP

from qvla_ros.sim.metrics import wilson_interval
from qvla_ros.sim.suite import (EVAL_SEED_BASE, SCENE_PAIRS, TASK_NAMES, TASKS, demo_seed, eval_seed,
                                get_task, is_eval_seed, resolve_tasks)


def test_suite_has_ten_metaworld_tasks_with_experts():
    assert len(TASKS) == 10 and len(set(TASK_NAMES)) == 10
    for spec in TASKS:
        assert spec.env_name in ALL_V3_ENVIRONMENTS
        assert spec.env_name in ENV_POLICY_MAP


def test_instructions_are_language_worlds_sentence_for_each_task():
    for spec in TASKS:
        assert spec.instruction == TASK_DESCRIPTIONS[spec.name]
    # Tasks that share a scene must be told apart by their words.
    for pair in SCENE_PAIRS:
        sentences = {get_task(name).instruction for name in pair}
        assert len(sentences) == len(pair)


def test_the_policys_default_vocabulary_is_the_suites_instructions():
    # policy/ keeps its own copy (the policy must not import the simulation stage)
    from qvla_ros.policy.processing_vla import DEFAULT_INSTRUCTIONS

    assert DEFAULT_INSTRUCTIONS == tuple(t.instruction for t in TASKS)


def test_at_least_three_same_scene_pairs():
    assert sum(len(p) >= 2 for p in SCENE_PAIRS) >= 3
    assert ("faucet-open", "faucet-close") in SCENE_PAIRS


def test_task_lookup_and_unknown_names():
    assert get_task("drawer-open-v3") is get_task("drawer-open")
    assert [s.name for s in resolve_tasks("faucet-open, door-close")] == ["faucet-open", "door-close"]
    with pytest.raises(ValueError, match="unknown task 'drawer-opne'"):
        get_task("drawer-opne")
    with pytest.raises(ValueError, match="twice"):
        resolve_tasks(["door-open", "door-open"])


def test_demo_and_eval_seed_ranges_are_disjoint():
    demo = {demo_seed(k) for k in range(1000)}
    held_out = {eval_seed(k) for k in range(1000)} | {eval_seed(k, offset=5000) for k in range(10)}
    assert not demo & held_out
    assert all(is_eval_seed(s) for s in held_out) and not any(is_eval_seed(s) for s in demo)
    with pytest.raises(ValueError):
        demo_seed(EVAL_SEED_BASE)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (49, 50), (1, 3)])
def test_wilson_interval_contains_rate_and_matches_score_test(k, n):
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # The Wilson bounds are the rates p0 at which the score test sits exactly at z = 1.96.
    z = 1.959964
    for p0 in (lo, hi):
        if 0 < p0 < 1:
            assert abs(abs(k / n - p0) / math.sqrt(p0 * (1 - p0) / n) - z) < 1e-6


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(4, 3)
