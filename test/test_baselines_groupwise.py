"""The baselines as LLM users run them (group-wise g128 RTN, GPTQ, AWQ) and AWQ as published:
group-wise grids beat one grid per row where magnitudes vary along a row; GPTQ-g never loses to
RTN-g on the layer objective and repacks exactly (a group size that does not divide K pads);
AWQ's folds leave the float function unchanged and its block-output search beats plain RTN on a
Llama block with activation outliers; method names parse and their memory counts 32/G bits of
scale + zero per weight."""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from qvla_ros.policy import load_policy, make_policy
from qvla_ros.quant.baselines import GroupWiseLinear, MethodError, parse_method, quantize_baseline
from qvla_ros.quant.baselines.awq import apply_awq, apply_clip, scale_blocks, search_clip
from qvla_ros.quant.baselines.gptq import gptq_quantize_weight, layer_objective
from qvla_ros.quant.groupwise_linear import fake_quantize_group_wise
from qvla_ros.quant.quantizer import fake_quantize_rows
from qvla_ros.quant.targets import quantizable_linears
from test_baselines_methods import _batch


def _layer(n=64, k=256, tokens=800, seed=0):
    """Weights whose magnitude varies over rows and over blocks of inputs, and correlated inputs
    with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    row = torch.rand(n, 1, generator=g) * 2 + 0.1
    col = (torch.rand(1, -(-k // 32), generator=g) * 4 + 0.1).repeat_interleave(32, dim=1)[:, :k]
    w = torch.randn(n, k, generator=g) * 0.05 * row * col
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k ** 0.5)
    x[:, :4] *= 15.0
    return w, x


def test_group_wise_rtn_beats_per_channel_rtn_at_3_bits():
    w, _ = _layer()
    per_row = (fake_quantize_rows(w, 3) - w).pow(2).sum()
    for group in (128, 64, 32):
        assert (fake_quantize_group_wise(w, 3, group) - w).pow(2).sum() < per_row


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_group_wise_beats_rtn_group_wise_and_repacks(act_order, bits):
    w, x = _layer(seed=1)
    h = x.T @ x / x.shape[0]
    q = gptq_quantize_weight(w, h, bits, group_size=128, act_order=act_order)
    assert layer_objective(w, q, h) <= layer_objective(w, fake_quantize_group_wise(w, bits, 128), h)
    # On the packer's own grid: GroupWiseLinear stores exactly these weights.
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(q)
    assert torch.equal(GroupWiseLinear.from_linear(lin, bits, 128).dequantize(), q)


def test_group_size_not_dividing_inputs_pads():
    """Decided: a group size that does not divide in_features is not refused; the last group is
    zero-padded (zeros never move a grid), and the stored bytes count the padding."""
    w, x = _layer(n=16, k=200, seed=2)
    h = x.T @ x / x.shape[0]
    q = gptq_quantize_weight(w, h, 4, group_size=128)
    lin = nn.Linear(200, 16, bias=False)
    lin.weight.data.copy_(q)
    packed = GroupWiseLinear.from_linear(lin, 4, 128)
    assert torch.equal(packed.dequantize(), q)
    assert packed.packed_nbytes() == 16 * 256 * 4 // 8 + 16 * 2 * (2 + 2)   # K padded to 256
    assert layer_objective(w, q, h) <= layer_objective(w, fake_quantize_group_wise(w, 4, 128), h)
    for bad in (12, 0, -8):
        with pytest.raises(ValueError, match="group_size"):
            gptq_quantize_weight(w, h, 4, group_size=bad)
    for bad in ("gptq-g12-w4", "awq-g0-w4", "gptq-g128-w5"):
        with pytest.raises(MethodError):
            parse_method(bad)


def test_group_wise_method_names_and_measured_bits():
    for name, family in (("rtn-g128-w4", "rtn-group"), ("gptq-g128-w4", "gptq"), ("AWQ-G64-W3", "awq")):
        spec = parse_method(name)
        assert (spec.family, spec.group_size) == (family, int(name.lower().split("-g")[1].split("-")[0]))
    assert parse_method("gptq-w4").group_size is None
    assert parse_method("gptq-g128-w3").label == "GPTQ group 128"
    # The shipped tiny policy: every quantized Linear has 128, 256 or 512 inputs, so g128 costs
    # exactly 4 + (16 + 16) / 128 = 4.25 bits a weight, measured from the stored tensors.
    policy = load_policy(None).eval()
    result = quantize_baseline(copy.deepcopy(policy), "rtn-g128-w4", progress=False)
    assert result.memory.bits_per_param == pytest.approx(4.25, abs=1e-12)
    assert result.memory.policy_bits_per_param > result.memory.bits_per_param * 0.5
    assert all(m.in_features % 128 == 0 for m in quantizable_linears(policy).values())


class _LlamaBlockPolicy(nn.Module):
    """One Llama decoder block behind the policy contract (images = hidden states), so the
    baselines' calibration runs it as they run a policy."""

    def __init__(self, hidden=128, intermediate=256, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                          num_key_value_heads=heads, num_hidden_layers=1)
        cfg._attn_implementation = "sdpa"
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)
        with torch.no_grad():
            for m in self.layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.05)
            self.layer.input_layernorm.weight.uniform_(0.5, 1.5)
            self.layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)

    def forward(self, images, instruction, proprio):
        pos = torch.arange(images.shape[1])[None].expand(images.shape[0], -1)
        out = self.layer(images, attention_mask=None, position_ids=pos,
                         position_embeddings=self.rotary(images, pos))
        return out[0] if isinstance(out, tuple) else out


def _hidden(seed, frames=8, tokens=32, hidden=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, tokens, hidden, generator=g)
    x[..., :4] *= 20.0   # activation outlier channels, as LLM hidden states have
    return {"images": x, "instruction": [""] * frames, "proprio": torch.zeros(frames, 1)}


def _linears(policy):
    return {n: m for n, m in policy.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def test_awq_folding_is_exact_and_covers_the_published_groups():
    policy = _LlamaBlockPolicy()
    calib, held_out = [_hidden(0)], _hidden(1)
    x = held_out["images"]
    reference = policy(x, None, None)
    folded = copy.deepcopy(policy)
    info = apply_awq(folded, _linears(folded), calib, 3, clip=False, progress=False)
    # q/k/v after input_layernorm, o after v, gate/up after post_attention_layernorm, down after up.
    assert sorted(info["alphas"]) == ["layer.mlp.down_proj", "layer.mlp.gate_proj", "layer.self_attn.o_proj",
                                      "layer.self_attn.q_proj"]
    assert info["unscaled"] == []
    assert not torch.equal(folded.layer.input_layernorm.weight, policy.layer.input_layernorm.weight)
    assert not torch.equal(folded.layer.self_attn.v_proj.weight, policy.layer.self_attn.v_proj.weight)
    assert not torch.equal(folded.layer.mlp.up_proj.weight, policy.layer.mlp.up_proj.weight)
    assert [type(m) for m in folded.modules()] == [type(m) for m in policy.modules()]  # nothing added
    # The float forward is unchanged (relative to what the block adds to its residual input).
    change = (reference - x).norm()
    assert float((folded(x, None, None) - reference).norm() / change) < 1e-5


def test_awq_folding_is_exact_on_a_policy():
    """The micro policy: SigLIP blocks (o after v folds), a grouped-attention Llama (v is
    narrower than o: o_proj is left unscaled), fc2 behind GELU unscaled."""
    policy = make_policy("micro", seed=0).eval()
    batches = [_batch(policy, 4, 0)]
    folded = copy.deepcopy(policy)
    info = apply_awq(folded, quantizable_linears(folded), batches, 3, grid=4, clip=False, progress=False)
    assert any(n.endswith("self_attn.out_proj") for n in info["alphas"])
    assert all(n.endswith(("o_proj", "fc2")) for n in info["unscaled"])
    with torch.no_grad():
        a = policy(batches[0]["images"], batches[0]["instruction"], batches[0]["proprio"])
        b = folded(batches[0]["images"], batches[0]["instruction"], batches[0]["proprio"])
    assert float((a - b).norm() / a.norm()) < 1e-5


@pytest.mark.parametrize("method,rtn", [("awq-w3", "rtn-w3"), ("awq-g32-w3", "rtn-g32-w3")])
@torch.no_grad()
def test_awq_beats_rtn_on_block_output(method, rtn):
    policy = _LlamaBlockPolicy()
    calib, held_out = [_hidden(0)], _hidden(1)
    x = held_out["images"]
    reference = policy(x, None, None)

    def error(m):
        q = copy.deepcopy(policy)
        quantize_baseline(q, m, calib, names=list(_linears(q)), awq_grid=10, progress=False)
        return float((q(x, None, None) - reference).pow(2).mean())

    assert error(method) < 0.7 * error(rtn)


def test_awq_clip_search_not_worse_than_no_clip():
    w, x = _layer(seed=3)
    for group in (None, 64):
        m = search_clip(x[:512], w, 3, group, grid=10)
        clipped = apply_clip(w, m, group)

        def err(v):
            q = fake_quantize_rows(v, 3) if group is None else fake_quantize_group_wise(v, 3, group)
            return float((x @ (q - w).T).pow(2).sum())
        assert err(clipped) <= err(w)
        assert (clipped.abs() <= w.abs()).all()


def test_scale_blocks_finds_the_shipped_layout():
    policy = load_policy(None)
    blocks = scale_blocks(policy, list(quantizable_linears(policy)))
    decoder = blocks["decoder.layers.0"]
    assert [g.inspect.rsplit(".", 1)[-1] for g in decoder] == ["self_attn", "o_proj", "mlp", "down_proj"]
    vision = blocks["vision.0.encoder.layers.0"]
    assert [g.prev.rsplit(".", 1)[-1] for g in vision] == ["layer_norm1", "v_proj", "layer_norm2"]
