"""The small-M kernel compiled for the H100/H200 (sm_90) on a machine without a GPU (Triton ships
ptxas and cuobjdump): it must compile (the interpreter runs things the compiler refuses), without
register spills, with registers for at least 4 blocks of 128 threads per SM. Its two ways of keeping
weight bytes in flight must show in the assembly: register double buffering (PREFETCH) leaves the
one-token weight loops without shared-memory traffic or barriers, and software pipelining (STAGES,
the one-token default) streams the weights through asynchronous global-to-shared copies."""
import pytest

pytest.importorskip("triton")

from qvla_ros.kernels import GemvConfig, pick_gemv_config  # noqa: E402

#: run 4's one-token tile: register double buffering, no pipelining
REGISTER_PREFETCH = GemvConfig(bm=1, bn=64, wb=16, bk16=32, split_k=4)


@pytest.fixture(scope="module")
def compiled():
    from qvla_ros.kernels.offline_compile import compile_gemv

    try:
        out = {m: compile_gemv(pick_gemv_config(m)) for m in (1, 16)}
        out["gate/up"] = compile_gemv(pick_gemv_config(1, 11008, 4096))
        out["prefetch"] = compile_gemv(REGISTER_PREFETCH)
        return out
    except FileNotFoundError as e:  # a Triton build without the NVIDIA tools
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("tile", [1, 16, "gate/up", "prefetch"])
def test_default_small_m_tiles_compile_for_sm90_without_spills(compiled, tile):
    result = compiled[tile]
    assert result["spill_bytes"] == 0, {k: v for k, v in result.items() if k != "ttgir"}
    assert result["registers"] <= 128 and result["blocks_per_sm"] >= 4, result["registers"]
    assert any(loop["ffma"] or loop["mma"] for loop in result["loops"])


@pytest.mark.slow
def test_register_prefetch_weight_loops_stay_in_registers(compiled):
    loops = [loop for loop in compiled["prefetch"]["loops"] if loop["ffma"]]
    assert len(loops) >= 5  # the dense rows and the four quantized widths
    for loop in loops:
        assert loop["lds"] == loop["sts"] == loop["bar"] == loop["ldgsts"] == 0, loop
        assert loop["ldg"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("tile", [1, "gate/up"])
def test_pipelined_one_token_loops_stream_weights_by_asynchronous_copies(compiled, tile):
    assert pick_gemv_config(1).stages > 1
    loops = [loop for loop in compiled[tile]["loops"] if loop["ffma"]]
    assert len(loops) >= 5
    for loop in loops:
        assert loop["ldgsts"] > 0, loop  # the next stages' words are copied while this one is decoded


@pytest.mark.slow
@pytest.mark.parametrize("w_dtype", ["bf16", "fp16", "i8"])
def test_decode_for_cublas_writes_whole_vectors(w_dtype):
    # one 2-byte store per weight made the first H200 run's decode 20x slower than its bytes (i8:
    # the codes the 8-bit-activation GEMM reads, 8 per thread)
    from qvla_ros.kernels.offline_compile import compile_dequant

    try:
        result = compile_dequant(w_dtype=w_dtype)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert result["spill_bytes"] == 0, result
    assert not any(op.endswith((".U16", ".16", ".U8")) for op in result["stores"]), result["stores"]
    assert result["stores"].get("STG.E.128", 0) > 0, result["stores"]


@pytest.mark.slow
def test_the_a8_decoded_gemm_runs_on_int8_wgmma_without_spills():
    # the default tile of the many-token A8 route: Hopper's int8 tensor-core instruction in the
    # main loop, everything in registers
    from qvla_ros.kernels.offline_compile import compile_a8_gemm
    from qvla_ros.kernels.ops import A8_GEMM_TILE

    try:
        result = compile_a8_gemm(A8_GEMM_TILE)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert result["spill_bytes"] == 0, result
    assert any(op.startswith("IGMMA") for op in result["tensor_core_ops"]), result
    assert result["shared_bytes"] <= 227 * 1024, result
