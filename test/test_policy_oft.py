"""The OpenVLA-OFT architecture (qvla_ros/policy/modeling_oft.py) on the oft-micro preset: the
forward contract, bidirectional attention, the reference's action read-out (checked against the
independent forward in helpers/oft_reference.py), the MLP-ResNet head, BOUNDS_Q99, the project
checkpoint round trip and quantize_."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qvla_ros.policy.configuration_oft import get_oft_config
from qvla_ros.policy.modeling_oft import OFTPolicy, make_oft_policy
from qvla_ros.policy.modeling_vla import load_policy, make_policy

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import oft_reference  # noqa: E402

INSTR = ["pull the drawer open", "push the door closed to the target location"]


def scramble(policy: OFTPolicy, seed: int = 0) -> OFTPolicy:
    """Random weights at every parameter, LayerScale and norms included (the preset's init leaves
    LayerScale at 1e-5 and norms at 1, which would hide a wrong tower or a missing norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5 if p.shape[0] > 1 else 0.5 * noise)
            elif name.endswith("weight") or name.endswith("scale_factor"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return policy


@pytest.fixture(scope="module")
def micro():
    return scramble(make_oft_policy("oft-micro", seed=0))


def inputs(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = config.image_size
    images = torch.randint(0, 256, (batch, config.n_cams, s, s, 3), dtype=torch.uint8, generator=g)
    proprio = torch.rand(batch, config.proprio_dim, generator=g) * 2 - 1
    return images, (INSTR * batch)[:batch], proprio


def sizes(cfg):
    return dict(empty_id=cfg.empty_id, stop_id=cfg.stop_id, horizon=cfg.horizon, action_dim=cfg.action_dim,
                featurizer_depth=cfg.featurizer.depth, fused_depth=cfg.fused_featurizer.depth,
                num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, head_blocks=cfg.head_blocks)


def test_forward_gives_a_chunk_of_8_by_7(micro):
    with torch.no_grad():
        actions = micro(*inputs(micro.config, batch=3))
    assert micro.config.num_action_tokens == 56
    assert actions.shape == (3, 8, 7) and actions.dtype == torch.float32
    assert torch.isfinite(actions).all()


def decoder_hidden(policy, images, instr, proprio):
    """The decoder's last hidden states [B, L, D] of one forward (hooked, not recomputed)."""
    seen = []
    handle = policy.language_model.model.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    try:
        with torch.no_grad():
            policy(images, instr, proprio)
    finally:
        handle.remove()
    return seen[0]


def test_attention_is_bidirectional(micro):
    """A causal decoder cannot let a later token move an earlier one; OFT's must."""
    images, _, proprio = inputs(micro.config, batch=1)
    a = decoder_hidden(micro, images, ["pull the drawer open"], proprio)
    b = decoder_hidden(micro, images, ["pull the drawer close"], proprio)   # same length, last word differs
    patches = 1 + micro.config.n_cams * micro.config.patches_per_image
    # BOS (position 0) and the first image patch come before every prompt word.
    for pos in (0, 1, patches - 1):
        assert not torch.allclose(a[0, pos], b[0, pos], atol=1e-4), pos
    # ... and the placeholders after the prompt move too (their inputs are identical zeros).
    assert not torch.allclose(a[0, -2], b[0, -2], atol=1e-4)


def test_read_out_and_actions_match_the_reference_forward(micro):
    """Per sample, what the reference computes alone and unpadded: the read-out rows (starting one
    position before the placeholders) and the actions, for two prompts of different lengths batched."""
    cfg = micro.config
    stats = dict(q01=torch.linspace(-2, -1, 7), q99=torch.linspace(1, 3, 7),
                 mask=torch.tensor([True] * 6 + [False]))
    micro.set_norm_stats({"action_q01": stats["q01"], "action_q99": stats["q99"], "action_mask": stats["mask"],
                          "proprio_q01": -torch.ones(8), "proprio_q99": torch.ones(8),
                          "proprio_mask": torch.ones(8, dtype=torch.bool)})
    images, instr, proprio = inputs(cfg, batch=2)
    with torch.no_grad():
        prepared = micro.prepare_inputs(images, instr, proprio)
        read = micro.action_hidden_states(*prepared)
        actions = micro(images, instr, proprio)
    sd = {k: v.float() for k, v in micro.state_dict().items()}
    lengths = []
    for row in range(2):
        ids = micro.tokenizer.prompt_ids(instr[row])
        lengths.append(len(ids))
        with torch.no_grad():
            want, want_read = oft_reference.reference_forward(sd, sizes(cfg), ids, images[row], proprio[row], stats)
        torch.testing.assert_close(read[row], want_read, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(actions[row], want, rtol=1e-4, atol=1e-4)
    assert lengths[0] != lengths[1]   # the batch really was padded
    # The first read row is the last prompt token's, not the first placeholder's: reading one
    # position later (the mistake the issue warns of) gives other rows.
    hidden = decoder_hidden(micro, images, instr, proprio)
    first_placeholder = 1 + cfg.n_cams * cfg.patches_per_image + 1 + (cfg.max_text_tokens - 1)
    assert not torch.allclose(read[0, 0], hidden[0, first_placeholder], atol=1e-3)
    torch.testing.assert_close(read[0, 1:], hidden[0, first_placeholder:first_placeholder + 55])


def test_mlp_resnet_head_shapes(micro):
    cfg = micro.config
    head = micro.action_head.model
    wide = cfg.action_dim * cfg.hidden_size
    assert head.layer_norm1.normalized_shape == (wide,)
    assert head.fc1.weight.shape == (cfg.head_hidden, wide)
    assert len(head.mlp_resnet_blocks) == 2
    for block in head.mlp_resnet_blocks:
        assert block.ffn[0].normalized_shape == (cfg.head_hidden,)
        assert block.ffn[1].weight.shape == (cfg.head_hidden, cfg.head_hidden)
    assert head.layer_norm2.normalized_shape == (cfg.head_hidden,)
    assert head.fc2.weight.shape == (cfg.action_dim, cfg.head_hidden)
    out = micro.action_head(torch.randn(3, cfg.num_action_tokens, cfg.hidden_size))
    assert out.shape == (3, cfg.horizon, cfg.action_dim)


def test_published_7b_shapes():
    """The oft-7b preset on the meta device: the published shapes of every part."""
    policy = make_policy("oft-7b", device="meta", dtype=torch.bfloat16)
    sd = policy.state_dict()
    # 7,534,758,567 parameters, as built on an H200 (bench/policy/openvla_oft7b_memory_h200.json).
    assert sum(p.numel() for p in policy.parameters()) == 7_534_758_567
    assert sd["projector.fc1.weight"].shape == (8704, 2176)
    assert sd["projector.fc2.weight"].shape == (4096, 8704)
    assert sd["projector.fc3.weight"].shape == (4096, 4096)
    assert sd["proprio_projector.fc1.weight"].shape == (4096, 8)
    assert sd["proprio_projector.fc2.weight"].shape == (4096, 4096)
    assert sd["action_head.model.fc1.weight"].shape == (4096, 28672)
    assert sd["action_head.model.fc2.weight"].shape == (7, 4096)
    assert sd["language_model.model.embed_tokens.weight"].shape == (32064, 4096)
    assert sd["vision_backbone.featurizer.reg_token"].shape == (1, 4, 1024)
    assert sd["vision_backbone.featurizer.pos_embed"].shape == (1, 256, 1024)
    assert sd["vision_backbone.fused_featurizer.pos_embed"].shape == (1, 256, 1152)
    assert sd["vision_backbone.fused_featurizer.blocks.0.mlp.fc1.weight"].shape == (4304, 1152)
    assert sd["vision_backbone.featurizer.blocks.0.ls1.scale_factor"].shape == (1024,)
    # Built up to the second-to-last block (the last one never reaches an action).
    assert "vision_backbone.featurizer.blocks.22.norm1.weight" in sd
    assert "vision_backbone.featurizer.blocks.23.norm1.weight" not in sd
    assert "vision_backbone.fused_featurizer.blocks.25.norm1.weight" in sd
    assert policy.config.patches_per_image == 256 and policy.config.num_action_tokens == 56


def test_bounds_q99_by_hand(micro):
    """0.5 (a + 1) (q99 - q01 + 1e-8) + q01 where mask; proprio the inverse, clipped to [-1, 1]."""
    policy = make_oft_policy("oft-micro")
    q01 = torch.tensor([-2.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0])
    q99 = torch.tensor([4.0, 1.0, 3.0, 1.0, 0.5, 2.0, 1.0])
    mask = torch.tensor([True, True, True, True, True, True, False])
    policy.set_norm_stats({"action_q01": q01, "action_q99": q99, "action_mask": mask,
                           "proprio_q01": torch.full((8,), -2.0), "proprio_q99": torch.full((8,), 4.0),
                           "proprio_mask": torch.tensor([True] * 7 + [False])})
    a = torch.tensor([[0.5, -1.0, 1.0, 0.0, 0.2, -0.5, 0.7]])
    got = policy.unnormalize_actions(a)[0]
    # 0.5 * 1.5 * 6 - 2 = 2.5; -1 -> q01; +1 -> q99; 0 -> middle; 0.6 * 0.5 = 0.3; 0.25 * 2 = 0.5; unmasked as is.
    want = torch.tensor([2.5, 0.0, 3.0, 0.0, 0.3, 0.5, 0.7])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    p = torch.tensor([[1.0, -2.0, 4.0, 10.0, -5.0, 2.5, 0.0, 3.0]])
    # 2 * 3 / 6 - 1 = 0; q01 -> -1; q99 -> 1; clipped both ways; 2 * 4.5 / 6 - 1 = 0.5; 2 * 2 / 6 - 1;
    # the unmasked last one is clipped too (the reference clips after the where).
    want_p = torch.tensor([0.0, -1.0, 1.0, 1.0, -1.0, 0.5, 2 * 2 / 6 - 1, 1.0])
    torch.testing.assert_close(policy.normalize_proprio(p)[0], want_p, rtol=0, atol=1e-6)


def test_checkpoint_round_trip_gives_identical_actions(micro, tmp_path):
    x = inputs(micro.config)
    micro.save_pretrained(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, OFTPolicy) and loaded.config == micro.config
    with torch.no_grad():
        assert torch.equal(micro(*x), loaded(*x))
    for name in ("action_q01", "action_q99", "action_mask"):
        assert torch.equal(getattr(micro, name), getattr(loaded, name))


def test_quantize_runs_mixed_bit_layers(micro, tmp_path):
    from qvla_ros.quant import quantizable_linears
    from qvla_ros.quant.api import load_quantized_policy, mixed_bit_layers, quantize_
    from qvla_ros.quant.checkpoint import save_quantized
    from qvla_ros.quant.plan import plan_from_bits

    policy = load_policy(micro.save_pretrained(tmp_path / "float"))
    x = inputs(policy.config)
    with torch.no_grad():
        before = policy(*x)
    layers = quantizable_linears(policy)
    # QVLA's targets: the towers and the decoder, never the projectors or the head.
    assert any(n.startswith("vision_backbone.featurizer.") for n in layers)
    assert any(n.startswith("vision_backbone.fused_featurizer.") for n in layers)
    assert any(n.startswith("language_model.model.layers.") for n in layers)
    assert not any(n.startswith(("projector.", "proprio_projector.", "action_head.")) for n in layers)
    rng = np.random.default_rng(0)
    # One width per tile of 16 rows (the packer's row tile), mixed across each layer.
    bits = {n: np.repeat(rng.choice([2, 4, 8, 16], size=m.out_features // 16), 16) for n, m in layers.items()}
    plan = plan_from_bits(policy, bits)
    quantize_(policy, plan)
    assert set(mixed_bit_layers(policy)) == set(layers)
    with torch.no_grad():
        after = policy(*x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.equal(after, before)
    save_quantized(policy, plan, tmp_path / "q")
    again = load_quantized_policy(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(*x), after)


def test_make_policy_dispatches_on_oft_presets():
    assert isinstance(make_policy("oft-micro"), OFTPolicy)
    assert isinstance(make_policy(get_oft_config("oft-micro")), OFTPolicy)
    assert not isinstance(make_policy("micro"), OFTPolicy)


def test_oft_small_is_a_policy_worth_quantizing():
    # Counted on the meta device: the shapes without the 54 M random numbers.
    small = make_oft_policy("oft-small", device="meta")
    tiny = make_policy("tiny")
    cfg = small.config
    assert small.num_parameters() >= 10 * tiny.num_parameters() and small.num_parameters() >= 40_000_000
    assert cfg.num_layers >= 12
    # MetaWorld's inputs (qvla_ros.sim.env): two cameras, proprio 4, 4-d actions, chunks of 8.
    assert (cfg.n_cams, cfg.proprio_dim, cfg.action_dim, cfg.horizon) == (2, 4, 4, 8)
    smoke = get_oft_config("oft-smoke")
    for key in ("n_cams", "image_size", "patch_size", "proprio_dim", "action_dim", "horizon", "vocab_size",
                "bos_id", "stop_id", "empty_id", "pad_id", "max_text_tokens"):
        assert getattr(smoke, key) == getattr(cfg, key), key
    assert smoke.sequence_length == cfg.sequence_length
