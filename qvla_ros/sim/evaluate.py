"""Closed-loop evaluation: success per task and overall, with Wilson 95% intervals.

    from qvla_ros.sim.evaluate import evaluate
    from qvla_ros.sim.expert import ExpertFactory
    results = evaluate(ExpertFactory(), tasks=None, episodes_per_task=50, workers=2)
    results.save("runs/eval_expert")          # results.json + success.png

Episodes run on held-out seeds (the suite's eval_seed, sim.benchmarks): never a seed any
demonstration used. `suite="libero-object"` (or libero-spatial) runs LIBERO: 7-d actions, 8-d
proprio, two cameras, its evaluation initial states 30-49.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..dataset import write_json_atomic
from .benchmarks import DEFAULT_SUITE, get_benchmark
from .metrics import wilson_interval
from .perturb import Perturbation
from .ray_pool import run_batches_on_ray
from .workers import RolloutSettings, run_batches

__all__ = ["evaluate", "EvalResults", "cpu_model"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class EvalResults:
    """Outcome of an evaluation: `per_task[name]` and `overall` hold successes, episodes, rate,
    ci95 [low, high] and mean_success_steps; `episodes` every episode; `settings` how it ran."""

    per_task: dict
    overall: dict
    episodes: list
    settings: dict = field(default_factory=dict)

    @staticmethod
    def _summary(episodes: list) -> dict:
        n = len(episodes)
        k = sum(e["success"] for e in episodes)
        lo, hi = wilson_interval(k, n)
        won = [e["steps"] for e in episodes if e["success"]]
        return {"successes": k, "episodes": n, "rate": k / n, "ci95": [lo, hi],
                "mean_success_steps": (sum(won) / len(won)) if won else None}

    @classmethod
    def from_episodes(cls, task_names: list[str], episodes: list, settings: dict) -> "EvalResults":
        episodes = sorted(episodes, key=lambda e: (task_names.index(e["task"]), e["seed"]))
        per_task = {t: cls._summary([e for e in episodes if e["task"] == t]) for t in task_names}
        return cls(per_task=per_task, overall=cls._summary(episodes), episodes=episodes,
                   settings=settings)

    def to_dict(self) -> dict:
        return {"format": "qvla-eval", "version": 1, "overall": self.overall,
                "per_task": self.per_task, "settings": self.settings, "episodes": self.episodes}

    def save(self, out_dir: str | Path, plot: bool = True) -> Path:
        """Write results.json (atomically) and, with plot, success.png into out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "results.json", self.to_dict())
        if plot:
            from .plots import plot_success
            plot_success(self, out_dir / "success.png")
        return out_dir / "results.json"

    @classmethod
    def load(cls, path: str | Path) -> "EvalResults":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "qvla-eval":
            raise ValueError(f"{path}: not a qvla eval results file")
        return cls(per_task=data["per_task"], overall=data["overall"], episodes=data["episodes"],
                   settings=data.get("settings", {}))

    def table(self) -> str:
        lines = [f"{'task':<16} {'success':>9} {'rate':>6}  95% CI"]
        for name, r in [*self.per_task.items(), ("overall", self.overall)]:
            lo, hi = r["ci95"]
            lines.append(f"{name:<16} {r['successes']:>4}/{r['episodes']:<4} {r['rate']:>6.1%}"
                         f"  [{lo:.1%}, {hi:.1%}]")
        return "\n".join(lines)


def evaluate(policy_factory: Callable, tasks=None, episodes_per_task: int | None = None, *,
             workers: int = 0, batch_size: int = 8, replan_steps: int | None = None,
             max_steps: int | None = None, image_size: int | None = None,
             cameras=None, seed_offset: int = 0, seeds=None, suite: str = DEFAULT_SUITE,
             allow_demo_seeds: bool = False, progress: bool = True,
             episode_log: str | Path | None = None, describe: dict | None = None,
             perturbation: Perturbation | None = None, ray_address: str | None = None) -> EvalResults:
    """Roll out the policy built by `policy_factory` on every task, `episodes_per_task` times.

    Args:
        policy_factory: picklable zero-argument callable returning a policy-contract object;
            each worker calls it once.
        tasks: None (the whole suite), names, or a comma-separated string.
        episodes_per_task: None = the suite's (MetaWorld 50, LIBERO 20: all its held-out states).
        workers: worker processes; 0 runs in this process.
        batch_size: environments a worker steps in lockstep (policy calls are batched over them).
        replan_steps: actions executed from each chunk before re-planning (None = whole chunk).
        max_steps, cameras: None = the suite's.
        image_size: None = the policy's config.image_size.
        seed_offset: start of the held-out seed block (episode i uses eval_seed(i, seed_offset)).
        seeds: explicit seeds per task instead (must be evaluation seeds unless allow_demo_seeds).
        episode_log: append each finished episode as a JSON line here (survives a crash).
        describe: what the policy is, recorded in the results' settings.
        perturbation: robustness runs (sim.perturb): images or instructions changed before the
            policy sees them; same seeds, so the episodes pair with an unperturbed run's.
        ray_address: run the `workers` on a Ray cluster ('local', 'auto', an address) instead
            of local processes; the same seeds give the same episodes.
        suite: the benchmark (sim.benchmarks.SUITES): "metaworld", "libero-object", ...
    """
    bench = get_benchmark(suite)
    specs = bench.resolve_tasks(tasks)
    names = [s.name for s in specs]
    max_steps = max_steps or bench.max_steps
    cameras = tuple(cameras or bench.cameras)
    if seeds is None:
        episodes_per_task = bench.eval_episodes if episodes_per_task is None else episodes_per_task
        if episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
        seeds = [bench.eval_seed(i, seed_offset) for i in range(episodes_per_task)]
    else:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds is empty")
    if not allow_demo_seeds and not all(bench.is_eval_seed(s) for s in seeds):
        bad = [s for s in seeds if not bench.is_eval_seed(s)][:5]
        raise ValueError(f"seeds {bad} belong to the demonstration range; evaluation runs on "
                         f"held-out seeds ({bench.name}: {bench.seed_rule()})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = RolloutSettings(image_size=image_size, cameras=cameras, max_steps=max_steps,
                               replan_steps=replan_steps, perturbation=perturbation,
                               suite=bench.name)
    batches = [(name, seeds[i:i + batch_size]) for name in names
               for i in range(0, len(seeds), batch_size)]

    episodes: list = []
    info_seen: dict = {}
    log = open(episode_log, "a") if episode_log is not None else None
    bar = tqdm(total=len(names) * len(seeds), desc="eval", unit="ep", disable=not progress)

    def on_batch(results, info):
        episodes.extend(results)
        info_seen.update(image_size=info["image_size"], cameras=info["cameras"])
        if "forward_mode" in info:  # each mode a worker reported (graphs, or eager and why)
            modes = info_seen.setdefault("forward_modes", [])
            if info["forward_mode"] not in modes:
                modes.append(info["forward_mode"])
        if log is not None:
            log.write("".join(json.dumps(r) + "\n" for r in results))
            log.flush()
        done = sum(r["success"] for r in episodes)
        bar.update(len(results))
        bar.set_postfix(success=f"{done}/{len(episodes)}")

    start = time.perf_counter()
    try:
        if ray_address is None:
            run_batches(policy_factory, batches, settings, workers=workers, on_batch=on_batch)
        else:
            run_batches_on_ray(policy_factory, batches, settings, ray_address, workers,
                               threads=settings.torch_threads or 1, on_batch=on_batch)
    finally:
        bar.close()
        if log is not None:
            log.close()
    wall = time.perf_counter() - start
    run_settings = {
        "policy": describe or getattr(policy_factory, "describe", lambda: {"factory": repr(policy_factory)})(),
        "suite": bench.name, "tasks": {s.name: s.instruction for s in specs},
        "episodes_per_task": len(seeds),
        "seeds": [seeds[0], seeds[-1]] if seeds == list(range(seeds[0], seeds[0] + len(seeds))) else seeds,
        "replan_steps": replan_steps, "max_steps": max_steps, "batch_size": batch_size,
        "workers": workers, "ray": ray_address, "wall_time_s": round(wall, 2), "cpu": cpu_model(),
        "perturbation": None if perturbation is None else perturbation.describe(),
        **info_seen,
    }
    return EvalResults.from_episodes(names, episodes, run_settings)
