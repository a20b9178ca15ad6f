"""The in-loop-decode probe kernels (kernels/triton_inloop.py) without a GPU.

* plain torch: the code -> operand bit tricks are exact for every code (bf16 0x3F80 | q << 3 = 1 + q/16,
  byte q as e4m3 = q * 2^-9), the packing orders are permutations that round-trip;
* the Triton kernels under the interpreter (TRITON_INTERPRET=1, in a child process): the decoded
  operand bit for bit, and every GEMM (bf16, fp8, W4A16, W4A8; decoded operand as A and as B)
  on ragged M and N, K on and off the step grid, with and without bias, codes at 0 and 15, outputs
  NaN-filled first, against a float64 reference;
* compiled for sm_90 (Triton's ptxas): the register-A (swapped) W4A16/W4A8 loops keep the decoded
  codes in registers (no shared-memory store in the loop) and run on wgmma, without spills;
* bench/kernels/inloop_probe.py --smoke passes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvla_ros.kernels import triton_inloop as T

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from interpreter import run_interpreted  # noqa: E402


def test_codes_as_bf16_mantissa_bits_are_exact():
    q = torch.arange(16, dtype=torch.int16)
    v = ((q << T.BF16_SHIFT) | T.BF16_ONE).view(torch.bfloat16).double()
    assert torch.equal(v * T.BF16_UNIT, q.double() + T.BF16_OFFSET)
    assert torch.equal(T.expected_operand(q.to(torch.uint8)[None], fp8=False)[0], (q << 3) | 0x3F80)


def test_codes_as_e4m3_bit_patterns_are_exact():
    q = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(q.view(torch.float8_e4m3fn).double() * T.E4M3_UNIT, q.double())
    assert torch.equal(T.expected_operand(q[None], fp8=True)[0].view(torch.uint8), q)


@pytest.mark.parametrize("order", T.ORDERS)
def test_packing_is_a_permutation_and_round_trips(order):
    idx = T.feature_of_nibble(order, 96)
    assert torch.equal(idx.reshape(-1).sort().values, torch.arange(96))
    codes = torch.randint(0, 16, (7, 96), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    codes[0], codes[1] = 0, 15
    packed = T.pack_int4(codes, order)
    assert packed.dtype == torch.int32 and packed.shape == (7, 12)
    assert int(packed[1, 0]) == -1  # all-15 words: every bit set
    assert torch.equal(T.unpack_int4(packed, order), codes)


def test_packing_orders_match_the_tensor_core_fragments():
    """Word 4b + c holds what lane c of the mma fragment holds: a16 k = 2c + {0, 1, 8, 9, 16, 17, 24, 25},
    a8 k = 4c + {0..3, 16..19} (sets; the nibble order inside the word is the decode's choice)."""
    for order, lane in (("a16", lambda c: {2 * c + o for o in (0, 1, 8, 9, 16, 17, 24, 25)}),
                        ("a8", lambda c: {4 * c + o for o in (0, 1, 2, 3, 16, 17, 18, 19)})):
        idx = T.feature_of_nibble(order, 64)
        for b in range(2):
            for c in range(4):
                assert set(idx[4 * b + c].tolist()) == {32 * b + k for k in lane(c)}, (order, b, c)
    # a16: the pair (k, k + 1) of one 32-bit register sits 16 bits (4 nibbles) apart
    idx = T.feature_of_nibble("a16", 32)
    assert all(int(idx[0, i + 4]) == int(idx[0, i]) + 1 for i in range(4))
    # a8: a register's 4 consecutive features are the low (or high) nibbles of the word's 4 bytes
    idx = T.feature_of_nibble("a8", 32)
    assert idx[0, 0::2].tolist() == [0, 1, 2, 3] and idx[0, 1::2].tolist() == [16, 17, 18, 19]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        T.pack_int4(torch.zeros(2, 40, dtype=torch.uint8), "a16")  # K not a multiple of 32
    with pytest.raises(ValueError):
        T.pack_int4(torch.full((2, 32), 16, dtype=torch.uint8), "a8")
    with pytest.raises(ValueError):
        T.feature_of_nibble("a4", 32)


def test_candidates_fit_the_h200():
    for kernel in T.KERNELS:
        for m in (1, 16, 590):
            for swap in (0, 1):
                cands = T.candidates(kernel, m, swap)
                assert cands and all(T.smem_bytes(kernel, c) <= T.SMEM_LIMIT for c in cands)


# ---- the Triton kernels under the interpreter ---------------------------------------------------------

# (case, M, N, K, Config, bias): N = 72 and 100 ragged against every BN, K = 288 off the BK = 64 grid
CASES = [
    ("tiny-m5-n72-k256", 5, 72, 256, (16, 32, 64, 4, 2), True),
    ("m17-n100-k288-ragged-k", 17, 100, 288, (16, 32, 64, 4, 2), True),
    ("m1-n64-k128-big-tile", 1, 64, 128, (64, 64, 128, 4, 2), False),
    ("m70-n40-k256-two-m-tiles", 70, 40, 256, (64, 32, 64, 4, 2), True),
]
#: float32 outputs: exact operands, float32 sums; W4A16 also loses a little to the folded offset (16 + z)
TOL = {"bf16": 1e-5, "fp8": 1e-5, "w4a16": 2e-5, "w4a8": 1e-5}


def run_cases() -> dict:
    from qvla_ros.kernels.triton_fp8 import quantize_activations_fp8

    results = {}
    for name, m, n, k, cfg, with_bias in CASES:
        gen = torch.Generator().manual_seed(m * 1000 + n)
        codes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
        codes[0], codes[-1] = 0, 15
        for order, fp8 in (("a16", False), ("a8", True)):
            got = T.decode_operand(T.pack_int4(codes, order), fp8)
            results[f"{name} decode {order}"] = {"bitwise": bool(torch.equal(got, T.expected_operand(codes, fp8)))}
        x = (torch.randn(m, k, generator=gen) * 2).to(torch.bfloat16)
        scale = 0.01 * (1 + torch.rand(n, generator=gen))
        zero = 15 * torch.rand(n, generator=gen)
        bias = torch.randn(n, generator=gen) if with_bias else None
        w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
        sw = w.float().abs().amax(1) / 448
        wq = (w.float() / sw[:, None]).to(torch.float8_e4m3fn)
        xq, sx, sq = quantize_activations_fp8(x)
        xf8 = xq.double() * sx.double()[:, None]
        w4 = scale.double()[:, None] * (codes.double() - zero.double()[:, None])
        refs = {"bf16": x.double() @ w.double().T, "fp8": xf8 @ (wq.double() * sw.double()[:, None]).T,
                "w4a16": x.double() @ w4.T, "w4a8": xf8 @ w4.T}
        for kernel in T.KERNELS:
            for swap in ((0,) if kernel in ("bf16", "fp8") else (0, 1)):
                c = T.Config(*cfg, swap)
                for out_dtype in (torch.float32, torch.bfloat16):
                    y = torch.full((m, n), float("nan"), dtype=out_dtype)
                    if kernel == "bf16":
                        T.bf16_gemm(x, w, bias, c, out=y)
                    elif kernel == "fp8":
                        T.fp8_gemm(xq, sx, wq, sw, bias, c, out=y)
                    elif kernel == "w4a16":
                        T.w4a16_gemm(x, T.row_sum(x), T.pack_int4(codes, "a16"), scale, zero, bias, c, out=y)
                    else:
                        T.w4a8_gemm(xq, sx, sq, T.pack_int4(codes, "a8"), scale, zero, bias, c, out=y)
                    ref = refs[kernel] + (bias.double() if with_bias else 0)
                    results[f"{name} {kernel} {c.label()} {str(out_dtype)[6:]}"] = {
                        "kernel": kernel, "dtype": str(out_dtype)[6:], "finite": bool(torch.isfinite(y).all()),
                        "err": float((y.double() - ref).abs().max() / ref.abs().max())}
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(__file__)


def test_interpreted_decode_is_bit_exact(interpreted):
    decodes = {k: v for k, v in interpreted.items() if " decode " in k}
    assert len(decodes) == 2 * len(CASES)
    assert all(v["bitwise"] for v in decodes.values()), decodes


def test_interpreted_gemms_match_float64(interpreted):
    gemms = {k: v for k, v in interpreted.items() if " decode " not in k}
    assert len(gemms) == len(CASES) * 6 * 2
    for name, r in gemms.items():
        assert r["finite"], f"{name}: some output elements were never written"
        # bf16 outputs: one rounding (the interpreter truncates: up to 2^-7 of the largest output)
        tol = TOL[r["kernel"]] if r["dtype"] == "float32" else 1e-2
        assert r["err"] < tol, (name, r)


# ---- compiled for sm_90 -------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["w4a16", "w4a8"])
def test_register_a_loop_decodes_without_shared_memory_round_trip(kernel):
    pytest.importorskip("triton")
    try:
        swapped = T.compile_offline(kernel, T.Config(128, 128, 64, 8, 4, 1))
        decode_b = T.compile_offline(kernel, T.Config(128, 128, 64, 8, 4, 0))
    except FileNotFoundError as e:  # a Triton build without the NVIDIA tools
        pytest.skip(str(e))
    assert swapped["spill_bytes"] == 0 and decode_b["spill_bytes"] == 0
    (loop,) = swapped["loops"]
    assert swapped["wgmma"] > 0 and (kernel == "w4a16" or swapped["fp8_wgmma"] > 0)
    # the decoded codes go straight from registers into wgmma; what the loop reads from shared memory
    # is the word tile (and the pipeline's barriers), never a decoded tile written back
    assert loop["sts"] == 0, loop
    assert decode_b["loops"][0]["sts"] > 0  # decode-B must stage the decoded tile for wgmma's B


def test_probe_smoke_passes(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernels" / "inloop_probe.py"), "--smoke", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    r = result["results"]["tiny"]["5"]
    assert len(r["best_config"]) == 6, r["best_config"]  # every Triton method tuned
    assert not r["failures"], r["failures"]
    assert all(v is not None for v in r["us"].values()), r["us"]


if __name__ == "__main__":
    print(json.dumps(run_cases()))
