"""The Triton kernels themselves, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Small shapes through every code path of the grouped GEMM (one token FMA, per-field tensor-core
products, whole-step products, 8-bit activations, fp16, folded zero-points, K not a multiple of
any block) and of the small-M kernel (FMA at 1-16 tokens, tensor cores at 16, split-K, with and
without prefetching, every width including the 3-bit planes, ragged and one-width layers) against
the quant module's oracle, with the output filled with NaN first. The interpreter must be switched
on before Triton compiles anything, so the cases run in a child process (this file run as a
script). Skipped where Triton is not installed.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from interpreter import run_interpreted  # noqa: E402

# (case, out_features, in_features, counts, tokens, config kwargs, act_bits, dtype, fractional zero, bias)
EVERY = {16: 16, 8: 16, 4: 16, 3: 16, 2: 16, 0: 16}
CASES = [
    ("one-token-fma", 96, 300, EVERY, 1, dict(bm=1, bn=16, use_dot=False), 16, "bfloat16", False, True),
    ("split-wb32", 96, 300, EVERY, 5, dict(bm=16, bn=16, wb=32), 16, "bfloat16", False, True),
    ("split-wb64-odd-blocks", 96, 300, EVERY, 20, dict(bm=16, bn=32, wb=64), 16, "bfloat16", False, False),
    ("joined-k64", 96, 300, EVERY, 20, dict(bm=16, bn=16, kstep=64), 16, "bfloat16", False, True),
    ("joined-k256", 96, 300, EVERY, 20, dict(bm=16, bn=16, kstep=256), 16, "bfloat16", False, True),
    ("a8-split", 96, 300, EVERY, 20, dict(bm=16, bn=16, wb=32), 8, "bfloat16", False, True),
    ("a8-joined", 96, 300, EVERY, 20, dict(bm=16, bn=32, kstep=128), 8, "bfloat16", False, False),
    ("fp16-split", 96, 300, EVERY, 3, dict(bm=16, bn=16, wb=32), 16, "float16", False, True),
    ("fold-split", 80, 200, {8: 16, 4: 32, 3: 16, 2: 16}, 5, dict(bm=16, bn=16, wb=32), 16, "bfloat16", True, True),
    ("fold-joined", 80, 200, {8: 16, 4: 32, 3: 16, 2: 16}, 5, dict(bm=16, bn=16, kstep=128), 16, "bfloat16", True,
     False),
    ("fold-fma", 80, 200, {8: 16, 4: 32, 3: 16, 2: 16}, 1, dict(bm=1, bn=16, use_dot=False), 16, "float16", True,
     True),
    ("ragged-tiny-layer", 7, 40, {8: 3, 2: 2, 0: 2}, 3, dict(bm=16, bn=16, wb=32), 16, "bfloat16", False, True),
    ("all-pruned", 32, 64, {0: 32}, 2, dict(bm=16, bn=16, wb=32), 16, "bfloat16", False, True),
    ("split-k3-fma", 96, 600, EVERY, 1, dict(bm=1, bn=16, bk16=256, use_dot=False, split_k=3), 16, "bfloat16",
     False, True),
    ("split-k4-dot", 96, 600, EVERY, 5, dict(bm=16, bn=16, split_k=4), 16, "bfloat16", False, True),
    ("split-k2-joined", 96, 600, EVERY, 20, dict(bm=16, bn=16, kstep=128, split_k=2), 16, "bfloat16", False,
     False),
    ("split-k3-a8", 96, 600, EVERY, 20, dict(bm=16, bn=16, split_k=3), 8, "bfloat16", False, True),
    ("split-k2-fold", 80, 600, {8: 16, 4: 32, 3: 16, 2: 16}, 5, dict(bm=16, bn=16, split_k=2), 16, "float16", True,
     True),
]


# the small-M kernel (triton_gemv.py): (case, N, K, counts, tokens, GemvConfig kwargs, dtype, fractional
# zero, bias, output dtype). A float32 output shows the kernel's own error (~1e-7: exact decoding,
# float32 sums), far below what bf16 rounding would hide; "same" stores in x's type.
RAGGED = {16: 16, 8: 16, 4: 32, 3: 16, 2: 3, 0: 16}  # N = 99, the 2-bit group ragged
GEMV_CASES = [
    ("gemv-m1-fma", 96, 300, EVERY, 1, dict(bm=1, bn=16, wb=32), "bfloat16", False, True, "float32"),
    ("gemv-m1-fma-bf16-out", 96, 300, EVERY, 1, dict(bm=1, bn=32, wb=16), "bfloat16", False, True, "same"),
    # K a whole number of K-blocks of every width (512) / of the 8- and 4-bit ones only (768): the
    # one-token loops of those widths load x unmasked
    ("gemv-m1-even-k512", 96, 512, EVERY, 1, dict(bm=1, bn=16, wb=16, split_k=2), "bfloat16", False, True,
     "float32"),
    ("gemv-m1-k768-partly-even", 96, 768, EVERY, 1, dict(bm=1, bn=32, wb=32, split_k=3), "bfloat16", False, True,
     "float32"),
    ("gemv-m1-wb64-split2", 96, 600, EVERY, 1, dict(bm=1, bn=16, wb=64, split_k=2), "bfloat16", False, True,
     "float32"),
    ("gemv-m5-dot-wb128", 96, 1100, EVERY, 5, dict(bm=16, bn=16, wb=128, split_k=2, use_dot=True), "bfloat16",
     False, False, "float32"),
    ("gemv-m1-pipelined-3-stages", 96, 600, EVERY, 1, dict(bm=1, bn=16, wb=32, bk16=128, prefetch=False, stages=3),
     "bfloat16", False, True, "float32"),
    ("gemv-m5-dot-pipelined-split2", 96, 1100, EVERY, 5, dict(bm=16, bn=16, wb=32, split_k=2, use_dot=True,
                                                              prefetch=False, stages=4), "bfloat16", False, True,
     "float32"),
    ("gemv-m1-split3-no-prefetch", 96, 600, EVERY, 1, dict(bm=1, bn=16, wb=16, bk16=128, split_k=3,
                                                          prefetch=False), "bfloat16", False, False, "float32"),
    ("gemv-m5-fma-bm8-split2", 96, 300, EVERY, 5, dict(bm=8, bn=16, wb=16, bk16=32, split_k=2), "bfloat16", False,
     True, "float32"),
    ("gemv-m5-fma-bm2-token-tiles", 99, 333, RAGGED, 5, dict(bm=2, bn=16, wb=32, split_k=2), "bfloat16", False,
     True, "float32"),
    ("gemv-m16-fma-bm16", 96, 300, EVERY, 16, dict(bm=16, bn=16, wb=16, bk16=16), "bfloat16", False, False,
     "float32"),
    ("gemv-m16-dot-split4", 96, 600, EVERY, 16, dict(bm=16, bn=16, wb=32, bk16=32, split_k=4, use_dot=True),
     "bfloat16", False, True, "float32"),
    ("gemv-m1-dot-bf16-out", 99, 333, RAGGED, 1, dict(bm=16, bn=32, wb=16, use_dot=True), "bfloat16", False, True,
     "same"),
    ("gemv-m5-dot-fp16", 96, 300, EVERY, 5, dict(bm=16, bn=16, wb=16, use_dot=True, split_k=2), "float16", False,
     False, "same"),
    ("gemv-m1-fma-fp16-fractional-zero", 80, 200, {8: 16, 4: 32, 3: 16, 2: 16}, 1, dict(bm=1, bn=16, wb=32),
     "float16", True, True, "float32"),
    ("gemv-m16-dot-fractional-zero", 80, 200, {8: 16, 4: 32, 3: 16, 2: 16}, 16,
     dict(bm=16, bn=16, wb=16, use_dot=True, prefetch=False), "bfloat16", True, True, "float32"),
    ("gemv-one-width-3bit-ragged", 37, 77, {3: 37}, 5, dict(bm=8, bn=16, wb=16, split_k=2), "bfloat16", False, True,
     "float32"),
    ("gemv-one-width-16bit", 40, 77, {16: 40}, 1, dict(bm=1, bn=16, bk16=16, split_k=2), "bfloat16", False, True,
     "float32"),
    ("gemv-one-width-8bit-dot", 48, 130, {8: 48}, 5, dict(bm=16, bn=16, wb=16, use_dot=True), "bfloat16", False,
     False, "float32"),
    ("gemv-ragged-tiny-layer", 7, 40, {8: 3, 2: 2, 0: 2}, 1, dict(bm=1, bn=16, wb=16), "bfloat16", False, True,
     "float32"),
    ("gemv-all-pruned", 32, 64, {0: 32}, 5, dict(bm=8, bn=16, split_k=2), "bfloat16", False, True, "float32"),
    ("gemv-all-pruned-no-bias", 32, 64, {0: 32}, 1, dict(bm=1, bn=16), "bfloat16", False, False, "float32"),
]


def run_gemv_cases() -> dict:
    """Every small-M case in this process (the interpreter must already be on)."""
    import torch

    from qvla_ros.kernels import prepare_packed
    from qvla_ros.kernels.ops import GemvConfig, launch_gemv
    from qvla_ros.quant.kernel_oracle import oracle, random_packed

    results = {}
    for name, n, k, counts, m, cfg, dtype, frac, with_bias, out_dtype in GEMV_CASES:
        if len(sys.argv) > 2 and name not in sys.argv[2:]:
            continue
        packed, _ = random_packed(n, k, counts, seed=n * 5 + k, fractional_zero=frac)
        kw = prepare_packed(packed)
        gen = torch.Generator().manual_seed(m + 3 * n)
        x = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
        bias = torch.randn(n, generator=gen) if with_bias else None
        store = x.dtype if out_dtype == "same" else getattr(torch, out_dtype)
        out = torch.full((m, n), float("nan"), dtype=store)
        launch_gemv(x, kw, bias, store, config=GemvConfig(**cfg), out=out)
        ref = oracle(x, packed, bias, 16)
        err = float((out.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))
        results[name] = {"rel_err": err, "all_written": bool(torch.isfinite(out).all()),
                         "exact_bias": kw.kept_rows > 0 or torch.equal(out, ref.to(store))}
    return results


# (case, out_features, in_features, counts, output dtype, fractional zero, block_rows, block_features)
DEQUANT_CASES = [
    ("dequant-every-width-odd-k", 99, 1100, {16: 16, 8: 16, 4: 16, 3: 19, 2: 16, 0: 16}, "bfloat16", False, 16, 512),
    ("dequant-fp16-fractional-zero", 80, 600, {8: 16, 4: 32, 3: 16, 2: 16}, "float16", True, 32, 512),
    ("dequant-wide-chunks", 96, 2048, EVERY, "bfloat16", False, 16, 1024),
    ("dequant-all-pruned", 32, 64, {0: 32}, "bfloat16", False, 16, 512),
    ("dequant-one-width-3bit", 37, 77, {3: 37}, "bfloat16", False, 16, 512),
    # int8: the rows' codes for the 8-bit-activation GEMM (q - 128 at 8 bits, dense rows zero)
    ("codes-every-width-odd-k", 99, 1100, {16: 16, 8: 16, 4: 16, 3: 19, 2: 16, 0: 16}, "int8", True, 16, 512),
    ("codes-one-width-8bit", 40, 300, {8: 40}, "int8", False, 32, 512),
]


def expected_codes(kw):
    """The int8 matrix the decode writes in codes mode, from the kernel words by plain torch."""
    import torch

    from qvla_ros.kernels.layout import SLOT_BITS

    codes = torch.zeros(kw.out_features, kw.in_features, dtype=torch.int16)
    for bits, rows in zip(SLOT_BITS[1:5], kw.group_rows[1:5]):
        if rows:
            start = kw.slot(bits).start
            shift = 128 if bits == 8 else 0
            codes[kw.out_index[start:start + rows].long()] = kw.group_codes(bits).to(torch.int16) - shift
    return codes.to(torch.int8)


def run_dequant_cases() -> dict:
    """The decode-for-cuBLAS kernel against dequantize_kernel_weights, in this process."""
    import torch

    from qvla_ros.kernels import dequantize_kernel_weights, launch_dequant, prepare_packed
    from qvla_ros.quant.kernel_oracle import random_packed

    results = {}
    for name, n, k, counts, dtype, frac, rows, features in DEQUANT_CASES:
        packed, _ = random_packed(n, k, counts, seed=n * 3 + k, fractional_zero=frac)
        kw = prepare_packed(packed)
        out = launch_dequant(kw, getattr(torch, dtype), block_rows=rows, block_features=features)
        if dtype == "int8":
            results[name] = {"equal": bool(torch.equal(out, expected_codes(kw))), "shape": list(out.shape),
                             "expected_shape": [n, k]}
            continue
        ref32 = dequantize_kernel_weights(kw, torch.float32)
        nearest = ref32.to(out.dtype)
        # Triton's interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest)
        truncated = (ref32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(out.dtype)
        results[name] = {"equal": bool(torch.equal(out, nearest)),
                         "nearest_or_truncated": bool(((out == nearest) | (out == truncated)).all()),
                         "shape": list(out.shape), "expected_shape": [n, k]}
    return results


# the decoded-codes A8 GEMM (triton_a8.py): (case, N, K, counts, tokens, tile (BM, BN, BK, GROUP_M,
# warps, stages), x dtype, fractional zero, bias); float32 outputs show the kernel's own error
A8_CASES = [
    ("a8-every-width-odd-k", 99, 1100, {16: 16, 8: 16, 4: 16, 3: 19, 2: 16, 0: 16}, 37, (16, 32, 64, 2, 4, 2),
     "bfloat16", False, True),
    ("a8-quantized-only-fractional-zero", 80, 600, {8: 16, 4: 32, 3: 16, 2: 16}, 20, (32, 16, 128, 1, 4, 2),
     "float16", True, False),
    ("a8-all-pruned", 32, 64, {0: 32}, 5, (16, 16, 32, 1, 4, 2), "bfloat16", False, True),
    ("a8-dense-only-grouped-tiles", 40, 300, {16: 40}, 70, (16, 16, 64, 4, 4, 2), "bfloat16", False, True),
]


def run_a8_cases() -> dict:
    """The decoded-codes A8 route against the oracle, in this process."""
    import torch

    from qvla_ros.kernels import launch_a8_decoded, prepare_packed
    from qvla_ros.quant.kernel_oracle import oracle, random_packed

    results = {}
    for name, n, k, counts, m, tile, dtype, frac, with_bias in A8_CASES:
        packed, _ = random_packed(n, k, counts, seed=n * 11 + k, fractional_zero=frac)
        kw = prepare_packed(packed)
        gen = torch.Generator().manual_seed(m + 5 * n)
        x = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
        bias = torch.randn(n, generator=gen) if with_bias else None
        out = torch.full((m, n), float("nan"), dtype=torch.float32)
        launch_a8_decoded(x, kw, bias, tile=tile, out_dtype=torch.float32, out=out)
        ref = oracle(x, packed, bias, 8)
        err = float((out.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))
        results[name] = {"rel_err": err, "all_written": bool(torch.isfinite(out).all()),
                         "exact_bias": kw.kept_rows > 0 or torch.equal(out, ref.to(torch.float32))}
    return results


def run_cases() -> dict:
    """Run every case in this process (the interpreter must already be on); errors and coverage."""
    import torch

    from qvla_ros.kernels import GemmConfig, launch_mixed_gemm, prepare_packed, quantize_activations
    from qvla_ros.quant.kernel_oracle import oracle, random_packed

    results = {}
    for name, n, k, counts, m, cfg, act_bits, dtype, frac, with_bias in CASES:
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        packed, _ = random_packed(n, k, counts, seed=n * 7 + k, fractional_zero=frac)
        kw = prepare_packed(packed)
        gen = torch.Generator().manual_seed(m + n)
        x = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
        bias = torch.randn(n, generator=gen) if with_bias else None
        out = torch.full((m, n), float("nan"), dtype=x.dtype)
        if act_bits == 8:
            xq, xscale, xsum = quantize_activations(x)
            launch_mixed_gemm(xq, kw, bias, x.dtype, 8, xscale, xsum, config=GemmConfig(**cfg), out=out)
        else:
            launch_mixed_gemm(x, kw, bias, x.dtype, 16, config=GemmConfig(**cfg), out=out)
        ref = oracle(x, packed, bias, act_bits)
        err = float((out.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))
        results[name] = {"rel_err": err, "all_written": bool(torch.isfinite(out).all()),
                         "zero_where_expected": bool(ref.abs().max() > 0 or out.abs().max() == 0)}
    return results


def _run_interpreted(*args) -> dict:
    pytest.importorskip("triton")
    return run_interpreted(__file__, *args)


@pytest.fixture(scope="module")
def interpreted():
    return _run_interpreted()


@pytest.fixture(scope="module")
def interpreted_gemv():
    return _run_interpreted("--gemv")


@pytest.fixture(scope="module")
def interpreted_dequant():
    return _run_interpreted("--dequant")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in DEQUANT_CASES])
def test_interpreted_dequant_kernel_writes_the_reference_weights(interpreted_dequant, case):
    # the same float32 arithmetic rounded once: bit-identical (bfloat16 up to the interpreter's
    # truncation; the GPU test asks for exact equality), pruned channels zero, every element
    dtype = next(c[4] for c in DEQUANT_CASES if c[0] == case)
    result = interpreted_dequant[case]
    assert result["shape"] == result["expected_shape"], result
    assert result["equal"] if dtype in ("float16", "int8") else result["nearest_or_truncated"], result


@pytest.fixture(scope="module")
def interpreted_a8():
    return _run_interpreted("--a8")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in A8_CASES])
def test_interpreted_a8_decoded_gemm_matches_the_oracle(interpreted_a8, case):
    spec = next(c for c in A8_CASES if c[0] == case)
    result = interpreted_a8[case]
    assert result["all_written"], f"{case}: some output elements were never written"
    assert result["exact_bias"], f"{case}: a layer without kept rows must output exactly its bias"
    # quantized rows: exact integer products, float32 epilogue; dense rows: their bf16 products
    # (cuBLAS's output type) round at 2^-9
    assert result["rel_err"] < (5e-3 if 16 in spec[3] else 1e-5), result


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in GEMV_CASES])
def test_interpreted_small_m_kernel_matches_the_oracle(interpreted_gemv, case):
    spec = next(c for c in GEMV_CASES if c[0] == case)
    dtype, out_dtype = spec[6], spec[9]
    result = interpreted_gemv[case]
    assert result["all_written"], f"{case}: some output elements were never written"
    assert result["exact_bias"], f"{case}: a layer without kept rows must output exactly its bias (or 0)"
    if out_dtype == "float32":
        tol = 1e-5   # exact decoding and float32 sums: only summation-order error remains
    else:
        tol = 1e-2 if dtype == "bfloat16" else 2e-3
    assert result["rel_err"] < tol, result


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_interpreted_kernel_matches_the_oracle(interpreted, case):
    dtype = next(c[7] for c in CASES if c[0] == case)
    result = interpreted[case]
    assert result["all_written"], f"{case}: some output elements were never written"
    assert result["zero_where_expected"]
    # bf16 outputs round at 2^-9 relative, fp16 at 2^-12
    assert result["rel_err"] < (1e-2 if dtype == "bfloat16" else 2e-3), result


if __name__ == "__main__":
    modes = {"--gemv": run_gemv_cases, "--dequant": run_dequant_cases, "--a8": run_a8_cases}
    print(json.dumps(modes.get(sys.argv[1] if len(sys.argv) > 1 else "", run_cases)()))
