"""rank_agreement: proxy vs exact inside each layer and width, beside a random channel order (the
null). Identical tables agree fully; a permuted table scores like the null and fails the bounds;
a pooled Spearman over layers and widths passes a random order, which is why it is not the check."""
import numpy as np
import pytest

from qvla_ros.quant.sensitivity import SensitivityError, SensitivityTable, rank_agreement

BITS = (0, 2, 4, 8, 16)


def toy_table(rng, layers=8, channels=40):
    """Costs with the structure of a real table: a large scale between layers and between widths,
    a per-channel factor shared by all widths, and a little per-width noise."""
    width_scale = np.array([[1.0, 1e-1, 1e-2, 1e-4, 0.0]])
    costs = {}
    for i in range(layers):
        channel = rng.lognormal(sigma=1.0, size=(channels, 1))
        costs[f"l{i}"] = 10.0 ** (i - 4) * channel * width_scale * rng.lognormal(sigma=0.2, size=(channels, 5))
    return SensitivityTable(BITS, costs, {k: 16 for k in costs}, {})


def permuted(table, rng):
    """The same values, in a random channel order inside every layer (all widths moved together,
    as a proxy that knew each layer's scale but nothing about its channels would be)."""
    return SensitivityTable(table.bits, {k: v[rng.permutation(v.shape[0])] for k, v in table.costs.items()},
                            dict(table.in_features), {})


def assert_cells_agree(agreement, min_spearman, min_overlap):
    """The bound the policy tests use: EVERY (layer, width) cell above both thresholds and above
    its own null's 95th percentile."""
    assert agreement["summary"]["cells"] > 0
    for name, per in agreement["cells"].items():
        for b, c in per.items():
            assert c["spearman"] >= min_spearman and c["spearman_beats_null"], (name, b, c["spearman"])
            assert c["overlap"] >= min_overlap and c["overlap_beats_null"], (name, b, c["overlap"])


def test_identical_tables_agree_fully_and_beat_the_null():
    ref = toy_table(np.random.default_rng(0))
    a = rank_agreement(ref, ref, null_draws=300)
    assert a["summary"]["cells"] == 8 * 4          # 16 bits skipped
    assert a["summary"]["spearman_min"] == pytest.approx(1.0)
    assert a["summary"]["overlap_min"] == 1.0
    assert a["summary"]["both_beat_null"] == 1.0
    cell = a["cells"]["l0"][2]
    assert cell["channels"] == 40 and cell["top_k"] == 4
    # null of a random order: Spearman ~0, overlap ~k/n
    assert abs(cell["spearman_null_mean"]) < 0.1
    assert cell["overlap_null_mean"] == pytest.approx(4 / 40, abs=0.05)
    assert cell["spearman_p"] == pytest.approx(1 / 301)
    assert_cells_agree(a, 0.95, 0.75)


def test_permuted_table_scores_like_the_null_and_fails_the_bound():
    rng = np.random.default_rng(1)
    ref = toy_table(rng)
    est = permuted(ref, rng)
    a = rank_agreement(ref, est, null_draws=300)
    s = a["summary"]
    assert abs(s["spearman_median"]) < 0.15
    assert s["spearman_beats_null"] <= 0.15 and s["overlap_beats_null"] <= 0.15
    assert s["both_beat_null"] <= 0.05
    # the pooled statistic (what compare_tables' "overall" is) passes a random order ...
    assert s["pooled_spearman"] > 0.9
    assert s["pooled_spearman_null_mean"] > 0.9
    # ... the within-cell bound does not
    with pytest.raises(AssertionError):
        assert_cells_agree(a, 0.95, 0.75)


def test_random_orders_stay_below_the_bounds_the_policy_tests_use():
    """Over many random orders, no cell of 32 channels reaches the bounds of
    test_quant_sensitivity (Spearman >= 0.85 and top-10% overlap >= 0.75)."""
    rng = np.random.default_rng(2)
    ref = toy_table(rng, layers=4, channels=32)
    best_rho, passing, total = -1.0, 0, 0
    for _ in range(25):
        a = rank_agreement(ref, permuted(ref, rng), null_draws=50, seed=int(rng.integers(1 << 30)))
        for per in a["cells"].values():
            for c in per.values():
                total += 1
                best_rho = max(best_rho, c["spearman"])
                passing += c["spearman"] >= 0.85 and c["overlap"] >= 0.75
    assert total == 25 * 4 * 4
    assert best_rho < 0.85 and passing == 0


def test_a_noisy_but_informative_estimate_beats_the_null():
    rng = np.random.default_rng(3)
    ref = toy_table(rng)
    noisy = SensitivityTable(BITS, {k: v * rng.lognormal(sigma=0.5, size=v.shape) for k, v in ref.costs.items()},
                             dict(ref.in_features), {})
    s = rank_agreement(ref, noisy, null_draws=300)["summary"]
    assert 0.6 < s["spearman_median"] < 0.99
    assert s["spearman_beats_null"] == 1.0
    assert s["overlap_beats_null"] >= 0.5


def test_unmeasured_channels_and_small_cells_and_bad_arguments():
    rng = np.random.default_rng(4)
    ref = toy_table(rng, layers=2, channels=40)
    sparse = {k: v.copy() for k, v in ref.costs.items()}
    sparse["l0"][10:] = np.nan            # 10 measured: kept (k = 1)
    sparse["l1"][5:] = np.nan             # 5 measured: below min_channels, left out
    a = rank_agreement(SensitivityTable(BITS, sparse, dict(ref.in_features), {}), ref, null_draws=20)
    assert set(a["cells"]) == {"l0"}
    assert a["cells"]["l0"][0]["channels"] == 10 and a["cells"]["l0"][0]["top_k"] == 1
    for bad in ({"top": 0.0}, {"top": 1.5}, {"null_draws": 0}):
        with pytest.raises(SensitivityError):
            rank_agreement(ref, ref, **bad)
