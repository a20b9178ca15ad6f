"""The tensor-core small-M kernel's host side on any machine, and its sm_90 build where nvcc exists.

The kernel itself runs only on a GPU (test_kernels_mma_gpu.py); here: the tile list and configs,
the chunked staging plan (what sizes the launch's shared memory), the switch, and an offline build
for sm_90 read back with cuobjdump: no local memory, tensor-core instructions in every width's loop.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from qvla_ros.kernels import runs_small_m_kernel, set_small_m_kernel, small_m_kernel
from qvla_ros.kernels.cuda_gemv import (MAX_SMEM, MMA_MAX_TOKENS, SOURCE, MmaConfig, _Params, _token_stride,
                                        build_library, chunk_plan, chunk_unit, compiled_tiles, load_library,
                                        mma_bucket, nvcc_path, override_mma_configs, params_layout, pick_mma_config)
from qvla_ros.kernels.offline_compile import _cuobjdump as _triton_cuobjdump
from qvla_ros.kernels.ops import small_m_route
from qvla_ros.kernels.testing import MIXES, mix_counts, random_kernel_weights


def test_the_tile_list_is_read_from_the_source_and_configs_must_name_one():
    tiles = compiled_tiles()
    block = SOURCE.read_text().split("#define QVLA_MMA_TILES")[1].split("\n\n")[0]
    assert len(tiles) == block.count("QVLA_TILE(") and (1, 8, 2) in tiles
    for m in range(1, MMA_MAX_TOKENS + 1):
        cfg = pick_mma_config(m)
        assert (cfg.row_tiles, cfg.k_warps, cfg.unroll) in tiles
    with pytest.raises(ValueError, match="no compiled tile"):
        MmaConfig(3, 3, 3)
    with pytest.raises(ValueError, match="smem_budget"):
        MmaConfig(1, 8, 2, smem_budget=1024)
    with pytest.raises(ValueError, match="1..16 tokens"):
        mma_bucket(17)
    with pytest.raises(ValueError, match="unknown bucket"):
        override_mma_configs({"m4": MmaConfig()})
    with pytest.raises(TypeError, match="MmaConfig"):
        override_mma_configs({"m1": (1, 8, 2)})


@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("k", [1000, 4096, 11008])
@pytest.mark.parametrize("tile", sorted(compiled_tiles()))
def test_staging_chunks_are_whole_units_and_fit_the_budget_when_they_can(m, k, tile):
    kw = random_kernel_weights(64 * 5, k, {16: 64, 8: 64, 4: 64, 3: 64, 2: 64}, "cpu")
    cfg = MmaConfig(*tile, smem_budget=48 * 1024)
    unit = chunk_unit(cfg)
    assert unit % 2 == 0 and unit % (cfg.k_warps * cfg.unroll) == 0
    if m * _token_stride(2, unit) > MAX_SMEM:  # not even one unit of 2-bit pairs fits this many tokens
        with pytest.raises(ValueError, match="fewer warps along K"):
            chunk_plan(kw, m, cfg)
        return
    plan, smem = chunk_plan(kw, m, cfg)
    for bits, (splits, split_steps, chunk) in zip((16, 8, 4, 3, 2), plan):
        steps = -(-k // 32) if bits == 16 else -(-k // {8: 128, 4: 256, 3: 512, 2: 512}[bits]) * 2
        assert chunk % unit == 0 and chunk > 0 and split_steps % chunk == 0
        # the splits cover the row once: the last one holds the remainder
        assert (splits - 1) * split_steps < steps <= splits * split_steps
        # the fewest chunks that fit; a single unit may exceed the budget (then it is all there is)
        assert m * _token_stride(bits, chunk) <= cfg.smem_budget or chunk == unit
        assert smem >= m * _token_stride(bits, chunk)
    # every width's blocks stream about the same bytes: a dense row tile is split into about twice
    # the splits of an 8-bit one and four times a 4-bit one's
    if k == 11008 and cfg.smem_budget >= 48 * 1024 and m == 1:
        assert plan[0][0] >= 2 * plan[1][0] - 1 and plan[1][0] >= 2 * plan[2][0] - 1
    assert smem <= MAX_SMEM


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2])
def test_neighbouring_tokens_land_on_other_banks(bits):
    # lanes g and g + 1 read tokens one stride apart; a stride of 16 bytes per pair in a vector
    # (mod 128) spreads a quarter-warp's 16-byte reads over all 32 banks
    vec = min({16: 1, 8: 2, 4: 4, 3: 8, 2: 8}[bits], 4)
    for steps in (2, 4, 6, 16, 34):
        assert _token_stride(bits, steps) % 128 == (16 * vec) % 128
        assert _token_stride(bits, steps) >= steps * 16 * {16: 1, 8: 2, 4: 4, 3: 8, 2: 8}[bits] * 4


def test_the_mma_switch_sends_up_to_16_tokens_and_falls_back_without_the_kernel(monkeypatch):
    monkeypatch.delenv("QVLA_SMALL_M_KERNEL", raising=False)
    set_small_m_kernel("mma")
    try:
        assert small_m_kernel() == "mma"
        assert [runs_small_m_kernel(m) for m in (1, 2, 16, 17)] == [True, True, True, False]
        if not torch.cuda.is_available():  # no GPU: the Triton small-M kernel is what would run
            assert small_m_route(4, torch.device("cuda", 0)) == "gemv"
        assert small_m_route(17, torch.device("cuda", 0)) is None
    finally:
        set_small_m_kernel(None)
    # the CPU path is the reference whatever the switch says
    from qvla_ros.kernels import mixed_bit_linear, mixed_bit_linear_reference
    kw = random_kernel_weights(64, 256, mix_counts(64, MIXES["avg4"]), "cpu")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    set_small_m_kernel("mma")
    try:
        assert torch.equal(mixed_bit_linear(x, kw), mixed_bit_linear_reference(x, kw, None, 16))
    finally:
        set_small_m_kernel(None)


@pytest.fixture(scope="module")
def sm90_library(tmp_path_factory):
    """The library as the GPU machine builds it, here for sm_90: (path, loaded library, SASS)."""
    if nvcc_path() is None:
        pytest.skip("nvcc not installed")
    try:  # the CUDA toolkit's, else the one Triton ships
        cuobjdump = shutil.which("cuobjdump") or _triton_cuobjdump()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"no cuobjdump: {e}")
    saved = os.environ.get("QVLA_KERNEL_CACHE")
    os.environ["QVLA_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernel-cache"))
    try:
        path = build_library("90")
    finally:
        if saved is None:
            del os.environ["QVLA_KERNEL_CACHE"]
        else:
            os.environ["QVLA_KERNEL_CACHE"] = saved
    sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return path, load_library(path), sass


def test_the_built_library_exports_its_entry_points_and_tiles(sm90_library):
    # the launcher's ctypes calls need both symbols exported (a parameter typed in the source's
    # unnamed namespace once hid qvla_mma_gemv); the tile list it reports is the one Python reads
    _, lib, _ = sm90_library
    out = (ctypes.c_int * 64)()
    count = lib.qvla_mma_tiles(out, 64)
    assert {tuple(out[3 * i:3 * i + 3]) for i in range(count)} == compiled_tiles()
    assert callable(lib.qvla_mma_gemv)


def test_the_launchers_params_mirror_has_the_kernels_layout(sm90_library):
    # load_library refuses a mismatch; here the two layouts side by side, and the check failing on a
    # mirror with one field fewer
    _, lib, _ = sm90_library
    out = (ctypes.c_longlong * 64)()
    count = lib.qvla_mma_params_layout(out, 64)
    assert list(out[:count]) == params_layout() and count == len(_Params._fields_) + 1

    class Shifted(ctypes.Structure):
        _fields_ = [f for f in _Params._fields_ if f[0] != "high_offset"]

    mirror = [ctypes.sizeof(Shifted)] + [getattr(Shifted, name).offset for name, _ in Shifted._fields_]
    assert mirror != list(out[:len(mirror)])


def test_the_sm90_build_spills_nothing_and_multiplies_on_tensor_cores(sm90_library):
    _, _, sass = sm90_library
    assert "LDL" not in sass and "STL" not in sass  # nothing in local memory
    kernels = sass.count("Function : ")
    assert kernels == 2 * 2 * len(compiled_tiles())  # bf16/fp16 x one or two token tiles x tiles
    # every kernel multiplies with HMMA (mma.sync): at least one per width's products
    for body in sass.split("Function : ")[1:]:
        assert body.count("HMMA.16816.F32") >= 5
