"""The kernels' layout and arithmetic on the CPU: kernel words vs. the contract layout, the plain-torch
model of the kernels vs. the quant module's oracle, the custom op's CPU and fake paths, bad input."""
import pytest
import torch

from qvla_ros.kernels import (KernelWeights, mixed_bit_linear, mixed_bit_linear_reference, prepare_packed,
                              quantize_activations_reference)
from qvla_ros.kernels.layout import codes_to_words, unpack_contract_codes, words_to_codes
from qvla_ros.kernels.testing import MIXES, average_bits, mix_counts
from qvla_ros.quant.kernel_oracle import oracle, random_packed
from qvla_ros.quant.mixed_linear import MixedBitLinear
from qvla_ros.quant.packing import pack_codes, unpack_codes
from qvla_ros.quant.quantizer import fake_quantize_activations


def rel_err(y, ref):
    return float((y.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [8, 296, 512, 1000])
def test_kernel_words_round_trip_and_match_the_contract(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2 ** bits, (5, k), generator=gen, dtype=torch.uint8)
    low, high = codes_to_words(codes, bits)
    assert low.dtype == torch.int32 and (high is None) == (bits != 3)
    assert torch.equal(words_to_codes(low, high, bits, k), codes)
    # the kernels' own reader of the contract layout agrees with the quant module's packer
    qweight, qweight_hi = pack_codes(codes, bits) if k % 8 == 0 else (None, None)
    if qweight is not None:
        assert torch.equal(unpack_contract_codes(qweight, qweight_hi, bits, k), codes)
        assert torch.equal(unpack_codes(qweight, qweight_hi, bits, k), codes)


def test_field_i_of_a_word_holds_feature_kb_kb_plus_i_times_32_plus_j():
    # 4 bits: 8 fields per word, K-blocks of 256 features
    codes = (torch.arange(512) % 16).to(torch.uint8)[None, :]
    words, _ = codes_to_words(codes, 4)
    kb, j, i = 1, 5, 3
    field = (int(words[0, kb * 32 + j]) >> (4 * i)) & 15
    assert field == int(codes[0, kb * 256 + i * 32 + j])


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_prepare_keeps_every_code_and_names_every_channel_once(mix):
    n, k = 192, 200
    packed, _ = random_packed(n, k, mix_counts(n, MIXES[mix]), seed=1)
    kw = prepare_packed(packed)
    assert isinstance(kw, KernelWeights)
    assert sorted(kw.out_index.tolist()) == list(range(n))
    assert torch.equal(kw.out_index[:kw.kept_rows], packed.row_index)
    for g in packed.groups:
        if g.bits != 16:
            assert torch.equal(kw.group_codes(g.bits), g.codes())
    assert kw.integer_zero


def test_mix_averages_are_what_their_names_say():
    for name, target in (("avg8", 8), ("avg4", 4), ("avg3", 3)):
        assert abs(average_bits(mix_counts(4096, MIXES[name])) - target) < 0.15


CASES = [  # (name, out_features, in_features, counts)
    ("every-width-and-pruned", 96, 300, {16: 16, 8: 16, 4: 16, 3: 16, 2: 16, 0: 16}),
    ("all-4-bit", 64, 256, {4: 64}),
    ("all-3-bit-odd-k", 48, 1000, {3: 48}),
    ("all-16-bit", 32, 72, {16: 32}),
    ("all-pruned", 32, 64, {0: 32}),
    ("fewer-rows-than-a-tile", 7, 40, {8: 3, 2: 4}),
]


@pytest.mark.parametrize("name,n,k,counts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("act_bits", [16, 8])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_the_oracle(name, n, k, counts, act_bits, with_bias):
    packed, _ = random_packed(n, k, counts, seed=n + k)
    kw = prepare_packed(packed)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = mixed_bit_linear_reference(x, kw, bias, act_bits)
    assert y.shape == (2, 3, n)
    ref = oracle(x.reshape(-1, k), packed, bias, act_bits).reshape(2, 3, n)
    if name == "all-pruned" and not with_bias:
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert rel_err(y, ref) < 1e-5


def test_fractional_zero_points_are_honoured():
    packed, _ = random_packed(64, 100, {8: 16, 4: 32, 2: 16}, seed=3, fractional_zero=True)
    kw = prepare_packed(packed)
    assert not kw.integer_zero
    x = torch.randn(4, 100)
    for act_bits in (16, 8):
        assert rel_err(mixed_bit_linear_reference(x, kw, None, act_bits), oracle(x, packed, None, act_bits)) < 1e-5


def test_activation_codes_match_fake_quantization():
    x = torch.randn(6, 333) * torch.logspace(-3, 2, 6)[:, None]
    codes, scale, total = quantize_activations_reference(x)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert torch.equal(total, codes.to(torch.int32).sum(-1))
    torch.testing.assert_close(codes.float() * scale[:, None], fake_quantize_activations(x, 8), rtol=0, atol=0)


@pytest.mark.parametrize("act_bits", [16, 8])
def test_custom_op_on_cpu_follows_mixed_bit_linear_module(act_bits):
    """The call MixedBitLinear makes on CUDA, run here on CPU, equals the module's own forward."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(120, 80)
    bits = torch.tensor([16] * 16 + [8] * 16 + [4] * 16 + [3] * 16 + [0] * 16)[torch.randperm(80)]
    module = MixedBitLinear.from_linear(linear, bits, act_bits=act_bits)
    kw = prepare_packed(module.packed_weight())
    x = torch.randn(3, 120)
    y = mixed_bit_linear(x, kw, module.bias, act_bits=act_bits)
    assert rel_err(y, module(x).to(torch.float64)) < 1e-5


def test_fake_implementation_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, _ = random_packed(48, 64, {4: 32, 0: 16}, seed=5)
    kw = prepare_packed(packed)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(5, 7, 64, dtype=torch.bfloat16))
        y = torch.ops.qvla.mixed_bit_linear(x, kw.qwords, kw.w16, kw.scale, kw.zero, kw.out_index, kw.meta,
                                            None, list(kw.group_rows), kw.out_features, 16, kw.integer_zero)
    assert y.shape == (5, 7, 48) and y.dtype == torch.bfloat16


def test_bad_input_is_named():
    packed, _ = random_packed(32, 64, {4: 32}, seed=0)
    kw = prepare_packed(packed)
    with pytest.raises(ValueError, match="features"):
        mixed_bit_linear(torch.randn(2, 63), kw)
    with pytest.raises(ValueError, match="act_bits"):
        mixed_bit_linear(torch.randn(2, 64), kw, act_bits=4)
    with pytest.raises(ValueError, match="bias"):
        mixed_bit_linear(torch.randn(2, 64), kw, bias=torch.zeros(31))
    with pytest.raises(TypeError, match="KernelWeights"):
        mixed_bit_linear(torch.randn(2, 64), packed)
    with pytest.raises(ValueError, match="floating"):
        mixed_bit_linear(torch.ones(2, 64, dtype=torch.int32), kw)


def test_prepare_rejects_inconsistent_layers():
    packed, _ = random_packed(32, 64, {8: 16, 2: 16}, seed=0)
    bad_index = packed.row_index.clone()
    bad_index[1] = bad_index[0]
    with pytest.raises(ValueError, match="twice"):
        prepare_packed(type(packed)(packed.out_features, packed.in_features, bad_index, packed.groups))
    with pytest.raises(ValueError, match="order"):
        prepare_packed(type(packed)(packed.out_features, packed.in_features, packed.row_index,
                                    packed.groups[::-1]))
    with pytest.raises(ValueError, match="outside"):
        prepare_packed(type(packed)(16, packed.in_features, packed.row_index, packed.groups))


def test_the_named_meta_offsets_follow_slotmeta_field_order():
    """The kernels read the `meta` table by the names META_ROWS ... META_K_BLOCKS; a reordered or
    added SlotMeta field must move those names with it, or every launch would read the wrong field."""
    import dataclasses

    from qvla_ros.kernels import layout, triton_gemm
    from qvla_ros.kernels.layout import META_FIELDS, META_OFFSETS, SlotMeta

    names = [f.name for f in dataclasses.fields(SlotMeta)]
    assert list(META_OFFSETS) == names
    assert list(META_OFFSETS.values()) == list(range(len(names)))
    assert len(names) <= META_FIELDS
    for name, at in META_OFFSETS.items():
        assert getattr(layout, f"META_{name.upper()}") == at
        # the grouped GEMM's compile-time copies of the same offsets
        assert getattr(triton_gemm, f"META_{name.upper()}").value == at
    assert triton_gemm.META_FIELDS.value == META_FIELDS
    assert triton_gemm.NUM_SLOTS.value == len(layout.SLOT_BITS)
    # as_row puts each field at its named offset, from_row reads it back from there
    meta = SlotMeta(rows=11, start=22, word_offset=33, high_offset=44, k_blocks=55)
    row = meta.as_row()
    assert row.dtype == torch.int32 and row.shape == (META_FIELDS,)
    for name, at in META_OFFSETS.items():
        assert int(row[at]) == getattr(meta, name)
    assert int(row[len(names):].abs().sum()) == 0
    assert SlotMeta.from_row(row) == meta


# ---- the small-M kernel's host side ---------------------------------------------------------------

@pytest.mark.parametrize("n,k,counts", [
    (192, 200, mix_counts(192, MIXES["avg4"])), (99, 333, {16: 16, 8: 16, 4: 32, 3: 16, 2: 3, 0: 16}),
    (37, 77, {3: 37}), (48, 1000, {3: 16, 2: 32}), (32, 64, {0: 32}), (7, 40, {8: 3, 2: 2, 0: 2})])
def test_slot_table_from_host_counts_matches_the_prepared_meta(n, k, counts):
    from qvla_ros.kernels.layout import SLOT_BITS, slot_table
    from qvla_ros.kernels.testing import random_kernel_weights

    for kw in (prepare_packed(random_packed(n, k, counts, seed=3)[0]), random_kernel_weights(n, k, counts, "cpu")):
        table = slot_table(kw.group_rows, k)
        for slot, bits in enumerate(SLOT_BITS):
            s = kw.slot(bits)
            assert table[f"r{bits}"] == s.rows
            if bits in (8, 4, 3, 2) and s.rows:
                assert table[f"o{bits}"] * 16 == s.word_offset and table[f"n{bits}"] == s.k_blocks
        if kw.group_rows[3]:
            assert table["h3"] * 32 == kw.slot(3).high_offset


def test_small_m_switch_and_configs_reject_bad_values(monkeypatch):
    from qvla_ros.kernels import (GemvConfig, launch_gemv, override_gemv_configs, pick_gemv_config,
                                  runs_small_m_kernel, set_small_m_kernel, small_m_kernel)

    monkeypatch.delenv("QVLA_SMALL_M_KERNEL", raising=False)
    # the default: the small-M kernel for one token only (where run 5 timed it fastest)
    assert small_m_kernel() == "auto"
    assert [runs_small_m_kernel(m) for m in (1, 2, 16, 17)] == [True, False, False, False]
    monkeypatch.setenv("QVLA_SMALL_M_KERNEL", "gemv")
    assert small_m_kernel() == "gemv"
    assert [runs_small_m_kernel(m) for m in (1, 2, 16, 17)] == [True, True, True, False]
    # "gemm" (the grouped GEMM at one token) was removed: it lost everywhere (bench/kernels/NOTES.md)
    with pytest.raises(ValueError, match="small-M kernel"):
        set_small_m_kernel("gemm")
    # many tokens: decode-then-cuBLAS from DEQUANT_MIN_TOKENS on (run 10: 4x the grouped GEMM at 590
    # tokens); the QVLA_LARGE_M_KERNEL switch is gone (the grouped GEMM lost at every count from 24)
    import qvla_ros.kernels as kernels
    from qvla_ros.kernels import A8_DECODE_MIN_TOKENS, DEQUANT_MIN_TOKENS, route, runs_dequant_path

    assert not hasattr(kernels, "set_large_m_kernel")
    assert [runs_dequant_path(m) for m in (DEQUANT_MIN_TOKENS - 1, DEQUANT_MIN_TOKENS, 590)] == [False, True, True]
    # the one routing table
    monkeypatch.delenv("QVLA_SMALL_M_KERNEL", raising=False)
    cuda = torch.device("cuda", 0)
    assert [route(m, 16, cuda) for m in (1, 2, 16, 17, 23, 24, 590)] == \
        ["gemv", "gemm", "gemm", "gemm", "gemm", "dequant", "dequant"]
    # 8-bit activations: the grouped GEMM's int8 path (the decoded-codes GEMM is opt-in, below)
    if A8_DECODE_MIN_TOKENS is None:
        assert {route(m, 8, cuda) for m in (1, 16, 24, 590)} == {"gemm_a8"}
    monkeypatch.setenv("QVLA_SMALL_M_KERNEL", "gemv")
    assert [route(m, 16, cuda) for m in (1, 2, 16, 17)] == ["gemv", "gemv", "gemv", "gemm"]
    monkeypatch.delenv("QVLA_SMALL_M_KERNEL")
    # a tile tuned for one layer shape serves that shape only
    assert pick_gemv_config(1, 11008, 4096) != pick_gemv_config(1, 4096, 4096) == pick_gemv_config(1)
    with pytest.raises(ValueError, match="small-M key"):
        override_gemv_configs({("m3", 64, 64): GemvConfig()})
    with pytest.raises(ValueError, match="small-M key"):
        override_gemv_configs({("m1", 64): GemvConfig()})
    with pytest.raises(TypeError, match="GemvConfig"):
        override_gemv_configs({("m1", 64, 64): "fast"})
    monkeypatch.setenv("QVLA_SMALL_M_KERNEL", "fast")
    with pytest.raises(ValueError, match="QVLA_SMALL_M_KERNEL"):
        small_m_kernel()
    with pytest.raises(ValueError, match="small-M kernel"):
        set_small_m_kernel("cublas")
    for bad in (dict(bm=3), dict(bm=8, use_dot=True), dict(bn=24), dict(wb=256), dict(split_k=0), dict(bk16=8),
                dict(stages=0), dict(stages=7), dict(stages=3, prefetch=True)):
        with pytest.raises(ValueError):
            GemvConfig(**bad)
    for m in range(1, 17):
        assert pick_gemv_config(m).bm >= m or pick_gemv_config(m).use_dot
    kw = prepare_packed(random_packed(32, 64, {4: 32}, seed=0)[0])
    with pytest.raises(ValueError, match="at most 16"):
        launch_gemv(torch.zeros(17, 64, dtype=torch.bfloat16), kw, None, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        launch_gemv(torch.zeros(2, 64), kw, None, torch.float32)


# ---- MixedBitLinear keeps one copy of its weights -------------------------------------------------

def _mixed_layer(n=96, k=512, bias=True, act_bits=16):
    from torch import nn

    gen = torch.Generator().manual_seed(n + k)
    linear = nn.Linear(k, n, bias=bias)
    bits = torch.tensor([16, 8, 4, 3, 2, 0]).repeat_interleave(n // 6)
    return MixedBitLinear.from_linear(linear, bits[torch.randperm(n, generator=gen)], act_bits=act_bits)


def test_contract_tensors_give_back_the_packed_buffers_bit_for_bit():
    from qvla_ros.kernels.layout import contract_tensors

    for k in (512, 300, 77):  # 300 and 77: the contract pads K to 304 and 80 with zero-point codes
        module = _mixed_layer(k=k)
        back = contract_tensors(prepare_packed(module.packed_weight()))
        own = {name: buf for name, buf in module.named_buffers() if name != "bias"}
        assert sorted(back) == sorted(own)
        for name, buf in own.items():
            assert back[name].dtype == buf.dtype and torch.equal(back[name], buf), name


@pytest.mark.parametrize("act_bits", [16, 8])
def test_kernel_layout_becomes_the_only_copy_and_round_trips(act_bits):
    module = _mixed_layer(act_bits=act_bits)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    before = {name: t.clone() for name, t in module.state_dict().items()}
    y_oracle = module(x)
    w_oracle = module.dequantize()
    nbytes = module.packed_nbytes()

    module.to_kernel_layout()
    assert module.kernel_resident
    packed = [buf for name, buf in module.named_buffers() if name != "bias"]
    assert packed and all(buf.is_meta for buf in packed)  # no second copy of any packed buffer
    kw = module._kernel_weights
    # what is resident now is reported: the kernel layout's storages, measured on the tensors
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in vars(kw).values() if isinstance(t, torch.Tensor)}
    assert module.packed_nbytes() == sum(resident.values())
    # float32 scale/zero and out_index: ~1% over the contract
    assert nbytes < module.packed_nbytes() <= 1.03 * nbytes
    torch.testing.assert_close(module(x), y_oracle, rtol=2e-5, atol=2e-5)

    after = module.state_dict()  # rebuilt from the kernel layout, exact
    assert sorted(after) == sorted(before)
    for name, t in before.items():
        assert not after[name].is_meta and torch.equal(after[name], t), name
    assert torch.equal(module.dequantize(), w_oracle)

    # loading into a resident module replaces the one copy; moving it gives the buffers back
    fresh = _mixed_layer(act_bits=act_bits)
    fresh.to_kernel_layout()
    fresh.load_state_dict(before)
    assert fresh.kernel_resident
    torch.testing.assert_close(fresh(x), y_oracle, rtol=2e-5, atol=2e-5)
    module.to("cpu")
    assert not module.kernel_resident and module._kernel_weights is None
    for name, t in before.items():
        assert torch.equal(module.state_dict()[name], t), name
    assert torch.equal(module(x), y_oracle)  # the CPU oracle path again, bit for bit


# ---- one copy of the kernels package -------------------------------------------------------------

def test_a_top_level_kernels_import_is_the_same_package_and_operator():
    # From a checkout's root the folder kernels/ is importable by that bare name too, and
    # transformers imports it while probing for Hugging Face's `kernels` package. That used to
    # register the operator a second time, bound to a copy whose small-M switch the first copy's
    # set_small_m_kernel() never reached (the H200 test failure of runs 3-8).
    import subprocess
    import sys
    from pathlib import Path

    script = """
import qvla_ros.kernels as ours
from transformers.utils.import_utils import is_kernels_available
print(is_kernels_available())          # imports `kernels` from the checkout's root
import kernels
import torch._library.custom_ops as custom_ops
op_globals = custom_ops.OPDEFS["qvla::mixed_bit_linear"]._init_fn.__globals__
ours.set_small_m_kernel("gemv")
print(kernels is ours, op_globals is vars(ours.ops), op_globals["small_m_kernel"]())
"""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True", "True", "gemv"], proc.stdout


def test_the_tensor_core_spike_packs_4_bit_rows_in_the_kernel_layout():
    # bench/kernels/spike/ times a one-token tensor-core kernel on words it packs itself; its
    # figures speak for the product only if those words are the product's layout
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "kernels" / "spike" / "run_spike.py"
    spec = importlib.util.spec_from_file_location("qvla_spike", path)
    spike = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spike)
    codes = torch.randint(0, 16, (48, 1024), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    words, high = codes_to_words(codes, 4)
    assert high is None and torch.equal(spike.pack_words(codes), words.view(torch.int32).reshape(48, -1))


@pytest.mark.parametrize("act_bits", [16, 8])
def test_the_lean_forward_matches_the_op_and_follows_a_replaced_bias_or_act_bits(act_bits):
    from qvla_ros.kernels import PreparedLinear

    packed, _ = random_packed(96, 300, mix_counts(96, MIXES["avg4"]), seed=3)
    bias = torch.randn(96)
    mod = MixedBitLinear.from_packed(packed, bias=bias, act_bits=act_bits).to_kernel_layout("cpu")
    assert isinstance(mod._prepared, PreparedLinear)
    x = torch.randn(2, 5, 300, dtype=torch.bfloat16)
    want = mixed_bit_linear(x, mod._kernel_weights, mod.bias, act_bits)
    assert torch.equal(mod(x), want)
    assert torch.equal(mod(x.float()), mixed_bit_linear(x.float(), mod._kernel_weights, mod.bias, act_bits))
    # a replaced bias buffer and a changed act_bits reach the next call (and rebuild the lean path)
    mod.bias = torch.randn(96)
    assert torch.equal(mod(x), mixed_bit_linear(x, mod._kernel_weights, mod.bias, act_bits))
    assert mod._prepared_bias is mod.bias
    other = 8 if act_bits == 16 else 16
    mod.act_bits = other
    assert torch.equal(mod(x), mixed_bit_linear(x, mod._kernel_weights, mod.bias, other))
    assert mod._prepared.act_bits == other


@pytest.mark.parametrize("k", [64, 300, 1152, 4096])
@pytest.mark.parametrize("counts", [{16: 16, 8: 16, 4: 32, 3: 16, 2: 16, 0: 16}, {16: 48}, {2: 32, 0: 16},
                                    {3: 48}])
def test_resident_layer_bytes_is_what_the_kernel_layout_holds(k, counts):
    from qvla_ros.kernels.layout import resident_layer_bytes

    n = sum(counts.values())
    packed, _ = random_packed(n, k, counts, seed=k + n)
    kw = prepare_packed(packed)
    assert resident_layer_bytes(counts, k) == kw.nbytes()
    # the module reports the same once the kernel layout is its only copy
    layer = MixedBitLinear.from_packed(packed).to_kernel_layout()
    assert layer.kernel_resident and layer.packed_nbytes() == kw.nbytes()


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16, 0])
def test_a_kernel_row_never_takes_less_than_a_packed_row(bits):
    from qvla_ros.kernels.layout import resident_row_bits
    from qvla_ros.quant.packing import row_bits

    for k in (8, 64, 300, 1152, 4096, 11008):
        assert resident_row_bits(bits, k) >= row_bits(bits, k)
    # K-block padding: a 2-bit row at K = 1152 holds 1536 codes (three blocks of 512)
    if bits == 2:
        assert resident_row_bits(2, 1152) == 2 * 1536 + 96


def test_the_decoded_a8_gemm_is_switched_on_by_a_token_count(monkeypatch):
    import torch

    from qvla_ros.kernels import ops

    cuda = torch.device("cuda")
    monkeypatch.setattr(ops, "A8_DECODE_MIN_TOKENS", 24)
    assert [ops.route(m, 8, cuda) for m in (1, 16, 23, 24, 590)] == ["gemm_a8"] * 3 + ["a8_decoded"] * 2
    assert ops.route(590, 16, cuda) == "dequant"  # 16-bit activations keep their own table
    monkeypatch.delenv("QVLA_A8_DECODE_MIN_TOKENS", raising=False)
    assert ops._a8_decode_min_tokens() is None  # off unless asked for
    for value, want in (("", None), ("off", None), ("0", None), ("32", 32)):
        monkeypatch.setenv("QVLA_A8_DECODE_MIN_TOKENS", value)
        assert ops._a8_decode_min_tokens() == want
    monkeypatch.setenv("QVLA_A8_DECODE_MIN_TOKENS", "many")
    with pytest.raises(ValueError, match="QVLA_A8_DECODE_MIN_TOKENS"):
        ops._a8_decode_min_tokens()
