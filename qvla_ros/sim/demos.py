"""Scripted-expert demonstrations of the suite (`qvla demos`).

For each task, attempts seeds 0, 1, 2, ... (suite.demo_seed, all below the evaluation range) and
keeps the successful episodes until it has `episodes_per_task` of them. Workers write each episode
as it ends (dataset.write_episode: temp file + rename) and leave a small marker for a failed seed,
so an interrupted run resumes where it stopped: re-running the same command skips every seed that
already has a file or a marker. The manifest records the recipe (suite, cameras, image size,
versions), the episodes, the failed seeds and the time taken; a folder made with another recipe is
refused rather than mixed.

`suite` picks the benchmark (sim.benchmarks): MetaWorld's, or LIBERO's (libero-object,
libero-spatial: its scripted expert, 7-d actions, 8-d proprio, two 224 px cameras). LIBERO has a
fixed pool of demonstration seeds (initial states 0-29 of each task, never its evaluation states
30-49): a task whose pool runs out before `episodes_per_task` successes keeps what it has, and the
manifest says so (`stats[task].short`).

`smoke=True` checks the plumbing in seconds: episodes that run out of `max_steps` are written as
episode files too (a few steps of an episode, not a demonstration), and the manifest says
`"smoke": true` and stays incomplete, so training refuses the folder unless told otherwise.
"""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..dataset import FORMAT_VERSION, MANIFEST, DemoFileError, episode_path, write_json_atomic
from .benchmarks import DEFAULT_SUITE, get_benchmark
from .evaluate import cpu_model
from .workers import RolloutSettings, run_batches

__all__ = ["generate_demos", "DemoGenerationError"]


class DemoGenerationError(RuntimeError):
    """The expert failed too often on a task to reach the requested number of episodes."""


def _scan(root: Path, task: str) -> tuple[dict[int, Path], set[int]]:
    done = {int(p.stem.split("_")[1]): p for p in (root / task).glob("seed_*.npz")}
    failed = {int(p.name.split("_")[1].split(".")[0]) for p in (root / task).glob("seed_*.failed.json")}
    return done, failed


def _episode_length(path: Path) -> int:
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(len(z["actions"]))
    except Exception as exc:
        raise DemoFileError(f"{path}: damaged demonstration file ({type(exc).__name__}: {exc}); "
                            "delete it and re-run the same `qvla demos` command to redo it") from exc


def generate_demos(out_dir: str | Path, tasks=None, episodes_per_task: int | None = None, *,
                   workers: int = 0, batch_size: int = 4, image_size: int | None = None,
                   cameras=None, max_steps: int | None = None,
                   max_attempts_factor: float = 2.0, progress: bool = True,
                   suite: str = DEFAULT_SUITE, smoke: bool = False) -> dict:
    """Write (or complete) a demonstration folder; returns its manifest.

    Args:
        out_dir: the dataset folder (created; an existing one is resumed if its recipe matches).
        tasks: None = the whole suite.
        episodes_per_task: successful episodes wanted per task (None: the suite's default,
            MetaWorld 50, LIBERO 30 = its whole demonstration pool).
        image_size, cameras, max_steps: None = the suite's.
        workers: worker processes (0 = this process).
        batch_size: environments a worker steps together.
        max_attempts_factor: give up on a task after this many attempts per wanted episode (+10).
        suite: the benchmark (sim.benchmarks.SUITES).
        smoke: a plumbing check; see the module docstring.
    """
    bench = get_benchmark(suite)
    episodes_per_task = bench.demo_episodes if episodes_per_task is None else episodes_per_task
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    pool = bench.demo_seed_count
    if pool is not None and episodes_per_task > pool:
        raise ValueError(f"{bench.name} has {pool} demonstration initial states per task "
                         f"({bench.seed_rule()}); asked for {episodes_per_task} episodes")
    image_size = image_size or bench.image_size
    cameras = tuple(cameras or bench.cameras)
    max_steps = max_steps or bench.max_steps
    specs = bench.resolve_tasks(tasks)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    expert = bench.expert_factory()
    recipe = {
        "suite": bench.name, "tasks": {s.name: s.instruction for s in specs},
        "cameras": list(cameras), "image_size": image_size, "max_steps": max_steps,
        "proprio": bench.proprio_text, "actions": bench.action_text,
        "expert": expert.describe(),
        "seeds": f"{bench.seed_rule()}; failed seeds skipped",
        "format": FORMAT_VERSION, "versions": bench.versions(),
    }
    if smoke:
        recipe["smoke"] = True
    manifest_path = root / MANIFEST
    previous = {}
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DemoFileError(f"{manifest_path}: damaged manifest ({exc}); move it away to start "
                                "a new dataset") from exc
        old = dict(previous.get("recipe", {}))
        old.setdefault("suite", DEFAULT_SUITE)      # made before there was more than one
        keys = ("suite", "cameras", "image_size", "max_steps", "format", "smoke")
        diff = [k for k in keys if old.get(k) != recipe.get(k)]
        if diff:
            raise ValueError(f"{root} holds demonstrations made with other settings "
                             f"({', '.join(f'{k}: {old.get(k)} vs {recipe[k]}' for k in diff)}); "
                             "use another --out folder")
        recipe["tasks"] = {**old.get("tasks", {}), **recipe["tasks"]}
    started = time.time()
    manifest = {"format": "qvla-demos", "version": 1, "complete": False, "recipe": recipe,
                "created": previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
                "command": " ".join(sys.argv), "host": {"cpu": cpu_model(), "name": socket.gethostname()},
                "runs": previous.get("runs", [])}
    write_json_atomic(manifest_path, {**previous, **manifest})

    settings = RolloutSettings(image_size=image_size, cameras=cameras, max_steps=max_steps,
                               replan_steps=1, record_dir=str(root), suite=bench.name,
                               keep_unfinished=smoke)
    cap = int(max_attempts_factor * episodes_per_task) + 10
    if pool is not None:
        cap = min(cap, pool)
    counts = {}
    for s in specs:
        done, _ = _scan(root, s.name)
        counts[s.name] = max(0, episodes_per_task - len(done))
    bar = tqdm(total=sum(counts.values()), desc="demos", unit="ep", disable=not progress)
    generated = 0

    def on_batch(results, info):
        nonlocal generated
        won = sum(r["success"] or smoke for r in results)
        generated += won
        bar.update(won)

    try:
        while True:
            batches = []
            for s in specs:
                done, failed = _scan(root, s.name)
                need = episodes_per_task - len(done)
                tried = set(done) | failed
                if need <= 0:
                    continue
                if pool is not None and len(tried) >= pool:
                    continue        # every demonstration state tried: the task stays short
                if len(tried) >= cap:
                    raise DemoGenerationError(
                        f"{s.name}: only {len(done)} successes in {len(tried)} attempts; the expert "
                        f"fails too often (kept everything written in {root})")
                fresh, k = [], 0
                while len(fresh) < min(need, cap - len(tried)):
                    if k not in tried:
                        fresh.append(bench.demo_seed(k))
                    k += 1
                batches += [(s.name, fresh[i:i + batch_size]) for i in range(0, len(fresh), batch_size)]
            if not batches:
                break
            run_batches(expert, batches, settings, workers=workers, on_batch=on_batch)
    finally:
        bar.close()

    episodes, failed_all, stats = [], {}, {}
    for s in specs:
        done, failed = _scan(root, s.name)
        chosen = sorted(done)[:episodes_per_task]
        lengths = []
        for seed in chosen:
            length = _episode_length(done[seed])
            lengths.append(length)
            episodes.append({"file": episode_path(root, s.name, seed).relative_to(root).as_posix(),
                             "task": s.name, "seed": seed, "length": length})
        failed_all[s.name] = sorted(failed)
        stats[s.name] = {"episodes": len(chosen), "failed_attempts": len(failed),
                         "expert_success_rate": len(done) / max(1, len(done) + len(failed)),
                         "mean_length": float(np.mean(lengths)) if lengths else None}
        if len(chosen) < episodes_per_task:
            stats[s.name]["short"] = episodes_per_task - len(chosen)
            print(f"qvla demos: {s.name}: {len(chosen)} of {episodes_per_task} episodes; every "
                  "demonstration initial state was tried", file=sys.stderr)
    wall = time.time() - started
    manifest.update(
        complete=not smoke, episodes=episodes, failed_seeds=failed_all, stats=stats,
        frames=int(sum(e["length"] for e in episodes)),
        runs=manifest["runs"] + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                                  "wall_time_s": round(wall, 1), "workers": workers,
                                  "batch_size": batch_size, "episodes_written": generated}])
    write_json_atomic(manifest_path, manifest)
    return manifest
