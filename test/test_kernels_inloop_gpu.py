"""The in-loop-decode probe kernels (kernels/triton_inloop.py) on a CUDA GPU against float64 (skipped
without a GPU): the decoded operand bit for bit, every 590-token candidate of every kernel, the
small-M candidates at 1 and 16 tokens, K off the step grid with a bias, and a CUDA-graph replay."""
import pytest
import torch

from qvla_ros.kernels.testing import replayed_in_a_cuda_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_LAYERS = {}


def layer(n=520, k=4096):
    """N = 520: ragged against every BN (masks and the wrapped rows of the last tile)."""
    from qvla_ros.kernels import triton_inloop as T

    if (n, k) not in _LAYERS:
        g = torch.Generator(device="cuda").manual_seed(n + k)
        codes = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.uint8)
        codes[0], codes[1] = 0, 15
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        sw = w.float().abs().amax(1) / 448
        _LAYERS[(n, k)] = dict(
            codes=codes, p16=T.pack_int4(codes, "a16"), p8=T.pack_int4(codes, "a8"), w=w, sw=sw,
            wq=(w.float() / sw[:, None]).to(torch.float8_e4m3fn),
            scale=0.001 * (1 + torch.rand(n, device="cuda", generator=g)),
            zero=15 * torch.rand(n, device="cuda", generator=g), bias=torch.randn(n, device="cuda", generator=g))
    return _LAYERS[(n, k)]


def run(kernel, cfg, x, L, bias=None, out=None):
    from qvla_ros.kernels import triton_inloop as T
    from qvla_ros.kernels.triton_fp8 import quantize_activations_fp8

    xq, sx, sq = quantize_activations_fp8(x)
    if kernel == "bf16":
        return T.bf16_gemm(x, L["w"], bias, cfg, out=out)
    if kernel == "fp8":
        return T.fp8_gemm(xq, sx, L["wq"], L["sw"], bias, cfg, out=out)
    if kernel == "w4a16":
        return T.w4a16_gemm(x, T.row_sum(x), L["p16"], L["scale"], L["zero"], bias, cfg, out=out)
    return T.w4a8_gemm(xq, sx, sq, L["p8"], L["scale"], L["zero"], bias, cfg, out=out)


def reference(kernel, x, L, bias=None):
    from qvla_ros.kernels.triton_fp8 import quantize_activations_fp8

    xq, sx, _ = quantize_activations_fp8(x)
    xa = x.double() if kernel in ("bf16", "w4a16") else xq.double() * sx.double()[:, None]
    if kernel == "bf16":
        w = L["w"].double()
    elif kernel == "fp8":
        w = L["wq"].double() * L["sw"].double()[:, None]
    else:
        w = L["scale"].double()[:, None] * (L["codes"].double() - L["zero"].double()[:, None])
    y = xa @ w.T
    return y if bias is None else y + bias.double()


def rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


#: float32 outputs. bf16 operands: float32 tensor-core sums (W4A16 also cancels the folded offset);
#: e4m3 operands: sm_90's fp8 wgmma accumulates with reduced precision (triton_fp8.py, NOTES run 12)
TOL = {"bf16": 1e-4, "w4a16": 1e-3, "fp8": 1e-2, "w4a8": 1e-2}


@pytest.mark.parametrize("order", ["a16", "a8"])
def test_decoded_operand_is_bit_exact(order):
    from qvla_ros.kernels import triton_inloop as T

    codes = layer()["codes"]
    got = T.decode_operand(T.pack_int4(codes, order), fp8=order == "a8")
    assert torch.equal(got, T.expected_operand(codes, fp8=order == "a8"))


def _id(v):
    return v if isinstance(v, str) else v.label().replace(" ", "-")


def _all(m):
    from qvla_ros.kernels import triton_inloop as T
    return [(kernel, cfg) for kernel in T.KERNELS for swap in ((0,) if kernel in ("bf16", "fp8") else (0, 1))
            for cfg in T.candidates(kernel, m, swap)]


@pytest.mark.parametrize("kernel,cfg", _all(590), ids=_id)
def test_every_590_token_candidate_matches_float64(kernel, cfg):
    L = layer()
    x = torch.randn(590, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.full((590, 520), float("nan"), device="cuda")
    run(kernel, cfg, x, L, out=out)
    assert torch.isfinite(out).all()
    assert rel(out, reference(kernel, x, L)) < TOL[kernel]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("kernel,cfg", _all(16), ids=_id)
def test_small_m_candidates_match_float64(kernel, cfg, m):
    L = layer()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.full((m, 520), float("nan"), device="cuda")
    run(kernel, cfg, x, L, out=out)
    assert torch.isfinite(out).all()
    assert rel(out, reference(kernel, x, L)) < TOL[kernel]


@pytest.mark.parametrize("kernel", ["bf16", "fp8", "w4a16", "w4a8"])
@pytest.mark.parametrize("swap", [0, 1])
def test_k_off_the_step_grid_with_bias_bf16_out(kernel, swap):
    from qvla_ros.kernels import triton_inloop as T

    if swap and kernel in ("bf16", "fp8"):
        pytest.skip("no swapped variant")
    L = layer(200, 1056)  # K = 33 x 32: a partial last step for BK 64 and 128
    x = torch.randn(77, 1056, device="cuda", dtype=torch.bfloat16)
    y = run(kernel, T.Config(64, 128, 128, 4, 3, swap), x, L, bias=L["bias"])
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel(y, reference(kernel, x, L, L["bias"])) < max(TOL[kernel], 1e-2)


@pytest.mark.parametrize("kernel", ["w4a16", "w4a8"])
def test_replays_in_a_cuda_graph(kernel):
    from qvla_ros.kernels import triton_inloop as T

    L = layer()
    x = torch.randn(590, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = T.Config(128, 128, 64, 8, 4, 1)
    eager = run(kernel, cfg, x, L)
    assert torch.equal(replayed_in_a_cuda_graph(lambda: run(kernel, cfg, x, L)), eager)
