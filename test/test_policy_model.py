"""The VLA policy's forward contract, its attention pattern and its configurations."""
import dataclasses

import pytest
import torch

from qvla_ros.policy import VLAConfig, build_attention_mask, get_config, make_policy
from qvla_ros.policy import modeling_vla
from qvla_ros.policy.configuration_vla import PRESETS, VisionEncoderConfig

INSTR = ["pull the drawer open", "push the drawer close"]


@pytest.fixture(scope="module")
def micro():
    return make_policy("micro", seed=0)


def inputs(config, batch=2, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = size or config.image_size
    images = torch.randint(0, 256, (batch, config.n_cams, size, size, 3), dtype=torch.uint8, generator=g)
    proprio = torch.randn(batch, config.proprio_dim, generator=g)
    return images, (INSTR * batch)[:batch], proprio


def test_forward_shapes_dtype_and_bounds(micro):
    cfg = micro.config
    with torch.no_grad():
        actions = micro(*inputs(cfg, batch=3))
    assert actions.shape == (3, cfg.horizon, cfg.action_dim)
    assert actions.dtype == torch.float32
    # Outputs are clamped to the action range stored in the checkpoint ([-1, 1] by default).
    assert actions.abs().max() <= 1.0


def test_frames_of_another_size_are_resized(micro):
    with torch.no_grad():
        actions = micro(*inputs(micro.config, batch=2, size=48))
    assert actions.shape == (2, micro.config.horizon, micro.config.action_dim)


def test_forward_is_deterministic_and_seeded(micro):
    x = inputs(micro.config)
    with torch.no_grad():
        first, second = micro(*x), micro(*x)
        assert torch.equal(first, second)
        same = make_policy("micro", seed=0)(*x)
        other = make_policy("micro", seed=1)(*x)
    assert torch.equal(first, same)
    assert not torch.allclose(first, other)


def test_batch_elements_are_independent(micro):
    images, instr, proprio = inputs(micro.config, batch=2)
    with torch.no_grad():
        both = micro(images, instr, proprio)
        alone = micro(images[1:], instr[1:], proprio[1:])
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)


def test_instruction_changes_the_actions(micro):
    images, _, proprio = inputs(micro.config, batch=1)
    with torch.no_grad():
        a = micro(images, ["pull the drawer open"], proprio)
        b = micro(images, ["push the drawer close"], proprio)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad, match", [
    (lambda i, t, p: (i.float(), t, p), "uint8"),
    (lambda i, t, p: (i[:, :1], t, p), "uint8 \\[B, 2"),
    (lambda i, t, p: (i, t[:1], p), "list of 2 strings"),
    (lambda i, t, p: (i, "open", p), "list of 2 strings"),
    (lambda i, t, p: (i, t, p[:, :3]), "proprio"),
])
def test_bad_inputs_raise_value_error(micro, bad, match):
    with pytest.raises(ValueError, match=match):
        micro(*bad(*inputs(micro.config)))


def test_linear_layers_are_plain_and_named(micro):
    linears = {n: type(m) for n, m in micro.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(linears.values()) == {torch.nn.Linear}
    for name in ("decoder.layers.0.self_attn.q_proj", "decoder.layers.1.mlp.down_proj",
                 "vision.0.encoder.layers.0.mlp.fc1", "projector.0", "action_head.0"):
        assert name in linears


# Attention pattern -------------------------------------------------------------------------------
def _slot_outputs(policy, x):
    with torch.no_grad():
        return policy.predict_normalized(*policy.prepare_inputs(*x))


def _perturb_last_slot(policy):
    with torch.no_grad():
        policy.action_queries[-1] += 1.0


def test_action_slots_attend_both_ways():
    """Changing the LAST action slot's input changes the FIRST step's action, which is only
    possible if earlier slots attend to later ones; under a causal mask the same check fails."""
    x = inputs(get_config("micro"), batch=1)
    policy = make_policy("micro", seed=0)
    before = _slot_outputs(policy, x)
    _perturb_last_slot(policy)
    after = _slot_outputs(policy, x)
    assert (after[0, 0] - before[0, 0]).abs().max() > 1e-4


def test_the_bidirectional_check_detects_a_causal_mask(monkeypatch):
    def causal(config, text_mask):
        mask = build_attention_mask(config, text_mask)
        return mask & torch.ones(mask.shape[-2:], dtype=torch.bool).tril()

    monkeypatch.setattr(modeling_vla, "build_attention_mask", causal)
    x = inputs(get_config("micro"), batch=1)
    policy = make_policy("micro", seed=0)
    before = _slot_outputs(policy, x)
    _perturb_last_slot(policy)
    after = _slot_outputs(policy, x)
    assert torch.equal(after[0, 0], before[0, 0])  # causal: the first step cannot see the last slot
    assert not torch.equal(after[0, -1], before[0, -1])


def test_mask_layout():
    cfg = get_config("micro").replace(prefix_attention="causal")
    text_mask = torch.zeros(1, cfg.max_text_tokens, dtype=torch.bool)
    text_mask[0, :3] = True
    m = build_attention_mask(cfg, text_mask)[0, 0]
    n_img = cfg.n_cams * cfg.patches_per_image
    prefix = n_img + cfg.max_text_tokens + 1
    assert m.shape == (cfg.sequence_length, cfg.sequence_length)
    assert not m[:prefix, prefix:].any()            # the prefix never sees the action slots
    assert m[5, :6].all() and not m[5, 6:].any()     # causal prefix
    assert not m[:, n_img + 3:n_img + cfg.max_text_tokens].any()  # padding is never a key
    assert m[prefix:, prefix:].all()                 # slots see each other both ways
    full = build_attention_mask(cfg.replace(prefix_attention="full"), text_mask)[0, 0]
    assert full[0, :n_img].all()


def test_padding_tokens_do_not_influence_actions():
    policy = make_policy("micro", seed=0)
    x = inputs(policy.config, batch=1)
    before = _slot_outputs(policy, x)
    with torch.no_grad():
        policy.decoder.embed_tokens.weight[policy.tokenizer.pad_id] += 3.0
    torch.testing.assert_close(_slot_outputs(policy, x), before, rtol=0, atol=1e-6)


def test_eager_and_sdpa_attention_agree():
    x = inputs(get_config("micro"), batch=2)
    with torch.no_grad():
        sdpa = make_policy(get_config("micro").replace(attn_implementation="sdpa"))(*x)
        eager = make_policy(get_config("micro").replace(attn_implementation="eager"))(*x)
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)


# Configurations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
    cfg = get_config(name)
    assert VLAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["name"] == name


@pytest.mark.parametrize("change, match", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": 66}, "num_heads"),
    ({"image_size": 30}, "patch_size"),
    ({"prefix_attention": "sideways"}, "prefix_attention"),
    ({"attn_implementation": "flash"}, "attn_implementation"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"vision": ()}, "at least one"),
])
def test_config_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(get_config("micro"), **change)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown VLAConfig fields: \\['hiden_size'\\]"):
        VLAConfig.from_dict({"hiden_size": 8})
    with pytest.raises(ValueError, match="patch_size"):
        VisionEncoderConfig(patch_size=0)
    with pytest.raises(ValueError, match="unknown policy config"):
        get_config("huge")
