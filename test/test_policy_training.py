"""Behaviour cloning: chunk targets, augmentation, the loss going down, checkpoints that load and
resume, for both architectures (the VLA recipe's micro, OFT's oft-smoke end to end)."""
import json
import time

import numpy as np
import pytest
import torch

from qvla_ros.policy import load_policy, make_policy
from qvla_ros.policy.augment import jitter_images, shift_pixels
from qvla_ros.policy.phrasings import PhrasingTable
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


def test_jitter_scales_contrast_and_brightness_per_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(40, 200, (4, 2, 8, 8, 3), dtype=torch.uint8, generator=g)
    assert torch.equal(jitter_images(images, 0.0, 0.0, g), images)
    out = jitter_images(images, 0.2, 0.2, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    x, y = images.float().reshape(8, -1), out.float().reshape(8, -1)
    bright = y.mean(1) / x.mean(1)                          # contrast keeps the mean: brightness alone
    assert ((bright > 0.79) & (bright < 1.21)).all() and bright.std() > 0.01   # its own factor per image
    contrast = y.std(1) / x.std(1) / bright
    assert ((contrast > 0.78) & (contrast < 1.22)).all()
    bright_only = jitter_images(images, 0.2, 0.0, torch.Generator().manual_seed(1)).float().reshape(8, -1)
    torch.testing.assert_close(bright_only / x, (bright_only / x).mean(1, keepdim=True).expand_as(x),
                               atol=0.02, rtol=0.0)           # a brightness factor scales every pixel alike


def test_shift_moves_both_towers_channels_of_an_oft_image_together():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 8, 8).expand(2 * 2, 6, 8, 8).reshape(2, 12, 8, 8)   # B=2, 2 cams, 6 channels alike
    out = shift_pixels(image.contiguous(), batch=2, n_cams=2, max_shift=3, generator=g)
    per_image = out.reshape(4, 6, 8, 8)
    assert all(torch.equal(per_image[i, 0], per_image[i, c]) for i in range(4) for c in range(6))
    assert not all(torch.equal(per_image[0, 0], per_image[i, 0]) for i in range(4))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(one_thread):
    policy = make_policy("micro", seed=0).train()
    data = ChunkData(synthetic_episodes(), horizon=policy.config.horizon)
    text = PhrasingTable(data.instructions, policy.tokenizer, policy.config.max_text_tokens)
    index = torch.arange(0, len(data), 3)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = loss_on_batch(policy, data, text, index, torch.Generator())
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


def test_a_forward_that_fails_to_compile_trains_eagerly(tmp_path, one_thread, monkeypatch):
    """--compile where torch.compile breaks on the first step: the run goes on eagerly to the end,
    and training.json says what failed."""
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("inductor: no C compiler")
        return compiled

    runs = {}
    for name, compile_ in (("eager", False), ("broken", True)):
        cfg = TrainConfig(config="micro", steps=4, batch_size=8, checkpoint_every=4, log_every=2,
                          warmup_steps=1, seed=1, compile=compile_)
        with monkeypatch.context() as m:
            m.setattr(torch, "compile", broken_compile)
            runs[name] = train(synthetic_episodes(), tmp_path / name, cfg, manifest={"episodes": 4},
                               data_path="synthetic", progress=False)
    assert runs["eager"]["compiled"] is False
    assert runs["broken"]["compiled"].startswith("failed, eager instead: RuntimeError: inductor")
    assert runs["broken"]["finished"] and runs["broken"]["steps_done"] == 4
    assert json.loads((tmp_path / "broken" / "training.json").read_text())["compiled"] == runs["broken"]["compiled"]


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="shift_pixels"):
        TrainConfig(shift_pixels=-1)
    with pytest.raises(ValueError, match="brightness"):
        TrainConfig(brightness=1.5)
    with pytest.raises(ValueError, match="stop_after_s"):
        TrainConfig(stop_after_s=0)


def test_oft_smoke_trains_checkpoints_resumes_loads_and_predicts(tmp_path, one_thread):
    """The OFT training path end to end on CPU (what bench/gpu/train_oft_small.sh runs at
    oft-small on the GPU): train -> checkpoint -> a run stopped by its time budget -> resume ->
    load -> predict, in seconds."""
    started = time.perf_counter()
    out = tmp_path / "oft"
    cfg = TrainConfig(config="oft-smoke", steps=6, batch_size=4, checkpoint_every=2, log_every=2,
                      warmup_steps=1, seed=2)
    # A budget already spent: the run saves after its first loop check and is not finished.
    record = train(synthetic_episodes(), out, TrainConfig(**{**cfg.__dict__, "stop_after_s": 1e-9}),
                   manifest={"episodes": 4}, progress=False, val_episodes=synthetic_episodes(n=1, seed=7))
    assert record["steps_done"] == 0 and not record["finished"]
    record = train(synthetic_episodes(), out, TrainConfig(**{**cfg.__dict__, "steps": 4}), manifest={"episodes": 4},
                   resume=True, progress=False, val_episodes=synthetic_episodes(n=1, seed=7))
    assert record["steps_done"] == 4 and record["finished"] and record["val_l1"] is not None
    assert record["policy_config"]["name"] == "oft-smoke" and record["phrasings"] == 12
    state_before = (out / "training_state.safetensors").stat().st_mtime_ns
    record = train(synthetic_episodes(), out, cfg, manifest={"episodes": 4}, resume=True, progress=False)
    assert record["steps_done"] == 6 and [s for s, _ in record["losses"]] == [2, 4, 6]
    assert (out / "training_state.safetensors").stat().st_mtime_ns != state_before

    policy = load_policy(out)
    assert type(policy).__name__ == "OFTPolicy" and policy.config.name == "oft-smoke"
    # BOUNDS_Q99 statistics of the training data, and the trained subword tokenizer, in the checkpoint.
    np.testing.assert_allclose(policy.action_q01[1].item(), -1.0, atol=1e-6)
    assert 0 not in policy.tokenizer.prompt_ids("shut the drawer")
    images = torch.zeros(2, 2, 32, 32, 3, dtype=torch.uint8)
    with torch.no_grad():
        actions = policy(images, ["pull the drawer open", "shut the drawer"], torch.zeros(2, 4))
    assert actions.shape == (2, 8, 4) and torch.isfinite(actions).all()
    assert time.perf_counter() - started < 40


def test_data_of_another_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\(2, 4, 4\); the 'oft-micro' policy takes \(2, 8, 7\)"):
        train(synthetic_episodes(n=2), tmp_path / "x", TrainConfig(config="oft-micro", steps=1, batch_size=2),
              progress=False)


@pytest.mark.parametrize("flag,preset", [("--config", "micro"), ("--preset", "oft-smoke")])
def test_qvla_train_verb_on_a_demonstration_folder(tmp_path, one_thread, flag, preset):
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
    rc = main(["train", "--data", str(data), "--out", str(out), flag, preset, "--steps", "2",
               "--batch-size", "4", "--device", "cpu", "--seed", "3"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    assert (record["episodes"], record["val_episodes"], record["steps_done"], record["seed"]) == (2, 1, 2, 3)
    assert record["val_l1"] is not None and record["data"] == str(data.resolve())
    assert load_policy(out).config.name == preset
    # --stop-after leaves the run unfinished; --resume finishes it.
    rc = main(["train", "--data", str(data), "--out", str(out), flag, preset, "--steps", "3", "--batch-size", "4",
               "--device", "cpu", "--seed", "3", "--resume", "--stop-after", "1e-9"])
    assert rc == 0 and not json.loads((out / "training.json").read_text())["finished"]
    main(["train", "--data", str(data), "--out", str(out), flag, preset, "--steps", "3", "--batch-size", "4",
          "--device", "cpu", "--seed", "3", "--resume"])
    record = json.loads((out / "training.json").read_text())
    assert record["finished"] and record["steps_done"] == 3


def test_the_time_budget_spans_a_resumed_run(tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = TrainConfig(config="micro", steps=2, batch_size=4, log_every=1, warmup_steps=0)
    train(synthetic_episodes(n=2), out, cfg, progress=False)
    # The first command's seconds count against --time-limit: nothing is left for more steps.
    cfg = TrainConfig(config="micro", steps=50, batch_size=4, log_every=1, warmup_steps=0, time_limit_s=1e-6)
    record = train(synthetic_episodes(n=2), out, cfg, resume=True, progress=False)
    assert record["steps_done"] == 2 and record["finished"]


def test_the_libero_preset_trains_on_libero_shaped_demonstrations_and_fits_the_suite(tmp_path, one_thread):
    """oft-smoke-libero (oft-small-libero's CPU twin): LIBERO's 224 px frames, 8 proprio values and
    7-d actions train it; the trained policy is one `qvla eval --suite libero-*` accepts."""
    import sys
    from pathlib import Path

    from qvla_ros.cli import main
    from qvla_ros.sim.benchmarks import get_benchmark

    sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
    from demo_folders import demo_folder

    tasks = [("libero_object/0", "pick up the alphabet soup and place it in the basket"),
             ("libero_object/1", "pick up the cream cheese and place it in the basket")]
    data = demo_folder(tmp_path / "demos", tasks, 2, 224, proprio_dim=8, action_dim=7, frames=10,
                       recipe={"suite": "libero-object"})
    out = tmp_path / "policy"
    assert main(["train", "--data", str(data), "--out", str(out), "--preset", "oft-smoke-libero",
                 "--steps", "2", "--batch-size", "4", "--device", "cpu"]) == 0
    policy = load_policy(out)
    bench = get_benchmark("libero-object")
    bench.check_policy(policy.config, bench.cameras)
    with torch.no_grad():
        actions = policy(torch.zeros(1, 2, 224, 224, 3, dtype=torch.uint8), [tasks[0][1]], torch.zeros(1, 8))
    assert actions.shape == (1, 8, 7) and torch.isfinite(actions).all()
    with pytest.raises(ValueError, match="action_dim is 4"):
        bench.check_policy(make_policy("oft-smoke").config, bench.cameras)
