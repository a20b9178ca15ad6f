"""Every baseline on a small random policy: outputs change, stay finite, weight memory shrinks;
smoothing alone (SmoothQuant, AWQ) leaves the fp function as it was."""
import copy

import pytest
import torch

from qvla_ros.policy import make_policy
from qvla_ros.quant.baselines import (GroupWiseLinear, InputScaled, MethodError, parse_method,
                                      quantize_baseline, resolve_order)
from qvla_ros.quant.baselines.awq import apply_awq
from qvla_ros.quant.action_error import action_error
from qvla_ros.quant.baselines.calibration import calibration_actions, collect_input_stats, groups_by_shared_input
from qvla_ros.quant.baselines.smoothing import feeding_norm, wrap_input_scales
from qvla_ros.quant.baselines.smoothquant import smooth_
from qvla_ros.quant.mixed_linear import MixedBitLinear
from qvla_ros.quant.targets import quantizable_linears


def _batch(policy, size, seed):
    cfg = policy.config
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, cfg.n_cams, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8, generator=g)
    words = ["open the drawer", "close the window", "press the button", "turn on the faucet"]
    return {"images": images, "instruction": [words[(seed + i) % 4] for i in range(size)],
            "proprio": torch.randn(size, cfg.proprio_dim, generator=g)}


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    policy = make_policy("micro", seed=0).eval()
    batches = [_batch(policy, 4, s) for s in range(2)]
    return policy, batches, calibration_actions(policy, batches)


@pytest.fixture(scope="module")
def quantized(micro):
    """Quantized copies of the micro policy, made once per method for all the tests here."""
    policy, batches, _ = micro
    made = {}

    def get(method):
        if method not in made:
            q = copy.deepcopy(policy)
            made[method] = (q, quantize_baseline(q, method, batches, alphas=(0.5, 0.8), awq_grid=8,
                                                 progress=False))
        return made[method]
    return get


def _relative_error(policy, batches, reference):
    scale = action_error(torch.zeros_like(reference), reference)  # the reference's own size
    return action_error(calibration_actions(policy, batches), reference) / scale


@pytest.mark.parametrize("method", ["rtn-w8", "rtn-w4", "rtn-w3", "rtn-w2", "rtn-g32-w2",
                                    "sq-w8a8", "sq-w4a8", "gptq-w3", "awq-w4", "gptq-g32-w3",
                                    "awq-g32-w4"])
def test_baseline_changes_outputs_stays_finite_and_shrinks(micro, quantized, method):
    policy, batches, reference = micro
    quantized, result = quantized(method)
    actions = torch.cat([quantized(b["images"], b["instruction"], b["proprio"]) for b in batches])
    assert torch.isfinite(actions).all()
    assert not torch.equal(actions, reference)
    err = _relative_error(quantized, batches, reference)
    assert 0 < err < 1.0, f"{method}: relative action error {err}"
    spec = parse_method(method)
    # Measured memory: b bits a weight plus per-row / per-group metadata, well under bf16.
    assert result.memory.nbytes < result.memory.bf16_nbytes
    assert spec.wbits <= result.memory.bits_per_param < spec.wbits + 3
    names = list(quantizable_linears(policy))
    for name in names:
        module = quantized.get_submodule(name)
        inner = module.inner if isinstance(module, InputScaled) else module
        assert isinstance(inner, GroupWiseLinear if spec.group_size else MixedBitLinear)
        if spec.family == "smoothquant":
            assert inner.act_bits == 8
    # Projectors and the action head stay as they were.
    for name, module in quantized.named_modules():
        if name.startswith(("projector", "action_head", "proprio_projector")) and hasattr(module, "weight"):
            assert torch.equal(module.weight, policy.get_submodule(name).weight)


def test_fewer_bits_more_error(micro, quantized):
    _, batches, reference = micro
    errors = [_relative_error(quantized(m)[0], batches, reference) for m in ("rtn-w8", "rtn-w4", "rtn-w2")]
    assert errors[0] < errors[1] < errors[2]


def test_gptq_beats_plain_rtn_on_actions(micro, quantized):
    _, batches, reference = micro
    rtn = action_error(calibration_actions(quantized("rtn-w3")[0], batches), reference)
    assert action_error(calibration_actions(quantized("gptq-w3")[0], batches), reference) < rtn


def test_smoothquant_smoothing_alone_is_identity(micro):
    policy, batches, reference = micro
    smoothed = copy.deepcopy(policy)
    names = list(quantizable_linears(smoothed))
    stats = collect_input_stats(smoothed, {n: smoothed.get_submodule(n) for n in names}, batches)
    explicit = smooth_(smoothed, names, stats, alpha=0.8)
    wrap_input_scales(smoothed, explicit)
    # Weights really moved (norm-folded groups and explicit scales both appear) ...
    assert explicit and len(explicit) < len(names)
    moved = sum(not torch.equal(smoothed.get_submodule(n).weight if n not in explicit else
                                smoothed.get_submodule(n).inner.weight, policy.get_submodule(n).weight)
                for n in names)
    assert moved == len(names)
    # ... yet the actions are the fp actions up to float error.
    assert _relative_error(smoothed, batches, reference) < 1e-9


def test_awq_scaling_alone_is_identity(micro):
    policy, batches, reference = micro
    scaled = copy.deepcopy(policy)
    modules = quantizable_linears(scaled)
    apply_awq(scaled, modules, batches, bits=3, grid=4, clip=False, progress=False)
    # Every scale is folded into a norm or a preceding Linear: no module is added.
    assert [type(m) for m in scaled.modules()] == [type(m) for m in policy.modules()]
    assert _relative_error(scaled, batches, reference) < 1e-9


def test_norm_folding_targets(micro):
    policy, _, _ = micro
    assert feeding_norm(policy, "decoder.layers.0.self_attn.k_proj") == "decoder.layers.0.input_layernorm"
    assert feeding_norm(policy, "decoder.layers.1.mlp.up_proj") == "decoder.layers.1.post_attention_layernorm"
    assert feeding_norm(policy, "decoder.layers.0.mlp.down_proj") is None
    assert feeding_norm(policy, "decoder.layers.0.self_attn.o_proj") is None
    vision_fc1 = next(n for n in quantizable_linears(policy) if n.endswith("mlp.fc1"))
    assert feeding_norm(policy, vision_fc1).endswith("layer_norm2")


def test_shared_input_groups(micro):
    policy, batches, _ = micro
    modules = quantizable_linears(policy)
    groups = groups_by_shared_input(policy, modules, batches[0])
    assert sorted(n for g in groups for n in g) == sorted(modules)
    decoder_qkv = [g for g in groups if g[0].startswith("decoder.layers.0.self_attn")][0]
    assert sorted(n.rsplit(".", 1)[1] for n in decoder_qkv) == ["k_proj", "q_proj", "v_proj"]


def test_method_names():
    assert parse_method("RTN-W4").wbits == 4
    assert parse_method("rtn-g128-w3").group_size == 128
    spec = parse_method("qvla-a8@sq-w8a8")
    assert (spec.family, spec.abits, spec.match) == ("qvla", 8, "sq-w8a8")
    assert parse_method("qvla-b4.25").budget == 4.25
    assert parse_method("qvla-b4.25").rounding == "rtn"
    spec = parse_method("qvla-gptq@gptq-w4")
    assert (spec.name, spec.rounding, spec.match, spec.abits) == ("qvla-gptq@gptq-w4", "gptq", "gptq-w4", 16)
    spec = parse_method("qvla-a8-gptq-b3.5")
    assert (spec.rounding, spec.abits, spec.budget) == ("gptq", 8, 3.5)
    assert spec.label == "QVLA + GPTQ rows W+A8"
    order = [s.name for s in resolve_order(["qvla@gptq-w3", "rtn-w4", "gptq-w3"])]
    assert order == ["gptq-w3", "qvla@gptq-w3", "rtn-w4"]
    for bad in ("rtn-w5", "sq-w3a8", "rtn-g12-w4", "qvla@qvla-b3", "fp8", "qvla-b40",
                "qvla-gptq-a8-b4", "qvla-gptq@qvla-b3"):
        with pytest.raises(MethodError):
            parse_method(bad)


def test_qvla_needs_budget_and_runner(micro):
    policy, batches, _ = micro
    with pytest.raises(ValueError, match="budget"):
        quantize_baseline(copy.deepcopy(policy), "qvla@rtn-w4", batches, progress=False)


def test_calibrated_method_without_frames_is_refused(micro):
    policy, _, _ = micro
    with pytest.raises(ValueError, match="calibration"):
        quantize_baseline(copy.deepcopy(policy), "gptq-w4", [], progress=False)
