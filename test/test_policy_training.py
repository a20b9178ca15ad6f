"""Behaviour cloning: chunk targets, the loss going down, checkpoints that load and resume."""
import json

import numpy as np
import pytest
import torch

from qvla_ros.policy import load_policy, make_policy
from qvla_ros.policy.training import ChunkData, TrainConfig, loss_on_batch, random_shift, train

INSTRUCTIONS = ["pull the drawer open", "push the drawer close"]


def synthetic_episodes(n=4, steps=10, size=32, seed=0):
    """Episodes in the DemoDataset format whose actions depend on the instruction and on where
    a bright square sits in the image."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(n):
        task = e % 2
        images = np.zeros((steps, 2, size, size, 3), np.uint8)
        x = int(rng.integers(0, size - 8))
        images[:, :, 4:12, x:x + 8] = 255
        actions = np.zeros((steps, 4), np.float32)
        actions[:, 0] = x / size
        actions[:, 1] = 1 - 2 * task
        actions[:, 2] = np.linspace(-1, 1, steps)
        episodes.append({"images": images, "proprio": rng.normal(size=(steps, 4)).astype(np.float32),
                         "actions": actions, "instruction": INSTRUCTIONS[task], "task": str(task), "seed": e})
    return episodes


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops run faster on one thread than contending for two
    yield
    torch.set_num_threads(before)


def test_chunks_are_padded_with_the_last_action():
    eps = synthetic_episodes(n=2, steps=5)
    data = ChunkData(eps, horizon=4)
    assert len(data) == 10 and data.instructions == INSTRUCTIONS
    _, instr, _, actions = data.batch(torch.tensor([0, 3, 4, 5]))
    torch.testing.assert_close(actions[0], torch.from_numpy(eps[0]["actions"][0:4]))
    want = torch.from_numpy(eps[0]["actions"][[3, 4, 4, 4]])
    torch.testing.assert_close(actions[1], want)
    torch.testing.assert_close(actions[2], torch.from_numpy(eps[0]["actions"][[4, 4, 4, 4]]))
    torch.testing.assert_close(actions[3], torch.from_numpy(eps[1]["actions"][0:4]))
    assert instr.tolist() == [0, 0, 0, 1]


def test_bad_episodes_are_refused():
    ep = synthetic_episodes(n=1)[0]
    with pytest.raises(ValueError, match="uint8"):
        ChunkData([dict(ep, images=ep["images"].astype(np.float32))], horizon=4)
    with pytest.raises(ValueError, match="proprio"):
        ChunkData([dict(ep, proprio=ep["proprio"][:3])], horizon=4)
    with pytest.raises(ValueError, match="no episodes"):
        ChunkData([], horizon=4)


def test_random_shift_translates_by_whole_pixels():
    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert torch.equal(random_shift(pixels, 0, torch.Generator().manual_seed(0)), pixels)
    shifted = random_shift(pixels, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == pixels.shape
    # Every output pixel is some input pixel of the same image (a translation, not a blur).
    for i in range(2):
        assert set(shifted[i].unique().tolist()) <= set(pixels[i].unique().tolist())


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(one_thread):
    policy = make_policy("micro", seed=0).train()
    data = ChunkData(synthetic_episodes(), horizon=policy.config.horizon)
    ids, mask = policy.tokenizer.encode(data.instructions, policy.config.max_text_tokens)
    index = torch.arange(0, len(data), 3)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = loss_on_batch(policy, data, ids, mask, index, 0, torch.Generator())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_writes_a_loadable_checkpoint_and_resumes(tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = TrainConfig(config="micro", steps=6, batch_size=8, checkpoint_every=3, log_every=2,
                      warmup_steps=1, seed=1)
    record = train(synthetic_episodes(), out, cfg, manifest={"episodes": 4}, data_path="synthetic",
                   progress=False)
    assert record["steps_done"] == 6 and record["finished"]
    assert [s for s, _ in record["losses"]] == [2, 4, 6]
    meta = json.loads((out / "training.json").read_text())
    for key in ("manifest_sha256", "seed", "device", "wall_s", "frames", "episodes", "train_config"):
        assert key in meta, key
    policy = load_policy(out)
    # The statistics of the training data travel inside the checkpoint.
    np.testing.assert_allclose(policy.action_mean[1].item(), 0.0, atol=1e-6)
    assert policy.tokenizer.tokenize("pull the drawer open") == ["pull", "the", "drawer", "open"]

    cfg.steps = 8
    record = train(synthetic_episodes(), out, cfg, manifest={"episodes": 4}, resume=True, progress=False)
    assert record["steps_done"] == 8 and [s for s, _ in record["losses"]][-1] == 8
    with pytest.raises(ValueError, match="trained on other data"):
        train(synthetic_episodes(), out, cfg, manifest={"episodes": 5}, resume=True, progress=False)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="shift_pixels"):
        TrainConfig(shift_pixels=-1)


def test_qvla_train_verb_on_a_demonstration_folder(tmp_path, one_thread):
    from qvla_ros.cli import main
    from qvla_ros.dataset import MANIFEST, episode_path, write_episode, write_json_atomic

    data = tmp_path / "demos"
    entries = []
    for seed, ep in zip((0, 9, 1), synthetic_episodes(n=3)):  # seed 9 lands in the dataset's val split
        path = write_episode(episode_path(data, ep["task"], seed), ep["images"], ep["proprio"], ep["actions"],
                             ep["instruction"], ep["task"], seed)
        entries.append({"file": path.relative_to(data).as_posix(), "task": ep["task"], "seed": seed,
                        "length": len(ep["actions"])})
    write_json_atomic(data / MANIFEST, {"format": "qvla-demos", "version": 1, "complete": True,
                                        "recipe": {"tasks": {}}, "episodes": entries})
    out = tmp_path / "policy"
    rc = main(["train", "--data", str(data), "--out", str(out), "--config", "micro", "--steps", "2",
               "--batch-size", "4", "--device", "cpu", "--seed", "3"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    assert (record["episodes"], record["val_episodes"], record["steps_done"], record["seed"]) == (2, 1, 2, 3)
    assert record["val_l1"] is not None and record["data"] == str(data.resolve())
    assert load_policy(out).config.name == "micro"
