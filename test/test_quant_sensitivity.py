"""Action-space sensitivity: the exact estimator equals a brute-force re-run, the jacobian one ranks
like it, the table round-trips."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from qvla_ros.policy import make_policy
from qvla_ros.quant.action_error import action_error
from qvla_ros.quant.calibration import CalibrationFrames, synthetic_frames
from qvla_ros.quant.quantizer import fake_quantize_rows
from qvla_ros.quant.sensitivity import (SensitivityError, SensitivityTable, compare_tables,
                                        rank_agreement,
                                        exact_sensitivity, jacobian_sensitivity, layer_local_sensitivity,
                                        rescale_to_exact)


LAYERS = ["vision.0.encoder.layers.0.mlp.fc1", "decoder.layers.1.self_attn.v_proj", "decoder.layers.0.mlp.down_proj"]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return make_policy("micro", seed=0)


@pytest.fixture(scope="module")
def frames(policy):
    return synthetic_frames(policy.config, 2, seed=1)


def brute_force(policy, frames, layer, channel, bits):
    """Quantize one row in a copy of the policy and measure the action change directly."""
    perturbed = copy.deepcopy(policy)
    linear = perturbed.get_submodule(layer)
    with torch.no_grad():
        reference = policy(*frames.inputs())
        w = linear.weight[channel:channel + 1]
        linear.weight[channel] = fake_quantize_rows(w, bits)[0]
        out = perturbed(*frames.inputs())
    return action_error(out, reference)


def test_exact_matches_brute_force(policy, frames):
    channels = {LAYERS[0]: np.array([17]), LAYERS[1]: np.array([5]), LAYERS[2]: np.array([0])}
    table = exact_sensitivity(policy, frames, bits=(0, 2, 4, 16), layers=LAYERS, channels=channels,
                              progress=False)
    assert table.meta["replay_max_abs_error"] < 1e-5
    for layer, idx in channels.items():
        for c in idx:
            for bits in (0, 4):
                expected = brute_force(policy, frames, layer, int(c), bits)
                got = table.costs[layer][c, table.column(bits)]
                assert got == pytest.approx(expected, rel=2e-3, abs=1e-12), (layer, c, bits)
            assert table.costs[layer][c, table.column(16)] == 0.0
        unmeasured = np.setdiff1d(np.arange(table.costs[layer].shape[0]), idx)
        assert np.isnan(table.costs[layer][unmeasured]).all()


def assert_cells_agree(agreement, min_spearman, min_overlap):
    """Inside EVERY (layer, width) cell: Spearman and top-10% overlap with exact at least these,
    and above the 95th percentile of a random channel order of that cell. A random order does not
    pass (test_proxy_bounds_fail_for_a_random_channel_order); a pooled Spearman over layers and
    widths would (the scale between them alone gives ~0.9)."""
    assert agreement["summary"]["cells"] > 0
    for name, per in agreement["cells"].items():
        for b, c in per.items():
            assert c["spearman"] >= min_spearman and c["spearman_beats_null"], (name, b, c["spearman"])
            assert c["overlap"] >= min_overlap and c["overlap_beats_null"], (name, b, c["overlap"])


@pytest.fixture(scope="module")
def exact_sample(policy, frames):
    layers = LAYERS[1:]
    channels = {name: np.arange(32) for name in layers}
    return exact_sensitivity(policy, frames, bits=(0, 2, 4, 16), layers=layers, channels=channels,
                             progress=False)


def shuffled_channels(table, exact, rng):
    """`table` with its channel order randomized inside each layer among the channels `exact`
    measured (the scale of each layer and width kept): the null the bounds must reject."""
    costs = {}
    for name, t in table.costs.items():
        out = t.copy()
        if name in exact.costs:
            idx = np.flatnonzero(exact.measured(name))
            out[idx] = t[rng.permutation(idx)]
        costs[name] = out
    return SensitivityTable(table.bits, costs, dict(table.in_features), {})


@pytest.fixture(scope="module")
def jacobian_table(policy, frames):
    return jacobian_sensitivity(policy, frames, bits=(0, 2, 4, 8, 16), layers=LAYERS[1:], progress=False)


def test_jacobian_ranks_like_exact_and_table_roundtrips(policy, frames, exact_sample, jacobian_table, tmp_path):
    layers = LAYERS[1:]
    exact, jac = exact_sample, jacobian_table
    assert np.isfinite(jac.costs[layers[0]]).all()
    assert (jac.costs[layers[0]][:, jac.column(16)] == 0).all()
    # the cost falls with the width for (nearly) every channel
    c = jac.costs[layers[0]]
    assert np.mean(c[:, jac.column(2)] > c[:, jac.column(4)]) > 0.9
    agreement = rank_agreement(exact, jac, null_draws=400)
    assert agreement["summary"]["cells"] == 2 * 3          # 2 layers x widths 0, 2, 4
    assert compare_tables(exact, jac)["entries"] == 2 * 32 * 3
    assert_cells_agree(agreement, min_spearman=0.95, min_overlap=0.75)
    # random projections estimate the same quantity, less precisely
    rnd = jacobian_sensitivity(policy, frames, bits=(2, 4), layers=layers[:1], projections=8, progress=False)
    assert_cells_agree(rank_agreement(exact, rnd, null_draws=400), min_spearman=0.85, min_overlap=0.75)
    path = jac.save(tmp_path / "s.safetensors")
    back = SensitivityTable.load(path)
    assert back.bits == jac.bits and back.meta["estimator"] == "jacobian"
    for name in layers:
        assert np.array_equal(back.costs[name], jac.costs[name])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SensitivityError, match="not a readable sensitivity table"):
        SensitivityTable.load(tmp_path / "bad.safetensors")


class TwiceTower(nn.Module):
    """A stand-in policy that calls one encoder twice (per camera) before a perturbed head layer,
    so replay must serve repeated calls and pass-through inputs correctly."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.GELU())
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 6)

    def forward(self, images, instruction, proprio):
        x = images.float().flatten(2)[..., :12] / 255.0
        feats = torch.cat([self.encoder(x[:, 0]), self.encoder(x[:, 1])], dim=-1)
        return self.out(torch.tanh(self.mix(feats))).reshape(-1, 2, 3)


def test_replay_generic_module_and_bad_layer():
    torch.manual_seed(0)
    model = TwiceTower().eval()
    gen = torch.Generator().manual_seed(0)
    frames = CalibrationFrames(torch.randint(0, 256, (3, 2, 2, 2, 3), generator=gen, dtype=torch.uint8),
                               ["a", "b", "c"], torch.zeros(3, 4))
    table = exact_sensitivity(model, frames, bits=(0, 4), layers=["mix", "encoder.0"], progress=False)
    for layer in ("mix", "encoder.0"):
        for c in (0, 7):
            expected = brute_force(model, frames, layer, c, 4)
            assert table.costs[layer][c, 1] == pytest.approx(expected, rel=2e-3, abs=1e-14)
    with pytest.raises(SensitivityError, match="not a Linear"):
        exact_sensitivity(model, frames, layers=["nope"], progress=False)


def test_rescale_to_exact_fixes_scale_between_widths_keeps_order():
    rng = np.random.default_rng(0)
    bits = (0, 2, 4, 16)
    base = rng.lognormal(size=(32, 1)) * np.array([[1.0, 0.1, 0.01, 0.0]])
    estimate = SensitivityTable(bits, {"l": base.copy()}, {"l": 8}, {"estimator": "jacobian"})
    truth = base * np.array([[3.0, 2.0, 1.0, 1.0]])  # first order underestimates the big perturbations
    exact = truth.copy()
    exact[8:] = np.nan  # only a sample measured
    hybrid = rescale_to_exact(estimate, SensitivityTable(bits, {"l": exact}, {"l": 8}, {}))
    assert np.allclose(hybrid.costs["l"], truth)
    assert hybrid.meta["rescale_factors"]["l@0"] == pytest.approx(3.0)
    assert "exact-rescaled" in hybrid.meta["estimator"]


def test_layer_local_proxy_is_the_channels_own_output_error():
    torch.manual_seed(1)
    model = TwiceTower().eval()
    gen = torch.Generator().manual_seed(2)
    frames = CalibrationFrames(torch.randint(0, 256, (5, 2, 2, 2, 3), generator=gen, dtype=torch.uint8),
                               list("abcde"), torch.zeros(5, 4))
    table = layer_local_sensitivity(model, frames, bits=(0, 3, 16), layers=["mix"], batch=2)
    captured = []
    handle = model.mix.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        model(*frames.inputs())
    handle.remove()
    x = captured[0].reshape(5, -1, 32)
    for j, bits in enumerate((0, 3, 16)):
        dw = fake_quantize_rows(model.mix.weight, bits) - model.mix.weight.detach() if bits != 16 else torch.zeros(32, 32)
        expected = (x @ dw.T).pow(2).sum(dim=1).mean(dim=0).double().numpy()
        assert np.allclose(table.costs["mix"][:, j], expected, rtol=1e-4, atol=1e-12)


def test_proxy_bounds_fail_for_a_random_channel_order(exact_sample, jacobian_table):
    """The bounds of the test above, run against the jacobian table with its channels shuffled
    inside each layer: every shuffle fails them, and no cell of any shuffle reaches them, while
    the pooled Spearman (compare_tables' "overall") stays far above zero for them."""
    jac = jacobian_table
    rng = np.random.default_rng(0)
    best_rho, passing, pooled, within = -1.0, 0, [], []
    for draw in range(10):
        shuffled = shuffled_channels(jac, exact_sample, rng)
        agreement = rank_agreement(exact_sample, shuffled, null_draws=100, seed=draw)
        with pytest.raises(AssertionError):
            assert_cells_agree(agreement, min_spearman=0.85, min_overlap=0.75)
        for per in agreement["cells"].values():
            for c in per.values():
                best_rho = max(best_rho, c["spearman"])
                passing += c["spearman"] >= 0.85 and c["overlap"] >= 0.75
                within.append(c["spearman"])
        pooled.append(compare_tables(exact_sample, shuffled)["overall"])
    assert best_rho < 0.85 and passing == 0
    assert abs(np.median(within)) < 0.2 and np.mean(pooled) > 0.5
