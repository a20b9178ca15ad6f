"""Allocation variants measured in action space: weights applied as stored, then restored."""
import numpy as np
import torch

from qvla_ros.policy import make_policy
from qvla_ros.quant.calibration import synthetic_frames
from qvla_ros.quant.quantizer import fake_quantize_rows
from qvla_ros.quant.refine import stored_weights
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


def test_select_allocation_measures_every_variant():
    from qvla_ros.quant.refine import select_allocation

    policy = make_policy("micro", seed=0)
    frames = synthetic_frames(policy.config, 2, seed=3)
    table = jacobian_sensitivity(policy, frames, layers=LAYERS[:2], progress=False)
    name, allocation, measured = select_allocation(policy, frames, table, 3.0)
    assert set(measured) == {"all widths", "no pruning"} and measured[name] == min(measured.values())
    if name == "no pruning":
        assert all((b != 0).all() for b in allocation.bits.values())
