"""Coherence refinement: measured in action space, weights restored, the best round kept."""
import numpy as np
import pytest
import torch

from qvla_ros.policy import make_policy
from qvla_ros.quant.allocate import allocate
from qvla_ros.quant.calibration import synthetic_frames
from qvla_ros.quant.quantizer import fake_quantize_rows
from qvla_ros.quant.refine import action_error, predict_actions, refine_allocation, stored_weights
from qvla_ros.quant.sensitivity import jacobian_sensitivity

LAYERS = ["decoder.layers.0.self_attn.k_proj", "decoder.layers.1.mlp.up_proj", "vision.0.encoder.layers.0.mlp.fc1"]


def test_stored_weights_applies_and_restores():
    policy = make_policy("micro", seed=0)
    linear = policy.get_submodule(LAYERS[0])
    before = linear.weight.detach().clone()
    bits = np.array([0] * 16 + [2] * 16)
    with stored_weights(policy, {LAYERS[0]: bits}, only=(0,)):
        assert torch.count_nonzero(linear.weight[:16]) == 0
        assert torch.equal(linear.weight[16:], before[16:])  # 2-bit rows untouched: only=(0,)
    with stored_weights(policy, {LAYERS[0]: bits}):
        assert torch.equal(linear.weight[16:], fake_quantize_rows(before[16:], 2))
    assert torch.equal(linear.weight, before)


def test_refinement_keeps_the_best_measured_round():
    torch.manual_seed(0)
    policy = make_policy("micro", seed=0)
    frames = synthetic_frames(policy.config, 3, seed=2)
    table = jacobian_sensitivity(policy, frames, layers=LAYERS, progress=False)
    result = refine_allocation(policy, frames, table, 2.6, rounds=1, progress=False)
    assert len(result.history) == 2
    assert result.measured_error == pytest.approx(min(h["measured_error"] for h in result.history))
    # the reported error is what the chosen allocation really does to the actions
    reference = predict_actions(policy, frames)
    # Each factor is what its (layer, width) channels really do to the actions over what the
    # table predicts for them, remeasured here on the first round's allocation (clipped to the
    # refinement's default range [0.5, 100]).
    first = allocate(table, 2.6)
    expected = {}
    for name, b in first.bits.items():
        for w in (0, 2):
            chosen = b == w
            predicted = float(table.costs[name][chosen, table.column(w)].sum())
            if chosen.any() and predicted > 0:
                with stored_weights(policy, {name: b}, only=(w,)):
                    measured_one = action_error(policy, frames, reference)
                expected[f"{name}@{w}"] = float(np.clip(measured_one / predicted, 0.5, 100.0))
    assert expected and set(result.factors) == set(expected)
    for key, factor in expected.items():
        assert result.factors[key] == pytest.approx(factor, rel=1e-6), key
    with stored_weights(policy, result.allocation.bits):
        assert action_error(policy, frames, reference) == pytest.approx(result.measured_error, rel=1e-5)
    assert result.allocation.bits_per_param <= 2.6


def test_select_allocation_measures_every_variant():
    from qvla_ros.quant.refine import select_allocation

    policy = make_policy("micro", seed=0)
    frames = synthetic_frames(policy.config, 2, seed=3)
    table = jacobian_sensitivity(policy, frames, layers=LAYERS[:2], progress=False)
    name, allocation, measured = select_allocation(policy, frames, table, 3.0)
    assert set(measured) == {"all widths", "no pruning"} and measured[name] == min(measured.values())
    if name == "no pruning":
        assert all((b != 0).all() for b in allocation.bits.values())
