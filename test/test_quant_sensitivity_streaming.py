"""The streaming Jacobian estimator: per-layer deltas made on the fly give the table that deltas
handed in up front give; a layer called once per camera and a camera-first batch are measured
right (proxy within 10% of exact) or refused by name; bad devices and empty targets are refused."""
import numpy as np
import pytest
import torch
from torch import nn

from qvla_ros.policy import make_policy
from qvla_ros.quant.calibration import CalibrationFrames, synthetic_frames
from qvla_ros.quant.sensitivity import (SensitivityError, exact_sensitivity, jacobian_sensitivity,
                                        weight_deltas)

LAYERS = ["vision.0.encoder.layers.0.mlp.fc1", "decoder.layers.1.self_attn.v_proj",
          "decoder.layers.0.mlp.down_proj"]
BITS = (0, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def micro():
    return make_policy("micro", seed=0)


@pytest.fixture(scope="module")
def micro_frames(micro):
    return synthetic_frames(micro.config, 3, seed=1)


def test_streamed_equals_deltas_given_up_front(micro, micro_frames):
    streamed = jacobian_sensitivity(micro, micro_frames, bits=BITS, layers=LAYERS, progress=False)
    given = {n: weight_deltas(micro.get_submodule(n).weight, BITS) for n in LAYERS}
    upfront = jacobian_sensitivity(micro, micro_frames, bits=BITS, layers=LAYERS, deltas=given, progress=False)
    one_by_one = jacobian_sensitivity(micro, micro_frames, bits=BITS, layers=LAYERS, replicas=1, progress=False)
    uneven = jacobian_sensitivity(micro, micro_frames, bits=BITS, layers=LAYERS, replicas=5, progress=False)
    for name in LAYERS:
        ref = streamed.costs[name]
        assert np.isfinite(ref).all() and (ref[:, BITS.index(16)] == 0).all()
        assert (ref[:, BITS.index(0)] > 0).all()
        for other in (upfront, one_by_one, uneven):
            np.testing.assert_allclose(other.costs[name], ref, rtol=1e-4, atol=1e-12 * ref.max())
    chunk = micro.config.horizon * micro.config.action_dim
    assert streamed.meta["replicas"] == chunk and one_by_one.meta["replicas"] == 1


def _first_order_reference(policy, frames, layer, channel, bits):
    """sum over frames of ||dA/dW_c . dW_c||^2 from a full autograd Jacobian: the quantity the
    proxy estimates, computed the slow, obvious way."""
    module = policy.get_submodule(layer)
    dw = weight_deltas(module.weight, (bits,))[0, channel]
    total = 0.0
    for f in range(len(frames)):
        inputs = frames.select([f]).inputs()
        w = module.weight
        eps = torch.zeros_like(w, requires_grad=True)

        def actions_of(e):
            saved = module.weight
            del module.weight
            module.weight = saved + e
            try:
                return policy(*inputs).flatten()
            finally:
                module.weight = saved
        jac = torch.autograd.functional.jacobian(actions_of, eps)        # [d, N, K]
        total += float((jac[:, channel] * dw).sum(-1).pow(2).sum())
        assert w is module.weight
    return total / len(frames)


class PerCameraTower(nn.Module):
    """A policy-contract module whose encoder runs once per camera (two calls per forward), with
    the cameras either frame-major or stacked first in one encoder batch."""

    def __init__(self, camera_first: bool = False):
        super().__init__()
        self.camera_first = camera_first
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.Tanh())
        self.mix = nn.Linear(32, 24)
        self.out = nn.Linear(24, 6)

    def forward(self, images, instruction, proprio):
        x = images.to(self.mix.weight.dtype).flatten(2)[..., :12] / 255.0 - 0.5   # [B, cams, 12]
        if self.camera_first:
            b = x.shape[0]
            feats = self.encoder(x.transpose(0, 1).reshape(2 * b, 12))    # rows: cam0 frames, cam1 frames
            feats = feats.reshape(2, b, 16).transpose(0, 1).reshape(b, 32)
        else:
            feats = torch.cat([self.encoder(x[:, 0]), self.encoder(x[:, 1])], dim=-1)
        return self.out(torch.tanh(self.mix(feats))).reshape(-1, 2, 3)


def _tower_frames(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return CalibrationFrames(torch.randint(0, 256, (n, 2, 2, 2, 3), generator=gen, dtype=torch.uint8),
                             ["x"] * n, torch.zeros(n, 4))


@pytest.mark.parametrize("camera_first", [False, True])
def test_multi_call_layer_proxy_within_10_percent_of_exact(camera_first):
    torch.manual_seed(0)
    model = PerCameraTower(camera_first).double().eval()
    frames = _tower_frames()
    # 8-bit rows: small perturbations, where first order must hold; replicas=1 assumes no layout
    exact = exact_sensitivity(model, frames, bits=(8, 16), layers=["encoder.0"], replicas=1, progress=False)
    proxy = jacobian_sensitivity(model, frames, bits=(8, 16), layers=["encoder.0"],
                                 replicas=1 if camera_first else None, progress=False)
    assert proxy.meta["calls_per_forward"] == ({} if camera_first else {"encoder.0": 2})
    ratio = proxy.costs["encoder.0"][:, 0] / exact.costs["encoder.0"][:, 0]
    assert np.all(np.abs(ratio - 1) < 0.10), ratio
    # and it is the first-order quantity itself, checked against a full autograd Jacobian
    for c in (0, 5):
        ref = _first_order_reference(model, frames, "encoder.0", c, 8)
        assert proxy.costs["encoder.0"][c, 0] == pytest.approx(ref, rel=1e-6)


def test_camera_first_batch_is_refused_by_name_when_replicated():
    model = PerCameraTower(camera_first=True).eval()
    frames = _tower_frames()
    with pytest.raises(SensitivityError, match="layer encoder.0: its input is not replica-major"):
        jacobian_sensitivity(model, frames, bits=(4, 16), layers=["encoder.0"], progress=False)
    with pytest.raises(SensitivityError, match="layer encoder.0: its input batch is not replica-major"):
        exact_sensitivity(model, frames, bits=(4, 16), layers=["encoder.0"], replicas=4, progress=False)


def test_bad_device_and_no_layers_are_clear_errors(micro, micro_frames):
    with pytest.raises(SensitivityError, match="CUDA is not available|CUDA device"):
        if torch.cuda.is_available():
            jacobian_sensitivity(micro, micro_frames, device=f"cuda:{torch.cuda.device_count()}", progress=False)
        else:
            jacobian_sensitivity(micro, micro_frames, device="cuda", progress=False)
    with pytest.raises(SensitivityError, match="unknown device"):
        jacobian_sensitivity(micro, micro_frames, device="gpu0", progress=False)
    with pytest.raises(SensitivityError, match="no quantizable Linear"):
        jacobian_sensitivity(micro, micro_frames, layers=[], progress=False)


def test_bf16_policy_quantizes_saves_and_loads_in_bf16(tmp_path):
    """A policy calibrated and quantized in bf16 (as a 7B one is on a GPU) saves its unplanned
    weights in bf16 and loads back with the same actions."""
    from qvla_ros.quant.allocate import allocate
    from qvla_ros.quant.api import quantize_
    from qvla_ros.quant.checkpoint import load_quantized, save_quantized

    policy = make_policy("micro", dtype=torch.bfloat16)
    frames = synthetic_frames(policy.config, 1, seed=3)
    table = jacobian_sensitivity(policy, frames, progress=False)
    assert table.meta["dtype"] == "bfloat16"
    plan = allocate(table, 6.0, scope="whole", storage=table.meta["storage"]).to_plan(table)
    quantize_(policy, plan)
    save_quantized(policy, plan, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert loaded.action_queries.dtype == torch.bfloat16 and loaded.action_std.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(*frames.inputs()), policy(*frames.inputs()))


def test_calibrate_command_refuses_bad_device_and_reports_oom(tmp_path, monkeypatch, capsys):
    """qvla calibrate: a device that does not exist is one line, not a traceback; running out of
    GPU memory part-way is one line and leaves no table behind."""
    import torch as _torch

    from qvla_ros import cli
    from qvla_ros.quant import sensitivity

    out = tmp_path / "s.safetensors"
    assert cli.main(["calibrate", "--synthetic", "--frames", "1", "--device", "cuda:7", "--out", str(out)]) == 2
    assert "cuda" in capsys.readouterr().err and not out.exists()

    def oom(*args, **kwargs):
        raise _torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(sensitivity, "jacobian_sensitivity", oom)
    assert cli.main(["calibrate", "--synthetic", "--frames", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ran out of device memory" in err and "nothing was written" in err and not out.exists()


def test_progress_counts_layers_of_frames(micro, micro_frames, capsys):
    """The bar's unit is one layer of one frame (a 7B frame takes seconds: frames alone give no
    usable time left), and it ends at layers x frames."""
    jacobian_sensitivity(micro, micro_frames, bits=BITS, layers=LAYERS, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    total = len(LAYERS) * len(micro_frames)
    assert f"{total}/{total}" in bar and "layer" in bar and f"frame {len(micro_frames)}/{len(micro_frames)}" in bar, bar
