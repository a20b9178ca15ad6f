"""`qvla train`: behaviour cloning of a policy (VLA recipe or OpenVLA-OFT) from a demonstration directory."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a policy from demonstrations",
        description="Train a policy (behaviour cloning, L1 on action chunks) from a `qvla demos` "
                    "directory: the VLA recipe (tiny, micro) or the OpenVLA-OFT architecture (oft-small, "
                    "oft-smoke, oft-micro). Uses the GPU when present (bf16 autocast). OUT becomes a loadable "
                    "checkpoint at every save; --resume continues from it (--stop-after splits a long run "
                    "over several commands).")
    p.add_argument("--data", required=True, help="demonstration directory (manifest.json + episode .npz files)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", "--preset", dest="config", default="tiny",
                   help="policy preset: tiny, micro (VLA recipe); oft-small, oft-smoke, oft-micro (OpenVLA-OFT; "
                        "MetaWorld's inputs), oft-small-libero, oft-smoke-libero (LIBERO's) (default: tiny)")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps in total (default: 20000)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per step (default: 256)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: 3e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling, augmentation (default: 0)")
    p.add_argument("--shift", type=int, default=6, help="random-shift augmentation in pixels, 0 = off (default: 6)")
    p.add_argument("--brightness", type=float, default=0.2,
                   help="brightness jitter: factors in [1-x, 1+x] per camera image, 0 = off (default: 0.2)")
    p.add_argument("--contrast", type=float, default=0.2,
                   help="contrast jitter: factors in [1-x, 1+x] per camera image, 0 = off (default: 0.2)")
    p.add_argument("--no-phrasings", action="store_true",
                   help="train on each episode's own instruction only (default: one of its task's training "
                        "phrasings per sample)")
    p.add_argument("--checkpoint-every", type=int, default=2000, help="save every N steps (default: 2000)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock budget of the whole run in seconds (a resumed run's earlier commands count): "
                        "the schedule follows it and the run stops and saves in time")
    p.add_argument("--stop-after", type=float, default=None,
                   help="stop and save after this many seconds of this command, schedule unchanged "
                        "(continue with --resume)")
    p.add_argument("--all-data", action="store_true",
                   help="train on every episode, including the dataset's held-out 'val' split")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="train on a demonstration folder whose generation did not finish")
    p.add_argument("--max-episodes", type=int, default=None, help="use only the first N episodes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--compile", action="store_true",
                   help="run the training forward through torch.compile (eager if compiling fails)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint's weights, tokenizer and statistics (new optimizer and schedule)")
    p.set_defaults(func=run)


def _read_all(dataset, limit: int | None, desc: str):
    """Episodes in dataset order, decompressed on several threads (zlib releases the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        yield from tqdm(pool.map(dataset.__getitem__, range(n)), total=n, desc=desc, unit="ep")


def run(args: argparse.Namespace) -> int:
    from qvla_ros.dataset import DemoDataset

    from .training import TrainConfig, train

    if not Path(args.data).is_dir():
        raise SystemExit(f"qvla train: --data {args.data} is not a directory")
    # The dataset's own split: seeds it holds out ("val") never train, so the recorded val L1 is
    # on episodes the policy has not seen; --all-data trains on every episode.
    dataset = DemoDataset(args.data, split="all" if args.all_data else "train",
                          allow_incomplete=args.allow_incomplete)
    val = None if args.all_data else DemoDataset(args.data, split="val", allow_incomplete=args.allow_incomplete)
    cfg = TrainConfig(config=args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, shift_pixels=args.shift, brightness=args.brightness, contrast=args.contrast,
                      phrasings=not args.no_phrasings, checkpoint_every=args.checkpoint_every,
                      time_limit_s=args.time_limit, stop_after_s=args.stop_after, device=args.device,
                      compile=args.compile)
    episodes = _read_all(dataset, args.max_episodes, "train episodes")
    record = train(episodes, args.out, cfg, manifest=dataset.manifest, data_path=str(Path(args.data).resolve()),
                   resume=args.resume, init_from=args.init, val_episodes=_read_all(val, None, "val episodes") if val is not None and len(val) else None)
    print(f"qvla train: {record['steps_done']} steps on {record['frames']} frames "
          f"({record['episodes']} episodes) in {record['wall_s']:.0f} s on {record['device']}; "
          f"final L1 {record['losses'][-1][1] if record['losses'] else float('nan'):.4f}, "
          f"val L1 {record['val_l1']}; checkpoint in {args.out}"
          f"{'' if record['finished'] else f' (unfinished: {cfg.steps} steps planned; --resume continues)'}")
    return 0
