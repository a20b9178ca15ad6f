"""The tensor-core small-M kernel (kernels/mixed_gemv_mma.cu) on a CUDA GPU against the quant
module's oracle (skipped without a GPU or without nvcc).

Every bit mix at token counts on both sides of the 8-token tensor-core tile, odd shapes (N and K off
every tile, K not a multiple of 8: the dense rows' unaligned path), layers of one width, float16,
fractional zero-points, every compiled tile, x staged in several chunks, and the op's routing in a
CUDA graph. Outputs are filled with NaN first, so an element the kernel never writes fails.
"""
import pytest
import torch

from qvla_ros.kernels import mixed_bit_linear, set_small_m_kernel
from qvla_ros.kernels.cuda_gemv import MmaConfig, chunk_plan, compiled_tiles, launch_mma_gemv, mma_available
from qvla_ros.kernels.testing import MIXES, mix_counts, replayed_in_a_cuda_graph
from qvla_ros.quant.kernel_oracle import check_against_oracle as check, gpu_layer as layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RAGGED = {16: 48, 8: 96, 4: 400, 3: 256, 2: 152, 0: 48}


@pytest.fixture(scope="module", autouse=True)
def built():
    if not mma_available():
        pytest.skip("the tensor-core kernel did not build here (no nvcc, or compute capability < 8.0)")


def run_mma(kw, x, bias, config=None, out_dtype=None):
    out = torch.full((x.shape[0], kw.out_features), float("nan"), dtype=out_dtype or x.dtype, device=x.device)
    launch_mma_gemv(x, kw, bias, out.dtype, config=config, out=out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16])
def test_every_mix_at_few_tokens(mix, m):
    n, k = 1152, 4096
    packed, kw = layer(n, k, mix_counts(n, MIXES[mix]))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    check(run_mma(kw, x, bias), packed, x, bias)


@pytest.mark.parametrize("m", [1, 16])
def test_float32_output_shows_the_kernels_own_error(m):
    # exact decoding, float32 tensor-core sums: only summation order separates it from float64
    n, k = 1152, 4096
    packed, kw = layer(n, k, mix_counts(n, MIXES["avg4"]))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    check(run_mma(kw, x, bias, out_dtype=torch.float32), packed, x, bias, tol=1e-4)


@pytest.mark.parametrize("n,k", [(1000, 1000), (1000, 999), (55, 4100)])
@pytest.mark.parametrize("m", [1, 3, 11])
def test_odd_shapes_and_ragged_groups(n, k, m):
    counts = RAGGED if n == 1000 else {16: 16, 4: 16, 2: 16, 3: 7}
    packed, kw = layer(n, k, counts)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    check(run_mma(kw, x, bias), packed, x, bias)


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2, 0])
@pytest.mark.parametrize("m", [1, 16])
def test_layers_of_one_width(bits, m):
    packed, kw = layer(512, 2048, {bits: 512})
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(512, device="cuda")
    out = run_mma(kw, x, bias)
    if bits == 0:
        assert torch.equal(out, bias.to(out.dtype).expand_as(out))
    else:
        check(out, packed, x, bias)


@pytest.mark.parametrize("m", [1, 5, 16])
def test_float16_and_fractional_zero_points(m):
    packed, kw = layer(640, 1536, mix_counts(640, MIXES["avg4"]))
    x = torch.randn(m, 1536, device="cuda", dtype=torch.float16)
    check(run_mma(kw, x, None), packed, x, None)
    packed, kw = layer(384, 1024, {8: 64, 4: 128, 3: 128, 2: 64}, frac=True)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    check(run_mma(kw, x, None), packed, x, None)


@pytest.mark.parametrize("tile", sorted(compiled_tiles()), ids=lambda t: "rt{}-wk{}-u{}".format(*t))
@pytest.mark.parametrize("block_steps", [4, 32])
def test_every_compiled_tile_and_splits_along_k(tile, block_steps):
    # block_steps 4: rows split along K over several blocks; the last to arrive adds the parts in
    # order, so a second launch gives the same bits (and the counters are back at zero)
    packed, kw = layer(1000, 1000, RAGGED)
    for m in (1, 8, 16):
        x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(1000, device="cuda")
        first = run_mma(kw, x, bias, MmaConfig(*tile, block_steps=block_steps))
        check(first, packed, x, bias)
        assert torch.equal(run_mma(kw, x, bias, MmaConfig(*tile, block_steps=block_steps)), first)


def test_x_staged_in_several_chunks_gives_the_one_chunk_result():
    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg3"]))
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    small = MmaConfig(2, 4, 2, smem_budget=8 * 1024, block_steps=1024)
    large = MmaConfig(2, 4, 2, smem_budget=200 * 1024, block_steps=1024)
    chunks_small = [chunk for _, _, chunk in chunk_plan(kw, 16, small)[0]]
    chunks_large = [chunk for _, _, chunk in chunk_plan(kw, 16, large)[0]]
    assert all(a < b for a, b in zip(chunks_small[1:], chunks_large[1:]) if b)  # several chunks vs one
    out = run_mma(kw, x, None, small, out_dtype=torch.float32)
    ref = run_mma(kw, x, None, large, out_dtype=torch.float32)
    check(out, packed, x, None, tol=1e-4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_the_switch_routes_few_tokens_to_the_mma_kernel_also_in_a_cuda_graph():
    packed, kw = layer(1152, 4096, mix_counts(1152, MIXES["avg4"]))
    bias = torch.randn(1152, device="cuda")
    set_small_m_kernel("mma")
    try:
        for m in (1, 16):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            out = mixed_bit_linear(x, kw, bias)
            assert torch.equal(out, run_mma(kw, x, bias)), m
            check(out, packed, x, bias)
        captured = replayed_in_a_cuda_graph(lambda: mixed_bit_linear(x, kw, bias))
        assert torch.equal(captured, out)
        # 17 tokens are past the kernel: the grouped GEMM runs them
        x = torch.randn(17, 4096, device="cuda", dtype=torch.bfloat16)
        check(mixed_bit_linear(x, kw, bias), packed, x, bias)
    finally:
        set_small_m_kernel(None)


def test_bad_calls_are_refused_with_a_reason():
    packed, kw = layer(512, 2048, {4: 512})
    with pytest.raises(ValueError, match="at most 16 tokens"):
        launch_mma_gemv(torch.randn(17, 2048, device="cuda", dtype=torch.bfloat16), kw, None, torch.bfloat16)
    with pytest.raises(ValueError, match="features"):
        launch_mma_gemv(torch.randn(1, 2047, device="cuda", dtype=torch.bfloat16), kw, None, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        launch_mma_gemv(torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16), kw, None, torch.float16)
