"""The baselines' algorithms on single layers: GPTQ never loses to plain RTN on the layer
objective it minimises (AWQ's searches, group-wise GPTQ: test_baselines_groupwise.py); GPTQ's weights repack exactly on the project's grid; group-wise storage
decodes to per-group RTN and measures the bytes its format promises."""
import pytest
import torch

from qvla_ros.quant.baselines import GroupWiseLinear
from qvla_ros.quant.baselines.gptq import gptq_quantize_weight, layer_objective
from qvla_ros.quant.baselines.smoothquant import smoothing_factors
from qvla_ros.quant.quantizer import fake_quantize_rows


def _layer(n=96, k=80, tokens=600, seed=0):
    """A weight and inputs with correlated channels and a few outlier channels, like a real layer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 2 * mix)
    x[:, :4] *= 15.0
    return w, x


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_not_worse_than_rtn_on_layer_objective(bits):
    w, x = _layer()
    h = x.T @ x / x.shape[0]
    rtn = layer_objective(w, fake_quantize_rows(w, bits), h)
    gptq = layer_objective(w, gptq_quantize_weight(w, h, bits), h)
    assert gptq <= rtn
    assert gptq < 0.8 * rtn  # and clearly better on correlated inputs


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_weights_repack_exactly(act_order):
    w, x = _layer(seed=1)
    w[3] = w[3].abs() + 0.01  # an all-positive row: its range starts at 0, not at its min
    h = x.T @ x / x.shape[0]
    for bits in (4, 3):
        q = gptq_quantize_weight(w, h, bits, act_order=act_order)
        assert torch.equal(fake_quantize_rows(q, bits), q)


def test_gptq_per_row_widths_match_uniform_gptq_row_for_row():
    """A QVLA allocation (a width per row): GPTQ keeps rows independent, so each width's rows come
    out exactly as uniform GPTQ at that width gives them; pruned rows are zero, 16-bit rows kept,
    and every rounded row repacks exactly on its own grid."""
    w, x = _layer(n=64, seed=2)
    h = x.T @ x / x.shape[0]
    widths = torch.tensor([0, 2, 3, 4, 8, 16, 4, 3] * 8)
    q = gptq_quantize_weight(w, h, widths)
    assert torch.equal(q[widths == 0], torch.zeros_like(q[widths == 0]))
    assert torch.equal(q[widths == 16], w[widths == 16])
    for b in (2, 3, 4, 8):
        rows = widths == b
        assert torch.equal(q[rows], gptq_quantize_weight(w[rows], h, b))
        assert torch.equal(fake_quantize_rows(q[rows], b), q[rows])
        # ... and GPTQ's point: a lower layer objective than rounding those rows to nearest.
        assert layer_objective(w[rows], q[rows], h) < layer_objective(w[rows], fake_quantize_rows(w[rows], b), h)


def test_gptq_per_row_widths_are_checked():
    w, x = _layer(n=8, k=16, seed=3)
    h = x.T @ x / x.shape[0]
    with pytest.raises(ValueError, match="shape"):
        gptq_quantize_weight(w, h, torch.full((7,), 4))
    with pytest.raises(ValueError, match="unknown bit-widths"):
        gptq_quantize_weight(w, h, torch.tensor([4, 5, 4, 4, 4, 4, 4, 4]))


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(torch.randn(4, 8), torch.eye(7), 4)
    with pytest.raises(ValueError, match="bit-width"):
        gptq_quantize_weight(torch.randn(4, 8), torch.eye(8), 5)


def test_smoothing_factors_balance_ranges():
    w, x = _layer(seed=3)
    s = smoothing_factors(x.abs().amax(0), [w], alpha=0.5)
    x_range = (x / s).abs().amax(0)
    w_range = (w * s).abs().amax(0)
    # alpha = 0.5 makes each channel's activation and weight maxima equal.
    torch.testing.assert_close(x_range, w_range, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(x.abs().amax(0), [w], alpha=1.5)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16), (2, 64)])
def test_group_wise_storage(bits, group):
    lin = torch.nn.Linear(72, 40)  # 72 inputs: the last group is padded
    gw = GroupWiseLinear.from_linear(lin, bits, group)
    kg = -(-72 // group) * group
    # Stored bytes: b bits per padded weight plus fp16 scale and zero per group.
    assert gw.packed_nbytes() == 40 * kg * bits // 8 + 40 * (kg // group) * 2 * 2
    w = torch.zeros(40, kg)
    w[:, :72] = lin.weight.detach()
    expected = fake_quantize_rows(w.reshape(-1, group), bits).reshape(40, kg)[:, :72]
    assert torch.equal(gw.dequantize(), expected)
    x = torch.randn(5, 72)
    torch.testing.assert_close(gw(x), x @ expected.T + lin.bias.detach())
    # Finer groups, smaller error than one scale per row.
    per_row = (fake_quantize_rows(lin.weight.detach(), bits) - lin.weight).pow(2).sum()
    assert (gw.dequantize() - lin.weight).pow(2).sum() < per_row


def test_group_wise_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        GroupWiseLinear(16, 8, 4, 12)
