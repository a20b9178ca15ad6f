"""The Triton kernels on a CUDA GPU against the quant module's oracle (skipped without a GPU).

Fresh random inputs for every bit mix, token counts on both sides of every tile size, odd shapes
(N and K off every tile), pruned rows, layers of one width, fp16, folded zero-points; the output
is filled with NaN first so an element the kernel never writes fails the test.
"""
import pytest
import torch

from qvla_ros.kernels import (DEQUANT_MIN_TOKENS, GemmConfig, GemvConfig, PreparedLinear, dequant_linear,
                              dequantize_kernel_weights, launch_a8_decoded, launch_dequant, launch_gemv,
                              launch_mixed_gemm, mixed_bit_linear, pick_config, pick_gemv_config,
                              quantize_activations, quantize_activations_reference, route, set_small_m_kernel)
from qvla_ros.kernels.testing import MIXES, mix_counts, replayed_in_a_cuda_graph
from qvla_ros.quant.kernel_oracle import check_against_oracle as check, gpu_layer as layer, oracle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def direct_launches(monkeypatch):
    """Every test here runs the bound routes' direct launches (launch_common.BoundLaunch), the path
    on by default (QVLA_DIRECT_LAUNCH=0 turns it off), so these tests are its check on a card."""
    from qvla_ros.kernels.launch_common import BoundLaunch
    monkeypatch.setattr(BoundLaunch, "direct", True)


def run(kw, x, bias, act_bits, config=None):
    out = torch.full((x.shape[0], kw.out_features), float("nan"), dtype=x.dtype, device=x.device)
    if act_bits == 8:
        xq, xscale, xsum = quantize_activations(x)
        launch_mixed_gemm(xq, kw, bias, x.dtype, 8, xscale, xsum, config=config, out=out)
    else:
        launch_mixed_gemm(x, kw, bias, x.dtype, 16, config=config, out=out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("m", [1, 16, 64, 590])
@pytest.mark.parametrize("act_bits", [16, 8])
def test_every_mix_at_every_token_count(mix, m, act_bits):
    n, k = 1152, 4096
    packed, kw = layer(n, k, mix_counts(n, MIXES[mix]))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    check(run(kw, x, bias, act_bits), packed, x, bias, act_bits)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("m", [24, 64, 590])
def test_a8_decoded_gemm_every_mix(mix, m):
    # the many-token A8 route: the layer decoded to int8 codes, one int8 tensor-core GEMM
    n, k = 1152, 4096
    packed, kw = layer(n, k, mix_counts(n, MIXES[mix]))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    launch_a8_decoded(x, kw, bias, out=out)
    check(out, packed, x, bias, 8)


# (BM, BN, BK, GROUP_M, warps, stages): tiles smaller and larger than the shapes, one-tile groups
A8_TILES = [(128, 128, 128, 8, 8, 4), (64, 128, 64, 4, 4, 3), (128, 256, 128, 8, 8, 3), (16, 32, 64, 1, 4, 2)]


@pytest.mark.parametrize("tile", A8_TILES)
@pytest.mark.parametrize("m", [17, 129, 333])
@pytest.mark.parametrize("frac", [False, True])
def test_a8_decoded_gemm_odd_shapes_tiles_and_fractional_zeros(tile, m, frac):
    # N = K = 1000: off every tile and K-block; fp16 activations; float32 output shows the kernel's
    # own error for the quantized rows (exact integer products)
    counts = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}
    packed, kw = layer(1000, 1000, counts, frac)
    x = torch.randn(m, 1000, device="cuda", dtype=torch.float16)
    out = torch.full((m, 1000), float("nan"), device="cuda", dtype=torch.float16)
    launch_a8_decoded(x, kw, None, tile=tile, out=out)
    check(out, packed, x, None, 8)
    if not frac:
        quantized = {8: 96, 4: 448, 3: 256, 2: 152, 0: 48}  # the dense rows made 4-bit: N stays 1000
        packed_q, kw_q = layer(1000, 1000, quantized)
        out32 = launch_a8_decoded(x, kw_q, None, tile=tile, out_dtype=torch.float32)
        check(out32, packed_q, x, None, 8, tol=1e-5)


def test_the_switched_on_a8_route_is_what_prepared_layers_the_op_and_graphs_run(monkeypatch):
    # with the decoded-codes GEMM switched on, PreparedLinear, the op (which binds per call and
    # builds the channel table each time) and a CUDA-graph replay give the same bits, and the
    # grouped GEMM's int8 path (below the switch) agrees with it to bf16 rounding
    from qvla_ros.kernels import ops

    packed, kw = layer(1000, 1000, RAGGED)
    bias = torch.randn(1000, device="cuda")
    monkeypatch.setattr(ops, "A8_DECODE_MIN_TOKENS", None)
    switched_off = PreparedLinear(kw, bias, 8)
    switched_off(torch.randn(590, 1000, device="cuda", dtype=torch.bfloat16))
    assert switched_off._a8_channels is None  # the route's channel table is held only where it runs
    monkeypatch.setattr(ops, "A8_DECODE_MIN_TOKENS", 24)
    device = torch.device("cuda")
    assert [route(m, 8, device) for m in (23, 24, 590)] == ["gemm_a8", "a8_decoded", "a8_decoded"]
    prepared = PreparedLinear(kw, bias, 8)
    for m in (24, 590, 24):
        x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
        want = mixed_bit_linear(x, kw, bias, 8)
        assert torch.equal(prepared(x), want), m
        check(want, packed, x, bias, 8)
        grouped = run(kw, x, bias, 8)
        assert float((grouped.float() - want.float()).norm() / want.float().norm()) < 1e-2
    captured = replayed_in_a_cuda_graph(lambda: prepared(x))
    assert torch.equal(captured, want)


@pytest.mark.parametrize("m", [1, 5, 17, 63, 65, 129, 333])
@pytest.mark.parametrize("act_bits", [16, 8])
def test_odd_shapes_and_ragged_groups(m, act_bits):
    # N = 1000 leaves one ragged group; K = 1000 is no multiple of 16 or of any K-block
    counts = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}
    packed, kw = layer(1000, 1000, counts)
    x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
    check(run(kw, x, None, act_bits), packed, x, None, act_bits)


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2, 0])
def test_layers_of_one_width(bits):
    packed, kw = layer(512, 2048, {bits: 512})
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(512, device="cuda")
    out = run(kw, x, bias, 16)
    if bits == 0:
        assert torch.equal(out, bias.to(out.dtype).expand_as(out))
    else:
        check(out, packed, x, bias, 16)


@pytest.mark.parametrize("m", [1, 16, 100])
def test_float16_activations(m):
    packed, kw = layer(640, 1536, mix_counts(640, MIXES["avg4"]))
    x = torch.randn(m, 1536, device="cuda", dtype=torch.float16)
    check(run(kw, x, None, 16), packed, x, None, 16)


@pytest.mark.parametrize("m", [1, 16, 200])
def test_fractional_zero_points(m):
    packed, kw = layer(384, 1024, {8: 64, 4: 128, 3: 128, 2: 64}, frac=True)
    assert not kw.integer_zero
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    check(run(kw, x, None, 16), packed, x, None, 16)


def test_int8_activations_match_the_reference_codes():
    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16) * 3
    codes, scale, total = quantize_activations(x)
    ref_codes, ref_scale, ref_total = quantize_activations_reference(x)
    # torch divides a CUDA tensor by a scalar as a multiplication by its reciprocal: 1 ulp apart
    torch.testing.assert_close(scale, ref_scale, rtol=2.5e-7, atol=0)
    # with scales 1 ulp apart a code on a rounding tie may land one step away; nothing else may
    # differ (a share of such codes would depend on the random draw: run 8 saw 25 of 151,552)
    assert int((codes.int() - ref_codes.int()).abs().max()) <= 1
    ratio = x.float() / ref_scale[:, None]
    off_tie = (ratio - ratio.floor() - 0.5).abs()
    assert bool((off_tie[codes != ref_codes] < 1e-4).all()), off_tie[codes != ref_codes].max()
    assert torch.equal(total, codes.int().sum(-1))


@pytest.mark.parametrize("act_bits", [16, 8])
def test_custom_op_in_a_cuda_graph(act_bits):
    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg4"]))
    x = torch.randn(2, 8, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1152, device="cuda")
    eager = mixed_bit_linear(x, kw, bias, act_bits)
    captured = replayed_in_a_cuda_graph(lambda: mixed_bit_linear(x, kw, bias, act_bits))
    assert captured.shape == (2, 8, 1152)
    assert torch.equal(captured, eager)


def test_float32_inputs_run_in_bfloat16_and_come_back_as_float32():
    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg8"]))
    x = torch.randn(3, 4096, device="cuda")
    y = mixed_bit_linear(x, kw)
    assert y.dtype == torch.float32
    check(y.to(torch.bfloat16), packed, x.to(torch.bfloat16), None, 16)


SPLIT_CONFIGS = [
    GemmConfig(bm=1, bn=16, wb=32, num_warps=2, num_stages=3, use_dot=False, split_k=8, bk16=256),
    GemmConfig(bm=16, bn=32, wb=32, num_warps=4, num_stages=3, split_k=4, bk16=128),
    GemmConfig(bm=32, bn=32, wb=32, num_warps=4, num_stages=3, split_k=2, bk16=128),
    GemmConfig(bm=128, bn=64, kstep=128, num_warps=8, num_stages=3, split_k=2),
]


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: f"bm{c.bm}-split{c.split_k}")
@pytest.mark.parametrize("act_bits", [16, 8])
def test_split_k_tiles_add_up_and_leave_no_trace(config, act_bits):
    if act_bits == 8 and not config.use_dot:
        pytest.skip("the 8-bit path runs on tensor cores only")
    counts = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}
    packed, kw = layer(1000, 1000, counts)
    for m in (1, 37):  # twice in a row: the arrival counters must be back at zero
        x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(1000, device="cuda")
        check(run(kw, x, bias, act_bits, config), packed, x, bias, act_bits)


def test_default_configs_cover_every_bucket():
    for m in (1, 2, 16, 17, 64, 65, 590, 4096):
        for act_bits in (16, 8):
            assert isinstance(pick_config(m, act_bits), GemmConfig)


# ---- the small-M kernel (triton_gemv.py) -----------------------------------------------------------

def run_gemv(kw, x, bias, config=None, out_dtype=None):
    out = torch.full((x.shape[0], kw.out_features), float("nan"), dtype=out_dtype or x.dtype, device=x.device)
    launch_gemv(x, kw, bias, out.dtype, config=config, out=out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_gemv_every_mix_at_few_tokens(mix, m):
    n, k = 1152, 4096
    packed, kw = layer(n, k, mix_counts(n, MIXES[mix]))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    check(run_gemv(kw, x, bias), packed, x, bias, 16)


@pytest.mark.parametrize("m", [1, 16])
def test_gemv_float32_output_shows_the_kernels_own_error(m):
    # exact decoding and float32 sums: only summation order separates it from the float64 oracle
    n, k = 1152, 4096
    packed, kw = layer(n, k, mix_counts(n, MIXES["avg4"]))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    out = run_gemv(kw, x, bias, out_dtype=torch.float32)
    ref = oracle(x.cpu(), packed, bias.cpu(), 16)
    assert float((out.cpu().to(torch.float64) - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("m", [1, 3, 7, 16])
def test_gemv_odd_shapes_and_ragged_groups(m):
    counts = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}
    packed, kw = layer(1000, 1000, counts)
    x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
    check(run_gemv(kw, x, None), packed, x, None, 16)


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2, 0])
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_layers_of_one_width(bits, m):
    packed, kw = layer(512, 2048, {bits: 512})
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(512, device="cuda")
    out = run_gemv(kw, x, bias)
    if bits == 0:
        assert torch.equal(out, bias.to(out.dtype).expand_as(out))
    else:
        check(out, packed, x, bias, 16)


@pytest.mark.parametrize("m", [1, 16])
def test_gemv_float16_and_fractional_zero_points(m):
    packed, kw = layer(640, 1536, mix_counts(640, MIXES["avg4"]))
    x = torch.randn(m, 1536, device="cuda", dtype=torch.float16)
    check(run_gemv(kw, x, None), packed, x, None, 16)
    packed, kw = layer(384, 1024, {8: 64, 4: 128, 3: 128, 2: 64}, frac=True)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    check(run_gemv(kw, x, None), packed, x, None, 16)


GEMV_CONFIGS = [
    GemvConfig(bm=1, bn=64, wb=16, bk16=32, split_k=4),
    GemvConfig(bm=1, bn=64, wb=16, bk16=32, split_k=4, asm=False),
    GemvConfig(bm=1, bn=32, wb=32, bk16=32, split_k=8, prefetch=False),
    GemvConfig(bm=1, bn=64, wb=64, bk16=32, split_k=2, num_warps=2),
    GemvConfig(bm=4, bn=16, wb=32, bk16=32, split_k=4),
    GemvConfig(bm=8, bn=16, wb=16, bk16=16, split_k=3),
    GemvConfig(bm=16, bn=16, wb=16, bk16=16, split_k=4),
    GemvConfig(bm=16, bn=16, wb=32, bk16=32, split_k=4, use_dot=True),
    GemvConfig(bm=16, bn=64, wb=32, bk16=32, split_k=2, use_dot=True, prefetch=False),
    GemvConfig(bm=16, bn=128, wb=128, bk16=32, split_k=4, use_dot=True, num_warps=8),
]


@pytest.mark.parametrize("config", GEMV_CONFIGS,
                         ids=lambda c: f"{'dot' if c.use_dot else 'fma'}-bm{c.bm}-bn{c.bn}-wb{c.wb}-split{c.split_k}"
                         f"{'' if c.prefetch else '-noprefetch'}{'' if c.asm else '-noasm'}")
def test_gemv_split_k_tiles_add_up_and_leave_no_trace(config):
    counts = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}
    packed, kw = layer(1000, 1000, counts)
    for m in (1, 16, config.bm):  # again and again: the arrival counters must be back at zero
        x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(1000, device="cuda")
        first = run_gemv(kw, x, bias, config)
        check(first, packed, x, bias, 16)
        # the last program to arrive adds the parts in split order: the same bits every time
        assert torch.equal(run_gemv(kw, x, bias, config), first)


def test_default_gemv_configs_cover_every_small_token_count():
    for m in range(1, 17):
        cfg = pick_gemv_config(m)
        assert isinstance(cfg, GemvConfig) and (cfg.bm >= m or cfg.use_dot)


@pytest.mark.parametrize("m", [1, 16])
def test_switch_sends_few_tokens_to_the_small_m_kernel_in_a_cuda_graph(m):
    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg4"]))
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1152, device="cuda")
    set_small_m_kernel("gemv")
    try:
        routing = _routing_state(m)
        eager = mixed_bit_linear(x, kw, bias)
        direct = run_gemv(kw, x, bias)
        # the op ran the small-M kernel; on a mismatch, say whether elements went unwritten (NaN),
        # whether the op ran the grouped GEMM instead, and what routed it
        if not torch.equal(eager, direct):
            differ = eager != direct
            pytest.fail(
                f"{int(differ.sum())} elements in {int(differ.any(0).sum())} channels differ; NaN (never written) "
                f"in the direct launch: {int(direct.isnan().sum())}, in the op's output: {int(eager.isnan().sum())}; "
                f"op == grouped GEMM: {torch.equal(eager, run(kw, x, bias, 16))}; routing before the op: {routing}")
        captured = replayed_in_a_cuda_graph(lambda: mixed_bit_linear(x, kw, bias))
        assert torch.equal(captured, eager)
    finally:
        set_small_m_kernel(None)
    check(eager, packed, x, bias, 16)


def test_auto_sends_one_token_to_the_small_m_kernel_and_more_to_the_grouped_gemm():
    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg4"]))
    bias = torch.randn(1152, device="cuda")
    set_small_m_kernel("auto")
    try:
        for m, direct in ((1, run_gemv), (2, lambda kw, x, bias: run(kw, x, bias, 16))):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            out = mixed_bit_linear(x, kw, bias)
            assert torch.equal(out, direct(kw, x, bias)), m
            check(out, packed, x, bias, 16)
    finally:
        set_small_m_kernel(None)


def test_the_gate_up_shapes_tuned_tile_is_correct():
    # (11008, 4096) has its own one-token tile, unlike the 1152-row layers of the other tests
    packed, kw = layer(11008, 4096, mix_counts(11008, MIXES["avg3"]))
    cfg = pick_gemv_config(1, 11008, 4096)
    assert cfg != pick_gemv_config(1)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(11008, device="cuda")
    out = run_gemv(kw, x, bias)  # the launcher picks the shape's tile
    assert torch.equal(out, run_gemv(kw, x, bias, cfg))
    check(out, packed, x, bias, 16)


RAGGED = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,counts,frac", [(1152, 4096, "avg4", False), (1000, 1000, "ragged", False),
                                             (4096, 11008, "avg3", False), (384, 1024, "frac", True)])
def test_decode_for_cublas_writes_the_reference_weights(dtype, n, k, counts, frac):
    mix = {"ragged": RAGGED, "frac": {8: 64, 4: 128, 3: 128, 2: 64}}.get(counts) or mix_counts(n, MIXES[counts])
    packed, kw = layer(n, k, mix, frac)
    w = launch_dequant(kw, dtype)
    # the same float32 arithmetic rounded once; pruned channels are zero rows
    assert torch.equal(w, dequantize_kernel_weights(kw, torch.float32).to(dtype))
    # into a caller's buffer (double-buffered decoding): every element rewritten, pruned rows too
    buffer = torch.full_like(w, float("nan"))
    from qvla_ros.kernels.ops import _bind_dequant
    decode = _bind_dequant(kw, dtype)
    assert decode(buffer) is buffer and torch.equal(buffer, w)
    with pytest.raises(ValueError, match="decode buffer"):
        decode(torch.empty(n, k + 1, dtype=dtype, device=w.device))


def test_many_tokens_go_to_decode_then_cublas_also_in_a_cuda_graph():
    packed, kw = layer(1000, 1000, RAGGED)
    bias = torch.randn(1000, device="cuda")
    # the default
    for m in (DEQUANT_MIN_TOKENS - 1, DEQUANT_MIN_TOKENS, 590):
        x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
        out = mixed_bit_linear(x, kw, bias)
        direct = dequant_linear(x, kw, bias) if m >= DEQUANT_MIN_TOKENS else run(kw, x, bias, 16)
        assert torch.equal(out, direct), m
        check(out, packed, x, bias, 16)
    captured = replayed_in_a_cuda_graph(lambda: mixed_bit_linear(x, kw, bias))
    assert torch.equal(captured, out)


@pytest.mark.parametrize("act_bits", [16, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_prepared_layer_is_bit_identical_to_the_op_on_every_route(act_bits, dtype):
    # PreparedLinear binds each route once per token count; the op binds per call: same launches
    packed, kw = layer(1000, 1000, RAGGED)
    bias = torch.randn(1000, device="cuda")
    prepared = PreparedLinear(kw, bias, act_bits)
    for small in ("auto", "gemv"):
        set_small_m_kernel(small)
        try:
            for m in (1, 2, 16, 17, DEQUANT_MIN_TOKENS, 590, 1, 590):  # repeated: the bound routes again
                x = torch.randn(2, m, 1000, device="cuda", dtype=dtype)[1]
                want = mixed_bit_linear(x, kw, bias, act_bits)
                assert torch.equal(prepared(x), want), (small, m)
                assert torch.equal(prepared(x[None])[0], want), (small, m)
            captured = replayed_in_a_cuda_graph(lambda: prepared(x))
            assert torch.equal(captured, want)
        finally:
            set_small_m_kernel(None)


def _routing_state(m) -> dict:
    """What decides the op's kernel choice, as seen from the test and from the registered op."""
    import os
    import sys

    import torch._library.custom_ops as custom_ops

    from qvla_ros.kernels import ops, runs_small_m_kernel

    registered = custom_ops.OPDEFS.get("qvla::mixed_bit_linear")
    op_globals = registered._init_fn.__globals__ if registered is not None else {}
    copies = {name: mod.__dict__.get("_small_m_kernel") for name, mod in list(sys.modules.items())
              if str(getattr(mod, "__file__", "") or "").endswith(os.path.join("kernels", "ops.py"))}
    return {"test sees": runs_small_m_kernel(m), "op module": op_globals.get("__name__"),
            "op module is ours": op_globals is vars(ops), "op sees": op_globals.get("_small_m_kernel"),
            "copies of ops.py": copies, "env": os.environ.get("QVLA_SMALL_M_KERNEL")}


def test_mixed_bit_linear_on_the_gpu_holds_one_copy_of_its_weights():
    from torch import nn

    from qvla_ros.quant.mixed_linear import MixedBitLinear

    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(4096, 2048)
    bits = torch.tensor([16, 8, 4, 3, 2, 0]).repeat_interleave(2048 // 8)
    bits = torch.cat([bits, torch.full((2048 - bits.numel(),), 4)])[torch.randperm(2048, generator=gen)]
    module = MixedBitLinear.from_linear(linear, bits)
    packed = module.packed_weight()  # CPU views: the oracle's input
    x = torch.randn(3, 4096)
    y_cpu = module(x)
    state = {name: t.clone() for name, t in module.state_dict().items()}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    module.cuda()
    held = torch.cuda.memory_allocated() - base
    assert module.kernel_resident
    assert all(buf.is_meta for name, buf in module.named_buffers() if name != "bias")
    # the kernel layout (float32 scales, out_index) plus the bias: about the packed size, not twice it
    assert held < 1.05 * module.packed_nbytes() + 4 * 2048 + 2 ** 20, (held, module.packed_nbytes())
    y = module(x.cuda().to(torch.bfloat16))
    check(y, packed, x.to(torch.bfloat16), module.bias, 16)
    assert torch.equal(module.packed_weight().groups[1].qweight.cpu(), packed.groups[1].qweight)
    for name, t in module.state_dict().items():
        assert torch.equal(t.cpu(), state[name]), name
    module.cpu()
    assert torch.equal(module(x), y_cpu)


def test_scratch_does_not_grow_inside_a_graph_capture():
    from qvla_ros.kernels import launch_common

    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg4"]))
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    split = GemmConfig(bm=16, bn=16, wb=32, num_warps=2, num_stages=3, split_k=4, bk16=128)
    saved = launch_common.SPLIT_SCRATCH.pop(x.device, None)  # a fresh process: the first split-K launch makes it
    try:
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="before capturing"):
            with torch.cuda.graph(graph):
                launch_mixed_gemm(x, kw, None, x.dtype, 16, config=split)
        # outside a capture the scratch is made (zeroed) and the launch is right
        out = run(kw, x, None, 16, split)
        check(out, packed, x, None, 16)
    finally:
        if saved is not None:
            launch_common.SPLIT_SCRATCH[x.device] = saved


def test_bound_launches_go_direct_and_fall_back_where_triton_would_specialize_otherwise():
    # PreparedLinear's routes launch the compiled kernel directly after their first call
    # (launch_common.BoundLaunch); an input whose 16-byte alignment differs from the first call's
    # must go through Triton's JIT again, which picks the kernel compiled for it.
    from qvla_ros.kernels.launch_common import BoundLaunch
    from qvla_ros.kernels.triton_gemm import act_quant_kernel

    assert BoundLaunch.direct  # the module's fixture
    m, k = 33, 1000
    launch = BoundLaunch(act_quant_kernel, (m,), BLOCK=1024, num_warps=4)
    flat = torch.randn(m * k + 1, device="cuda", dtype=torch.bfloat16)
    aligned, shifted = flat[:-1].view(m, k), flat[1:].view(m, k)  # the second 2 bytes off
    assert shifted.data_ptr() % 16
    def outputs():
        return (torch.full((m, k), 77, dtype=torch.int8, device="cuda"),
                torch.full((m,), float("nan"), device="cuda"), torch.full((m,), -1, dtype=torch.int32, device="cuda"))

    for x in (aligned, aligned, shifted, aligned, shifted):
        got, want = outputs(), outputs()
        launch(x, *got, k, x.stride(0))
        assert launch._compiled  # bound after the first call, and no direct launch was refused
        # the oracle: the same kernel through Triton's JIT, which specializes on this input
        act_quant_kernel[(m,)](x, *want, k, x.stride(0), BLOCK=1024, num_warps=4)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        # and the JIT's result is the reference's (scales 1 ulp apart at most, as
        # test_int8_activations_match_the_reference_codes allows)
        torch.testing.assert_close(got[1], quantize_activations_reference(x)[1], rtol=2.5e-7, atol=0)

    packed, kw = layer(1000, 1024, RAGGED)
    bias = torch.randn(1000, device="cuda")
    for m in (17, 590):  # the grouped GEMM; decode-then-cuBLAS
        prepared = PreparedLinear(kw, bias, 16)
        flat = torch.randn(m * 1024 + 1, device="cuda", dtype=torch.bfloat16)
        x, shifted = flat[:-1].view(m, 1024), flat[1:].view(m, 1024)
        first = prepared(x)
        check(first, packed, x, bias, 16)
        for _ in range(2):
            assert torch.equal(prepared(x), first)
        check(prepared(shifted), packed, shifted, bias, 16)
