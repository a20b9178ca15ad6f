"""Behaviour cloning of a policy of either architecture (the VLA recipe: micro, tiny; OpenVLA-OFT:
oft-smoke, oft-small, ...) from scripted-expert demonstrations.

Every frame t of every episode is a sample: (images_t, instruction, proprio_t) -> the action chunk
actions[t : t + horizon], padded with the episode's last action. All episodes sit in memory as
uint8 (on the GPU when there is one), so a step costs one gather, the augmentation (brightness and
contrast jitter, random shifts: augment.py), one of the task's training phrasings in place of the
instruction (phrasings.py) and one forward/backward in bf16 autocast. What differs between the
architectures (tokenizer, statistics) is in training_arch.py.

The output directory is a loadable policy checkpoint at every save (config.json, tokenizer.json,
model.safetensors), plus `training_state.safetensors` (weights, optimizer moments, step, RNG: all
a resume needs, in one atomically replaced file, no pickle) and `training.json` (how it was
trained: data and manifest hash, steps, seed, device, wall time, loss curve).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..io import atomic_write, atomic_write_text
from .augment import jitter_images, random_shift, shift_pixels
from .modeling_vla import load_policy, make_policy
from .phrasings import TRAINING_PHRASINGS, PhrasingTable, all_training_texts
from .processing_vla import default_instructions
from .training_arch import new_tokenizer, norm_stats, read_tokenizer, train_policy_config

__all__ = ["TrainConfig", "ChunkData", "loss_on_batch", "random_shift", "train", "lr_factor", "STATE_FILE",
           "META_FILE"]

STATE_FILE = "training_state.safetensors"
META_FILE = "training.json"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Args:
        config: policy preset name ("tiny", "micro"; OFT: "oft-small", "oft-smoke", "oft-micro") or a
            config dict of either architecture.
        steps: optimizer steps in total (a resumed run continues up to this count).
        batch_size: samples per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to lr_min_ratio * lr).
        weight_decay: AdamW weight decay on matrices (not on biases, norms or embeddings).
        warmup_steps: linear warm-up length.
        lr_min_ratio: final learning rate as a fraction of lr.
        grad_clip: max global gradient norm.
        shift_pixels: random-shift augmentation: each camera image is translated by up to this
            many of the policy's pixels (edge pixels repeat); 0 turns it off.
        brightness, contrast: photometric jitter: each camera image's brightness and contrast are
            scaled by factors drawn from [1 - x, 1 + x] (0.2: +-20 %); 0 turns either off.
        phrasings: replace each sampled frame's instruction by one of its task's training
            phrasings (phrasings.TRAINING_PHRASINGS); validation always uses the episode's own.
        seed: seeds weights, sampling and augmentation.
        checkpoint_every: save every this many steps (and at the end).
        log_every: record the mean loss every this many steps.
        time_limit_s: optional wall-clock budget of the run (a resumed run's earlier invocations
            count); the learning-rate schedule follows whichever of steps or time is further
            along, and the run saves and stops when the time is up (so a run under a hard timeout
            still ends with a good checkpoint, and one split over several commands by stop_after_s
            still ends its schedule within a known total time, however fast the device).
        stop_after_s: optional wall-clock budget for this invocation that leaves the schedule on
            steps: the run saves and stops unfinished when it is up, and a `resume` continues it
            (training longer than one command may run, over several).
        device: "cuda", "cpu" or None (GPU when present).
        compile: run the training forward through torch.compile (fuses the elementwise work
            around the GEMMs, which is most of an oft-small step's time at batch 256); where
            compiling fails on the first step, the run goes on eagerly and training.json says why.
    """

    config: str | dict = "tiny"
    steps: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    lr_min_ratio: float = 0.05
    grad_clip: float = 1.0
    shift_pixels: int = 6
    brightness: float = 0.2
    contrast: float = 0.2
    phrasings: bool = True
    seed: int = 0
    checkpoint_every: int = 2000
    log_every: int = 50
    time_limit_s: float | None = None
    stop_after_s: float | None = None
    device: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.warmup_steps < 0:
            raise ValueError("TrainConfig: lr and grad_clip must be > 0, weight_decay and warmup_steps >= 0")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"TrainConfig.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.shift_pixels < 0:
            raise ValueError(f"TrainConfig.shift_pixels must be >= 0, got {self.shift_pixels}")
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1):
            raise ValueError(f"TrainConfig.brightness and contrast must be in [0, 1), got {self.brightness}, "
                             f"{self.contrast}")
        for name in ("time_limit_s", "stop_after_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")


class ChunkData:
    """All frames of a set of episodes, ready to sample action-chunk training batches from.

    images uint8 [N, n_cams, H, W, 3]; proprio float32 [N, P]; actions float32 [N, A];
    last float32 index of each frame's episode end; instr int64 index into `instructions`.
    """

    def __init__(self, episodes: Iterable[dict], horizon: int):
        images, proprio, actions, last, instr = [], [], [], [], []
        self.instructions: list[str] = []
        self.episode_count = 0
        offset = 0
        for ep in episodes:
            imgs = np.asarray(ep["images"])
            n = len(imgs)
            if imgs.dtype != np.uint8 or imgs.ndim != 5 or imgs.shape[-1] != 3 or n == 0:
                raise ValueError(f"episode images must be uint8 [T, n_cams, H, W, 3] with T > 0, "
                                 f"got {imgs.dtype} {imgs.shape}")
            if len(ep["proprio"]) != n or len(ep["actions"]) != n:
                raise ValueError(f"episode has {n} frames but {len(ep['proprio'])} proprio and "
                                 f"{len(ep['actions'])} actions")
            text = ep["instruction"]
            if text not in self.instructions:
                self.instructions.append(text)
            images.append(imgs)
            proprio.append(np.asarray(ep["proprio"], dtype=np.float32))
            actions.append(np.asarray(ep["actions"], dtype=np.float32))
            last.append(np.full(n, offset + n - 1, dtype=np.int64))
            instr.append(np.full(n, self.instructions.index(text), dtype=np.int64))
            offset += n
            self.episode_count += 1
        if not images:
            raise ValueError("no episodes to train on")
        self.horizon = horizon
        self.images = torch.from_numpy(np.concatenate(images))
        self.proprio = torch.from_numpy(np.concatenate(proprio))
        self.actions = torch.from_numpy(np.concatenate(actions))
        self.last = torch.from_numpy(np.concatenate(last))
        self.instr = torch.from_numpy(np.concatenate(instr))

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device) -> "ChunkData":
        for name in ("images", "proprio", "actions", "last", "instr"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images uint8 [B, C, H, W, 3], instruction ids [B], proprio [B, P], actions [B, horizon, A])."""
        index = index.to(self.images.device)
        steps = index[:, None] + torch.arange(self.horizon, device=index.device)
        steps = torch.minimum(steps, self.last[index][:, None])
        return self.images[index], self.instr[index], self.proprio[index], self.actions[steps]


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Warm-up then cosine, as a function of training progress in [0, 1]."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


#: Parameters never decayed beside vectors: embeddings (token, position; OFT's `pos_embed`), learnt
#: tokens (VLA action queries, OFT's [CLS] and registers).
_NO_DECAY = ("embed", "action_queries", "cls_token", "reg_token")


def _optimizer(policy: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        (decay if p.dim() >= 2 and not any(n in name for n in _NO_DECAY) else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def loss_on_batch(policy: torch.nn.Module, data: ChunkData, text: PhrasingTable, index: torch.Tensor,
                  generator: torch.Generator, shift: int = 0, brightness: float = 0.0, contrast: float = 0.0,
                  phrase: bool = False, forward: Callable | None = None) -> torch.Tensor:
    """Mean L1 between the predicted and the true normalized action chunks of frames `index`
    (a VLAPolicy or an OFTPolicy). `text`: the dataset's phrasings, tokenized; `phrase`: a drawn
    training phrasing per frame rather than the episode's own sentence. The defaults (no
    augmentation, own sentence) are the validation loss. `forward`: the policy's
    predict_normalized as it should run (e.g. compiled); None: the policy's own."""
    images, instr, proprio, actions = data.batch(index)
    ids, mask = text.sample(instr, generator) if phrase else text.canonical(instr)
    images = jitter_images(images, brightness, contrast, generator)
    pixels = shift_pixels(policy.images_to_pixels(images), len(index), policy.config.n_cams, shift, generator)
    pred = (forward or policy.predict_normalized)(pixels, ids, mask, policy.normalize_proprio(proprio))
    return F.l1_loss(pred, policy.normalize_actions(actions))


# State files ------------------------------------------------------------------------------------
def _save_state(path: Path, policy: torch.nn.Module, opt: torch.optim.Optimizer, generator: torch.Generator,
                info: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    tensors["rng.sampler"] = generator.get_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    meta = {"info": json.dumps(info), "param_groups": json.dumps(groups)}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def _load_state(path: Path, policy: torch.nn.Module, opt: torch.optim.Optimizer,
                generator: torch.Generator) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{path} is not a readable training state: {exc}") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        policy.load_state_dict(model)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match the policy being trained: {exc}") from None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    groups = json.loads(meta["param_groups"])
    current = opt.state_dict()
    for g, saved in zip(current["param_groups"], groups):
        g.update(saved)
    opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    generator.set_state(tensors["rng.sampler"])
    return json.loads(meta["info"])


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# The loop ---------------------------------------------------------------------------------------
def train(episodes: Iterable[dict], out: str | os.PathLike, cfg: TrainConfig, manifest: dict | None = None,
          data_path: str | None = None, resume: bool = False, progress: bool = True,
          val_episodes: Iterable[dict] | None = None, init_from: str | os.PathLike | None = None) -> dict:
    """Trains a policy on `episodes` (DemoDataset.episodes() dicts) into checkpoint directory `out`.

    With cfg.stop_after_s the run may stop unfinished (record["finished"] False); call again
    with `resume=True` to continue it from its last save.

    `val_episodes` (optional, e.g. the dataset's "val" split) give the held-out L1 recorded at
    every save. `init_from` starts from a trained checkpoint's weights, tokenizer and normalization
    statistics (a new optimizer and schedule: fine-tuning, or more training after a run whose
    optimizer state is gone). Returns the training record (also written to out/training.json).
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy_config = train_policy_config(cfg.config)
    manifest = manifest or {}
    data_hash = manifest_hash(manifest)

    state_path = out / STATE_FILE
    record: dict = {}
    if resume and state_path.is_file():
        record = json.loads((out / META_FILE).read_text()) if (out / META_FILE).is_file() else {}
        if record.get("manifest_sha256") not in (None, data_hash):
            raise ValueError(f"cannot resume {out}: it was trained on other data "
                             f"(manifest {record['manifest_sha256'][:12]}, now {data_hash[:12]})")
        # Compared as JSON holds it (tuples read back as lists).
        if record.get("policy_config") not in (None, json.loads(json.dumps(policy_config.to_dict()))):
            raise ValueError(f"cannot resume {out}: it holds another policy configuration")
    elif resume:
        print(f"qvla train: nothing to resume in {out}, starting afresh")
        resume = False

    train_data = ChunkData(episodes, policy_config.horizon)
    val_episodes = list(val_episodes) if val_episodes is not None else []
    val_data = ChunkData(val_episodes, policy_config.horizon) if val_episodes else None
    del val_episodes
    for data in (train_data, val_data):
        if data is not None:
            _check_shapes(data, policy_config)
    phrasings = TRAINING_PHRASINGS if cfg.phrasings else None

    init_record = None
    if init_from is not None and not resume:
        policy = load_policy(init_from, device=device)
        if policy.config.to_dict() != policy_config.to_dict():
            raise ValueError(f"--init {init_from} holds a {policy.config.name!r} policy of another shape "
                             f"than the {policy_config.name!r} being trained")
        tokenizer = policy.tokenizer
        init_meta = Path(init_from) / META_FILE
        init_record = {"path": str(init_from)}
        if init_meta.is_file():
            prior = json.loads(init_meta.read_text())
            init_record.update({k: prior.get(k) for k in ("steps_done", "wall_s", "device", "episodes",
                                                           "manifest_sha256", "val_l1", "seed")})
    else:
        if resume:
            tokenizer = read_tokenizer(policy_config, (out / "tokenizer.json").read_text())
        else:
            # Every sentence the run can show the policy, and the suite's: its vocabulary.
            sentences = all_training_texts(train_data.instructions + default_instructions(), phrasings)
            tokenizer = new_tokenizer(policy_config, sentences)
        policy = make_policy(policy_config, seed=cfg.seed, device=device, tokenizer=tokenizer)
        policy.set_norm_stats(norm_stats(policy_config, train_data.proprio.numpy(), train_data.actions.numpy()))
    if resume and record.get("init_from"):
        init_record = record["init_from"]
    train_data.to(device)
    if val_data is not None:
        val_data.to(device)

    train_text = PhrasingTable(train_data.instructions, tokenizer, policy_config.max_text_tokens, phrasings, device)
    val_text = (PhrasingTable(val_data.instructions, tokenizer, policy_config.max_text_tokens, None, device)
                if val_data is not None else None)
    opt = _optimizer(policy, cfg, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(cfg.seed)
    step, wall_before, losses = 0, 0.0, []
    if resume:
        info = _load_state(state_path, policy, opt, generator)
        step, wall_before, losses = info["step"], info["wall_s"], info.get("losses", [])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    policy.train()

    def save(final: bool) -> None:
        wall = wall_before + time.perf_counter() - started
        info = {"step": step, "wall_s": wall, "losses": losses}
        policy.eval()
        val = _val_loss(policy, val_data, val_text) if val_data is not None else None
        policy.train()
        _save_state(state_path, policy, opt, generator, info)
        policy.save_pretrained(out)
        record.update({
            "data": data_path, "manifest_sha256": data_hash, "episodes": train_data.episode_count,
            "frames": len(train_data), "val_episodes": val_data.episode_count if val_data else 0,
            "val_l1": val, "steps_done": step, "steps_target": cfg.steps, "finished": final,
            "train_config": dataclasses.asdict(cfg), "policy_config": policy_config.to_dict(),
            "parameters": policy.num_parameters(), "seed": cfg.seed, "device": _device_name(device),
            "torch": torch.__version__, "wall_s": round(wall, 1), "losses": losses,
            "init_from": init_record, "phrasings": len(train_text.texts),
        })
        atomic_write_text(out / META_FILE, json.dumps(record, indent=1) + "\n")
        if progress:   # one plain line per save: readable in a log file, where the bar is not
            rate = (step - first_step) / max(1e-9, time.perf_counter() - loop_started)
            last = f"{losses[-1][1]:.4f}" if losses else "-"
            tqdm.write(f"qvla train: step {step}/{cfg.steps} l1 {last} val_l1 {val} "
                       f"{rate:.2f} steps/s, {wall:.0f} s in all{' (finished)' if final else ''}")

    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True,
               mininterval=5.0)
    window: list[torch.Tensor] = []
    warmup = cfg.warmup_steps / cfg.steps
    first_step, loop_started = step, time.perf_counter()
    finished = True
    forward = torch.compile(policy.predict_normalized) if cfg.compile else None
    record["compiled"] = bool(cfg.compile)

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        with autocast:
            return loss_on_batch(policy, train_data, train_text, index, generator, shift=cfg.shift_pixels,
                                 brightness=cfg.brightness, contrast=cfg.contrast, phrase=cfg.phrasings,
                                 forward=forward)

    while step < cfg.steps:
        elapsed = time.perf_counter() - started
        prog = step / cfg.steps
        if cfg.time_limit_s:
            prog = max(prog, (wall_before + elapsed) / cfg.time_limit_s)
        if prog >= 1.0:
            break
        if cfg.stop_after_s and elapsed >= cfg.stop_after_s:
            finished = False   # this invocation's time is up, not the schedule: --resume goes on
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(prog, warmup, cfg.lr_min_ratio)
        index = torch.randint(0, len(train_data), (cfg.batch_size,), generator=generator)
        try:
            loss = step_loss(index)
        except Exception as exc:  # noqa: BLE001 - whatever torch.compile raises, the run goes on eagerly
            if forward is None or step > first_step:
                raise
            forward, record["compiled"] = None, f"failed, eager instead: {type(exc).__name__}: {exc}"[:500]
            tqdm.write(f"qvla train: torch.compile failed on the first step ({type(exc).__name__}); training eagerly")
            loss = step_loss(index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        window.append(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean = torch.stack(window).mean().item()
            window.clear()
            if not math.isfinite(mean):
                raise FloatingPointError(f"training loss became {mean} at step {step}")
            losses.append([step, round(mean, 5)])
            bar.set_postfix(l1=f"{mean:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save(final=False)
    bar.close()
    save(final=finished)
    policy.eval()
    return record


def _check_shapes(data: ChunkData, config) -> None:
    """Refuse data the policy cannot take, naming both (e.g. LIBERO demonstrations, 8 proprio and
    7-d actions, for a MetaWorld-shaped preset)."""
    have = (data.images.shape[1], data.proprio.shape[1], data.actions.shape[1])
    want = (config.n_cams, config.proprio_dim, config.action_dim)
    if have != want:
        raise ValueError(f"the demonstrations have (cameras, proprio, action) = {have}; the {config.name!r} "
                         f"policy takes {want}")


@torch.no_grad()
def _val_loss(policy: torch.nn.Module, data: ChunkData, text: PhrasingTable, max_frames: int = 4096,
              batch: int = 512) -> float:
    """Mean normalized L1 over (up to max_frames evenly spaced) held-out frames, no augmentation."""
    index = torch.linspace(0, len(data) - 1, min(max_frames, len(data))).long()
    total = 0.0
    autocast = torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=policy.device.type == "cuda")
    for chunk in index.split(batch):
        with autocast:
            total += loss_on_batch(policy, data, text, chunk, torch.Generator()).item() * len(chunk)
    return round(total / len(index), 5)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
