"""fp8 (e4m3) activations for mixed-bit layers (kernels/triton_fp8.py) without a GPU.

* plain torch: the exactness the kernel relies on (codes <= 15 read as e4m3 bit patterns are
  q * 2^-9; 8-bit codes split into two exact nibbles), the CPU path against the project's oracle
  (packing.py's dequantization, fake-quantized e4m3 activations, 16-bit rows on the raw input),
  prepare_fp8 from a MixedBitLinear and its bytes, and the accuracy cost of e4m3 against int8;
* the Triton kernels under the interpreter (TRITON_INTERPRET=1, in a child process): every width,
  ragged and tiny layers, K not a multiple of the step, both decodes, float32 promotion, float16
  input, the tuner, with the output filled with NaN first;
* the kernel compiled for sm_90 (Triton's ptxas): fp8 wgmma (QGMMA) in the SASS, no spills.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from qvla_ros.quant.kernel_oracle import random_packed
from qvla_ros.kernels.triton_fp8 import (Fp8Config, dequantize_fp8_weights, fake_quantize_activations_fp8,
                                         fp8_mixed_linear, fp8_mixed_linear_reference, prepare_fp8,
                                         quantize_activations_fp8_reference)
from qvla_ros.quant.quantizer import fake_quantize_activations

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from interpreter import run_interpreted  # noqa: E402

EVERY = {16: 16, 8: 16, 4: 16, 3: 16, 2: 16, 0: 16}


def project_oracle(x, packed, bias):
    """float64: e4m3 per-token x for rows of <= 8 bits, raw x for 16-bit rows, packing.py's weights."""
    w = packed.dequantize(torch.float64)
    dense = (packed.bits_per_row() == 16)[None, :]
    xf = fake_quantize_activations_fp8(x).to(torch.float64)
    y = torch.where(dense, x.to(torch.float64) @ w.T, xf @ w.T)
    return y if bias is None else y + bias.to(torch.float64)


def test_small_codes_read_as_e4m3_bit_patterns_are_exact():
    q = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(q.view(torch.float8_e4m3fn).to(torch.float64), q.to(torch.float64) * 2.0 ** -9)
    # integers up to 16 are e4m3 values (the "cvt" decode), 17 is not
    ints = torch.arange(17, dtype=torch.float32)
    assert torch.equal(ints.to(torch.float8_e4m3fn).to(torch.float32), ints)
    assert torch.tensor(17.0).to(torch.float8_e4m3fn).item() != 17.0
    # an 8-bit code is 16 * high nibble + low nibble, both exact
    b = torch.arange(256, dtype=torch.int32)
    hi = (b >> 4).to(torch.uint8).view(torch.float8_e4m3fn).double()
    lo = (b & 15).to(torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal((16 * hi + lo) * 512, b.double())


def test_activation_quantization_is_per_token_e4m3():
    x = torch.randn(7, 300) * torch.logspace(-3, 3, 7)[:, None]
    x[3] = 0
    xq, scale, total = quantize_activations_fp8_reference(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (7,) and total.shape == (7,)
    assert torch.allclose(xq.float().abs().amax(dim=1)[[0, 1, 2, 4, 5, 6]], torch.tensor(448.0))
    assert scale[3] == 1e-12 and xq[3].float().abs().max() == 0
    assert torch.allclose(total, xq.float().sum(dim=1))


@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_path_matches_the_project_oracle(with_bias):
    packed, _ = random_packed(99, 333, {16: 16, 8: 16, 4: 32, 3: 16, 2: 3, 0: 16}, seed=3)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(99, generator=gen) if with_bias else None
    p = prepare_fp8(packed, bias=bias)
    assert torch.equal(dequantize_fp8_weights(p, torch.float64), packed.dequantize(torch.float64))
    x = torch.randn(2, 5, 333, generator=gen).to(torch.bfloat16)
    y = fp8_mixed_linear(x, p)
    assert y.shape == (2, 5, 99) and y.dtype == torch.bfloat16
    ref = project_oracle(x.reshape(10, 333), packed, bias).reshape(2, 5, 99)
    assert torch.allclose(fp8_mixed_linear_reference(x, p), ref, rtol=0, atol=1e-9)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err  # bf16 output rounding
    pruned = packed.bits_per_row() == 0
    expect = bias[pruned] if with_bias else torch.zeros(int(pruned.sum()))
    assert torch.equal(y[..., pruned].float(), expect.to(torch.bfloat16).float().expand(2, 5, -1))


def test_prepare_from_a_mixed_bit_linear_takes_its_buffers_and_bias():
    from qvla_ros.quant.mixed_linear import MixedBitLinear
    from qvla_ros.kernels.testing import bits_per_row, mix_counts, MIXES

    lin = torch.nn.Linear(256, 160)
    bits = bits_per_row(160, mix_counts(160, MIXES["avg4"]), torch.Generator().manual_seed(0))
    module = MixedBitLinear.from_linear(lin, bits)
    p = prepare_fp8(module)
    assert torch.equal(p.bias, lin.bias.detach())
    packed = module.packed_weight()
    assert torch.equal(dequantize_fp8_weights(p), packed.dequantize())
    # the kernel reads the contract bytes as they are; scales and zero-points grow to float32
    extra = 4 * p.kept_rows + 4 * p.rows[-1]  # 2+2 more bytes per kept row, the pruned channels' index
    assert p.nbytes() == packed.nbytes() + extra, (p.nbytes(), packed.nbytes())
    x = torch.randn(3, 256)
    y = fp8_mixed_linear(x, p)
    with torch.no_grad():
        y16 = module(x)  # 16-bit activations: e4m3 costs a few percent of the output
    assert float((y - y16).norm() / y16.norm()) < 0.06


def test_e4m3_activation_error_against_int8():
    """The accuracy consequence, measured: per-token e4m3 (3 mantissa bits, wide range) against
    per-token int8 (uniform grid): int8 wins on plain Gaussian tokens, e4m3 once a few outlier
    channels (as LLM activations have) stretch the int8 grid."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=gen) * 0.02
    errors = {}
    for kind in ("gaussian", "outliers"):
        x = torch.randn(32, 1024, generator=gen)
        if kind == "outliers":
            x[:, :8] *= 20
        ref = x.double() @ w.double().T
        errors[kind] = [float(((f(x).double() @ w.double().T) - ref).norm() / ref.norm()) for f in
                        (fake_quantize_activations_fp8, lambda v: fake_quantize_activations(v, 8))]
    print("relative output error (e4m3, int8):", errors)
    assert 0.01 < errors["gaussian"][0] < 0.04 and errors["gaussian"][1] < errors["gaussian"][0]
    assert errors["outliers"][0] < 0.04 and errors["outliers"][0] < errors["outliers"][1]


# ---- the Triton kernels under the interpreter ---------------------------------------------------------

# (case, N, K, counts, tokens, Fp8Config kwargs or None (the tuner), x dtype, output dtype, bias)
CASES = [
    ("every-width-ragged-k", 96, 300, EVERY, 20, dict(bm=64, bn=64, bk=64), "bfloat16", "float32", True),
    ("even-k-promote-cvt", 96, 256, EVERY, 5, dict(bm=64, bn=32, bk=128, promote=64, decode="cvt"), "bfloat16",
     "float32", False),
    ("ragged-99-rows", 99, 333, {16: 16, 8: 16, 4: 32, 3: 16, 2: 3, 0: 16}, 3, dict(bm=64, bn=32, bk=64),
     "bfloat16", "float32", True),
    ("tiny-layer", 7, 40, {8: 3, 2: 2, 0: 2}, 2, dict(bm=64, bn=16, bk=32), "bfloat16", "float32", True),
    ("all-pruned", 32, 64, {0: 32}, 2, dict(bm=64, bn=16, bk=64), "bfloat16", "float32", True),
    ("fp16-bf16-out", 48, 128, {16: 16, 4: 16, 3: 16}, 4, dict(bm=64, bn=16, bk=64), "float16", "same", False),
    ("tuner", 64, 64, {8: 16, 4: 16, 2: 16, 0: 16}, 17, None, "bfloat16", "same", True),
]


def run_cases() -> dict:
    from qvla_ros.kernels import triton_fp8 as T

    import time

    results = {}
    for name, n, k, counts, m, cfg, dtype, out_dtype, with_bias in CASES:
        start = time.time()
        packed, _ = random_packed(n, k, counts, seed=n + k)
        gen = torch.Generator().manual_seed(m + n)
        bias = torch.randn(n, generator=gen) if with_bias else None
        p = T.prepare_fp8(packed, bias=bias)
        x = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
        xq, sx, total = T.quantize_activations_fp8(x)
        rq, rs, rt = T.quantize_activations_fp8_reference(x)
        store = x.dtype if out_dtype == "same" else getattr(torch, out_dtype)
        out = torch.full((m, n), float("nan"), dtype=store)
        if cfg is None:
            T.CANDIDATES["m64"] = [[T.Fp8Config(64, 16, 64, 4, 2), T.Fp8Config(64, 32, 32, 4, 2)]]
            T.fp8_mixed_linear(x, p, out=out)
            chosen = T.chosen_configs()[(n, k, "m64")].label()
        else:
            T.launch_fp8_gemm(x, xq, sx, total, p, T.Fp8Config(**cfg), out=out)
            chosen = None
        ref = project_oracle(x, packed, bias)
        err = float((out.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))
        results[name] = {"rel_err": err, "all_written": bool(torch.isfinite(out).all()),
                         "xq_equal": bool(torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))),
                         "scale_equal": bool(torch.equal(sx, rs)),
                         "sum_err": float((total - rt).abs().max() / rt.abs().max().clamp(min=1e-30)),
                         "exact_bias": p.kept_rows > 0 or torch.equal(out, ref.to(store)), "chosen": chosen,
                         "seconds": time.time() - start}
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_interpreted_fp8_kernels_match_the_oracle(interpreted, case):
    spec = next(c for c in CASES if c[0] == case)
    result = interpreted[case]
    assert result["all_written"], f"{case}: some output elements were never written"
    assert result["exact_bias"], f"{case}: a layer without kept rows must output exactly its bias"
    assert result["xq_equal"] and result["scale_equal"] and result["sum_err"] < 1e-6, result
    # float32 output: exact codes, float32 sums (summation order only); 16-bit outputs round
    assert result["rel_err"] < (1e-5 if spec[7] == "float32" else 1e-2), result
    if spec[5] is None:
        assert result["chosen"] in ("bm64 bn16 bk64 w4 s2", "bm64 bn32 bk32 w4 s2"), result


def test_config_refuses_bad_tiles():
    for bad in (dict(bm=48), dict(bk=16), dict(promote=256, bk=128), dict(decode="lut")):
        with pytest.raises(ValueError):
            Fp8Config(**bad)


# ---- compiled for sm_90 -------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_large_tile_compiles_to_fp8_wgmma_without_spills():
    pytest.importorskip("triton")
    from qvla_ros.kernels.triton_fp8 import DEFAULT_CONFIGS, compile_offline

    try:
        result = compile_offline(DEFAULT_CONFIGS["large"])
    except FileNotFoundError as e:  # a Triton build without the NVIDIA tools
        pytest.skip(str(e))
    assert result["spill_bytes"] == 0, result["registers"]
    # every quantized width's loop runs on fp8 wgmma; the 16-bit rows on bf16 wgmma
    assert result["fp8_wgmma"] > 0 and result["wgmma"] > result["fp8_wgmma"]
    assert result["ttgir"].count("f8E4M3FN, #shared") >= 5


if __name__ == "__main__":
    print(json.dumps(run_cases()))
