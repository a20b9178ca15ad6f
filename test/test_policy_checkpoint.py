"""Policy checkpoints: bit-exact round trip, and clear errors for broken or mismatched ones."""
import json

import pytest
import torch

from qvla_ros.policy import CheckpointError, load_policy, make_policy


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy = make_policy("micro", seed=3)
    with torch.no_grad():
        policy.action_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        policy.action_std.copy_(torch.tensor([0.5, 0.4, 0.3, 0.2]))
    directory = policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "policy")
    return policy, directory


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip_is_bit_exact(saved):
    policy, directory = saved
    loaded = load_policy(directory)
    a, b = policy.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.config == policy.config
    assert loaded.tokenizer.to_str() == policy.tokenizer.to_str()
    cfg = policy.config
    images = torch.randint(0, 256, (2, cfg.n_cams, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    proprio = torch.randn(2, cfg.proprio_dim)
    with torch.no_grad():
        assert torch.equal(policy(images, ["a", "b"], proprio), loaded(images, ["a", "b"], proprio))


def test_saving_writes_only_safetensors_json_and_tokenizer(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    meta = json.loads((directory / "config.json").read_text())
    assert meta["format"] == "qvla-vla-policy" and meta["config"]["name"] == "micro"


def test_missing_directory_and_files(saved, tmp_path):
    _, directory = saved
    with pytest.raises(CheckpointError, match="not a directory"):
        load_policy(tmp_path / "nowhere")
    broken = _copy(directory, tmp_path / "c")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        load_policy(broken)


def test_truncated_weights_are_reported_as_corrupt(saved, tmp_path):
    _, directory = saved
    broken = _copy(directory, tmp_path / "c")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_policy(broken)


def test_garbage_config_and_tokenizer(saved, tmp_path):
    _, directory = saved
    broken = _copy(directory, tmp_path / "c")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_policy(broken)
    broken = _copy(directory, tmp_path / "d")
    (broken / "tokenizer.json").write_text("[]")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_policy(broken)
    broken = _copy(directory, tmp_path / "e")
    (broken / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a qvla-vla-policy config"):
        load_policy(broken)


def test_config_that_does_not_match_the_weights(saved, tmp_path):
    _, directory = saved
    broken = _copy(directory, tmp_path / "c")
    meta = json.loads((broken / "config.json").read_text())
    meta["config"]["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor decoder\.layers\.0\.mlp\.\w+\.weight has shape \(\d+, \d+\), config.json implies"):
        load_policy(broken)
    meta["config"]["intermediate_size"] = 128
    meta["config"]["num_layers"] = 3
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match config.json: missing \\['decoder.layers.2"):
        load_policy(broken)
    meta["config"]["num_layers"] = -1
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="num_layers must be a positive int"):
        load_policy(broken)


def test_non_finite_weights_are_refused(saved, tmp_path):
    policy, _ = saved
    bad = make_policy("micro", seed=3)
    with torch.no_grad():
        bad.action_head[0].weight[0, 0] = float("nan")
    directory = bad.save_pretrained(tmp_path / "nan")
    with pytest.raises(CheckpointError, match="action_head.0.weight holds NaN"):
        load_policy(directory)


def test_shipped_policy_loads_and_each_file_fits_16_mib():
    from qvla_ros.policy import default_checkpoint_dir

    directory = default_checkpoint_dir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (directory / name).stat().st_size <= 16 * 2**20, name
    policy = load_policy()
    cfg = policy.config
    assert cfg.name == "tiny" and (cfg.n_cams, cfg.image_size, cfg.proprio_dim, cfg.action_dim) == (2, 128, 4, 4)
    # The statistics of its training data are inside (not the identity placeholders).
    assert not torch.equal(policy.action_std, torch.ones(cfg.action_dim))
    images = torch.zeros(1, 2, 128, 128, 3, dtype=torch.uint8)
    with torch.no_grad():
        actions = policy(images, ["pull the drawer open"], torch.zeros(1, 4))
    assert actions.shape == (1, cfg.horizon, 4) and actions.abs().max() <= 1.0
