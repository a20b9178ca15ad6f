"""The small-M kernel compiled for the H100/H200 (sm_90) on a machine without a GPU (Triton ships
ptxas and cuobjdump): it must compile (the interpreter runs things the compiler refuses), without
register spills, with registers for at least 4 blocks of 128 threads per SM, and, for one token,
with no shared-memory traffic or barrier in the weight loops (the design of triton_gemv.py)."""
import pytest

pytest.importorskip("triton")

from qvla_ros.kernels import pick_gemv_config  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    from qvla_ros.kernels.offline_compile import compile_gemv

    try:
        return {m: compile_gemv(pick_gemv_config(m)) for m in (1, 16)}
    except FileNotFoundError as e:  # a Triton build without the NVIDIA tools
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 16])
def test_default_small_m_tiles_compile_for_sm90_without_spills(compiled, m):
    result = compiled[m]
    assert result["spill_bytes"] == 0, result
    assert result["registers"] <= 128 and result["blocks_per_sm"] >= 4, result
    assert any(loop["ffma"] or loop["mma"] for loop in result["loops"])


@pytest.mark.slow
def test_one_token_weight_loops_stay_in_registers(compiled):
    loops = [loop for loop in compiled[1]["loops"] if loop["ffma"]]
    assert len(loops) >= 5  # the dense rows and the four quantized widths
    for loop in loops:
        assert loop["lds"] == loop["sts"] == loop["bar"] == 0, loop
        assert loop["ldg"] > 0
