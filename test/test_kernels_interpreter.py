"""The Triton kernels themselves, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Small shapes through every code path of the grouped GEMM (one token FMA, per-field tensor-core
products, whole-step products, 8-bit activations, fp16, folded zero-points, K not a multiple of
any block) against the quant module's oracle, with the output filled with NaN first. The
interpreter must be switched on before Triton compiles anything, so the cases run in a child
process (this file run as a script). Skipped where Triton is not installed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

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


def run_cases() -> dict:
    """Run every case in this process (the interpreter must already be on); errors and coverage."""
    import torch

    from qvla_ros.kernels import GemmConfig, launch_mixed_gemm, prepare_packed, quantize_activations
    from qvla_ros.kernels.testing import oracle, random_packed

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


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    print(json.dumps(run_cases()))
