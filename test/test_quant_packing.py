"""The packed layout, the quantizer and MixedBitLinear's CPU path (the kernels' oracle)."""
import pytest
import torch
from torch import nn

from qvla_ros.quant.mixed_linear import MixedBitLinear
from qvla_ros.quant.packing import (PackedWeight, bit_counts, check_row_tile, pack_codes,
                                    padded_in_features, predicted_nbytes, unpack_codes)
from qvla_ros.quant.quantizer import (dequantize_rows, fake_quantize_activations,
                                      fake_quantize_rows, quantize_rows)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach(), test.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum().clamp(min=1e-30)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [8, 13, 64, 100])
def test_pack_unpack_is_exact(bits, k):
    gen = torch.Generator().manual_seed(bits * 100 + k)
    codes = torch.randint(0, 2 ** bits, (5, padded_in_features(k)), generator=gen, dtype=torch.uint8)
    qweight, hi = pack_codes(codes, bits)
    assert qweight.dtype == torch.uint8
    if bits == 3:
        assert qweight.shape == (5, padded_in_features(k) // 4) and hi.shape == (5, padded_in_features(k) // 8)
    else:
        assert hi is None and qweight.shape == (5, padded_in_features(k) * bits // 8)
    assert torch.equal(unpack_codes(qweight, hi, bits), codes)
    assert torch.equal(unpack_codes(qweight, hi, bits, k), codes[:, :k])


def test_bit_positions_follow_the_contract():
    # 2 bits: element k in byte k//4 at offset (k%4)*2, low bits first.
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 3]], dtype=torch.uint8)
    q, _ = pack_codes(codes, 2)
    assert q.tolist() == [[1 | (2 << 2) | (3 << 4), 3 << 6]]
    # 4 bits: two per byte, element 0 in the low nibble.
    q4, _ = pack_codes(torch.tensor([[0xA, 0x5, 0, 0, 0, 0, 0, 0xF]], dtype=torch.uint8), 4)
    assert q4.tolist()[0][0] == 0x5A and q4.tolist()[0][3] == 0xF0
    # 3 bits: low two bits in the 2-bit plane, high bit in the 1-bit plane (element k at bit k%8).
    c3 = torch.tensor([[7, 4, 1, 0, 0, 0, 0, 6]], dtype=torch.uint8)
    lo, hi = pack_codes(c3, 3)
    assert lo.tolist() == [[3 | (0 << 2) | (1 << 4), 2 << 6]]
    assert hi.tolist() == [[1 | 2 | (1 << 7)]]


def test_quantizer_bounds_and_zero_is_exact():
    w = torch.randn(32, 77, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4, 8):
        codes, scale, zero = quantize_rows(w, bits)
        assert scale.dtype == torch.float16 and zero.dtype == torch.float16
        assert int(codes.max()) <= 2 ** bits - 1
        assert torch.equal(zero, zero.round())
        # a zero weight decodes to exactly zero (padding relies on it)
        zero_row = dequantize_rows(zero.to(torch.uint8)[:, None], scale, zero)
        assert torch.count_nonzero(zero_row) == 0
        # round-to-nearest: error at most half a step inside the range
        err = (dequantize_rows(codes, scale, zero) - w).abs()
        assert bool((err <= scale.float()[:, None] * 0.5 + 1e-6).all())


def test_quantizer_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown bit-width 5"):
        quantize_rows(torch.randn(2, 8), 5)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.randn(8), 4)


def test_constant_and_zero_rows_survive():
    w = torch.zeros(3, 16)
    w[1] = 0.25
    for bits in (2, 3, 4, 8):
        assert torch.allclose(fake_quantize_rows(w, bits), w, atol=1e-3)


def _random_bits(n, widths, tile, gen):
    """Row widths for n rows with every width's count a multiple of tile, shuffled."""
    per = torch.randint(0, len(widths), (n // tile,), generator=gen)
    bits = torch.tensor(widths)[per].repeat_interleave(tile)
    return bits[torch.randperm(n, generator=gen)]


@pytest.mark.parametrize("n,k", [(64, 48), (96, 37), (32, 256)])
def test_mixed_linear_matches_dequantized_reference(n, k):
    gen = torch.Generator().manual_seed(n + k)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(n, generator=gen))
    bits = _random_bits(n, [0, 2, 3, 4, 8, 16], 16, gen)
    module = MixedBitLinear.from_linear(linear, bits)
    assert torch.equal(module.bits_per_row(), bits)
    reference_w = torch.stack([fake_quantize_rows(linear.weight[c:c + 1], int(bits[c]))[0] for c in range(n)])
    assert torch.equal(module.dequantize(), reference_w)
    x = torch.randn(3, 5, k, generator=gen)
    expected = x @ reference_w.T + linear.bias.detach()
    got = module(x)
    assert got.shape == (3, 5, n)
    assert sqnr_db(expected, got) > 100
    pruned = bits == 0
    assert torch.allclose(got[..., pruned], linear.bias.detach()[pruned].expand(3, 5, -1))


@pytest.mark.parametrize("bits,min_db", [(16, 45.0), (8, 38.0), (4, 16.0), (3, 10.0), (2, 4.0)])
def test_all_rows_one_width_sqnr_vs_float(bits, min_db):
    gen = torch.Generator().manual_seed(bits)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=gen))
    module = MixedBitLinear.from_linear(linear, torch.full((32,), bits))
    assert module.group_layout == ((bits, 32),)
    x = torch.randn(16, 64, generator=gen)
    assert sqnr_db(linear(x), module(x)) > min_db


def test_all_pruned_and_no_bias():
    linear = nn.Linear(24, 16, bias=False)
    module = MixedBitLinear.from_linear(linear, torch.zeros(16, dtype=torch.int64))
    assert module.row_index.numel() == 0 and module.packed_nbytes() == 0
    out = module(torch.randn(2, 24))
    assert out.shape == (2, 16) and torch.count_nonzero(out) == 0


def test_small_layer_allows_any_counts_and_tile_is_enforced_otherwise():
    linear = nn.Linear(9, 5)
    module = MixedBitLinear.from_linear(linear, torch.tensor([2, 3, 8, 0, 16]))
    assert module(torch.randn(4, 9)).shape == (4, 5)
    with pytest.raises(ValueError, match="row tile"):
        MixedBitLinear.from_linear(nn.Linear(8, 32), torch.tensor([4] * 17 + [8] * 15))
    # 40 rows: one ragged group allowed
    MixedBitLinear.from_linear(nn.Linear(8, 40), torch.tensor([4] * 32 + [8] * 8))
    with pytest.raises(ValueError, match="unknown bit-widths \\[5\\]"):
        MixedBitLinear.from_linear(nn.Linear(8, 16), torch.full((16,), 5))
    with pytest.raises(ValueError, match="12 entries for a layer of 16"):
        MixedBitLinear.from_linear(nn.Linear(8, 16), torch.full((12,), 4))


def storage_nbytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`: what the allocator really holds for them
    (a view into a larger buffer counts the whole buffer)."""
    held = {}
    for t in tensors:
        storage = t.untyped_storage()
        held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values())


def test_packed_bytes_are_real_and_predicted(tmp_path):
    from safetensors.torch import save_file

    from qvla_ros.quant.checkpoint import safetensors_tensor_nbytes

    gen = torch.Generator().manual_seed(3)
    n, k = 128, 100
    linear = nn.Linear(k, n)
    bits = _random_bits(n, [0, 2, 3, 4, 8, 16], 16, gen)
    module = MixedBitLinear.from_linear(linear, bits)
    packed = {name: b for name, b in module.state_dict().items() if name != "bias"}
    # real bytes, two ways: the storages the module holds, and the bytes a file of them takes
    held = storage_nbytes(packed.values())
    path = tmp_path / "packed.safetensors"
    save_file(packed, str(path))
    on_disk = sum(safetensors_tensor_nbytes(path).values())
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert on_disk == path.stat().st_size - 8 - header  # the header's spans cover the file's data
    assert module.packed_nbytes() == held == on_disk == module.packed_weight().nbytes()
    # ... and what the layout's formula (packing.row_bits) predicts from the row counts alone
    assert held == predicted_nbytes(bit_counts(bits), k)


def test_state_dict_roundtrip_into_empty_module():
    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(40, 48)
    bits = _random_bits(48, [2, 3, 4, 8, 16, 0], 16, gen)
    src = MixedBitLinear.from_linear(linear, bits, act_bits=8)
    dst = MixedBitLinear.empty(40, 48, bits, act_bits=8)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(7, 40, generator=gen)
    assert torch.equal(src(x), dst(x))
    dst.cache_dequantized = True
    assert torch.allclose(src(x), dst(x), rtol=1e-5, atol=1e-6)


def test_int8_activations_per_token():
    x = torch.randn(4, 6, 32) * torch.logspace(-2, 2, 6)[None, :, None]
    xq = fake_quantize_activations(x, 8)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert bool(((xq - x).abs() <= step * 0.5 + 1e-7).all())
    assert fake_quantize_activations(x, 16) is x
    linear = nn.Linear(32, 16)
    a8 = MixedBitLinear.from_linear(linear, torch.full((16,), 16), act_bits=8)
    a16 = MixedBitLinear.from_linear(linear, torch.full((16,), 16), act_bits=16)
    assert not torch.equal(a8(x), a16(x))
    assert sqnr_db(a16(x), a8(x)) > 30


def test_row_tile_check_messages():
    check_row_tile({4: 32, 8: 16, 0: 16}, 64)
    with pytest.raises(ValueError, match="add up to"):
        check_row_tile({4: 32}, 64)


def test_packed_weight_roundtrip_of_bits_and_order():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(32, 16, generator=gen)
    bits = torch.tensor([2] * 16 + [8] * 16)[torch.randperm(32, generator=gen)]
    packed = PackedWeight.from_weight(w, bits)
    assert [g.bits for g in packed.groups] == [8, 2]
    # rows inside a group keep ascending original order
    for g in packed.groups:
        idx = packed.row_index[g.start:g.start + g.rows]
        assert torch.equal(idx, idx.sort().values)
        assert torch.equal(bits[idx.long()], torch.full((g.rows,), g.bits))


def test_kernel_dispatch_agrees_with_the_oracle():
    """The path CUDA inputs take (qvla_ros.kernels on the same buffers), run with the kernels' CPU
    model, equals the CPU oracle: the two read the packed layout the same way."""
    kernels = pytest.importorskip("qvla_ros.kernels")
    gen = torch.Generator().manual_seed(11)
    linear = nn.Linear(44, 80)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 44, generator=gen) * 0.2)
    bits = _random_bits(80, [0, 2, 3, 4, 8, 16], 16, gen)
    x = torch.randn(3, 7, 44, generator=gen)
    for act_bits in (16, 8):
        module = MixedBitLinear.from_linear(linear, bits, act_bits=act_bits)
        assert sqnr_db(module(x), module._forward_kernel(x)) > 60
    assert module._kernel_weights is not None and isinstance(module._kernel_weights, kernels.KernelWeights)
